"""Triton EMA codebook update: per-codeword statistics, then decay + Laplace smoothing + renormalisation.

* :func:`pq_cluster_stats`: counts ``[M, K]`` and sums ``[M, K, Ds]`` of the rows assigned to each
  codeword, as a segment reduction (the on-chip one-hot ``tl.dot`` of :mod:`equss.kernels.pq_gather`,
  one atomic add per program and output element; no one_hot tensor and no K×N matrix in memory).
* :func:`pq_ema_apply_`: two launches. The first (one program per subspace) decays ``cluster_size`` and
  reduces ``n_tot = Σ_k cluster_size``; the second (a 2-D grid over ``K·Ds`` elements and subspaces)
  decays ``embed_sum`` and writes ``codebooks = embed_sum / smoothed`` with
  ``smoothed_k = (cluster_size_k + eps)/(n_tot + K·eps)·n_tot``. Two launches because every element of
  a subspace needs that subspace's complete ``n_tot``; a single launch would need a grid-wide barrier.
  Divisions use ``div_rn`` (IEEE round-to-nearest, like PyTorch) rather than Triton's default
  approximate fp32 division. A subspace with ``n_tot == 0`` keeps its codebook, as in the reference.

Semantics: :func:`equss.ops.reference.pq_ema_apply_ref_` (vector-quantize-pytorch's EuclideanCodebook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C
from equss.kernels.pq_gather import SEGMENT_SUM_CONFIGS, segment_sum

__all__ = ["EmaConfig", "CONFIGS", "pq_cluster_stats", "pq_ema_apply_", "compile_spec"]


def pq_cluster_stats(x: torch.Tensor, codes: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend entry of ``pq_cluster_stats``: ``counts [M, K]`` and ``sums [M, K, Ds]``, both float32."""
    sums, counts = segment_sum(x, codes, int(K), with_counts=True)
    return counts, sums


@triton.jit
def _ema_counts_kernel(
    counts_ptr,  # [M, K] fp32, this step
    cs_ptr,  # [M, K] fp32 cluster_size, updated in place
    ntot_ptr,  # [M] fp32 out
    K,
    decay,
    one_minus_decay,
    BLOCK: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < K
        cs = tl.load(cs_ptr + m * K + k, mask=mask, other=0.0)
        n = tl.load(counts_ptr + m * K + k, mask=mask, other=0.0)
        cs = cs * decay + n * one_minus_decay
        tl.store(cs_ptr + m * K + k, cs, mask=mask)
        total += tl.where(mask, cs, 0.0)
    tl.store(ntot_ptr + m, tl.sum(total, axis=0))


@triton.jit
def _ema_codebook_kernel(
    sums_ptr,  # [M, K, Ds] fp32, this step
    es_ptr,  # [M, K, Ds] fp32 embed_sum, updated in place
    cs_ptr,  # [M, K] fp32 cluster_size (already updated by _ema_counts_kernel)
    ntot_ptr,  # [M] fp32
    cb_ptr,  # [M, K, Ds] codebooks, any float dtype, overwritten
    K,
    Ds,
    decay,
    one_minus_decay,
    eps,
    k_eps,  # K·eps, computed on the host in float64 like the reference's Python scalar
    BLOCK: tl.constexpr,
):
    m = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat (k, d) index within subspace m
    mask = i < K * Ds
    k = i // Ds
    base = m * K * Ds
    es = tl.load(es_ptr + base + i, mask=mask, other=0.0)
    s = tl.load(sums_ptr + base + i, mask=mask, other=0.0)
    es = es * decay + s * one_minus_decay
    tl.store(es_ptr + base + i, es, mask=mask)
    n_tot = tl.load(ntot_ptr + m)
    if n_tot > 0.0:
        cs = tl.load(cs_ptr + m * K + k, mask=mask, other=1.0)
        smoothed = tl.math.div_rn(cs + eps, n_tot + k_eps) * n_tot
        new = tl.math.div_rn(es, smoothed)
        tl.store(cb_ptr + base + i, new.to(cb_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class EmaConfig:
    kernel: str  # "counts" | "codebook"
    dtype: torch.dtype  # codebooks dtype ("codebook" kernel); float32 for "counts"
    BLOCK: int
    num_warps: int = 4

    def describe(self) -> str:
        return f"ema_{self.kernel}[{C.TRITON_TYPE[self.dtype]}] BLOCK={self.BLOCK} warps={self.num_warps}"


_COUNTS_BLOCK = 1024
_CODEBOOK_BLOCK = 1024
EMA_CONFIGS: tuple[EmaConfig, ...] = (EmaConfig("counts", torch.float32, _COUNTS_BLOCK),) + tuple(
    EmaConfig("codebook", dtype, _CODEBOOK_BLOCK) for dtype in C.KERNEL_DTYPES + (torch.float64,)
)
# Everything pq_ema.py launches, including the statistics' segment sum (shared with pq_gather.py).
CONFIGS = EMA_CONFIGS + SEGMENT_SUM_CONFIGS

last_config: dict[str, EmaConfig] = {}


def pq_ema_apply_(
    counts: torch.Tensor,
    sums: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebooks: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """Backend entry of ``pq_ema_apply_`` (buffers validated, contiguous, float32 except ``codebooks``)."""
    M, K, Ds = codebooks.shape
    decay = float(decay)
    one_minus = 1.0 - decay  # in float64 on the host, as the reference's alpha=1.0 - decay
    n_tot = torch.empty(M, dtype=torch.float32, device=codebooks.device)
    cfg_a = EMA_CONFIGS[0]
    cfg_b = EmaConfig("codebook", codebooks.dtype, _CODEBOOK_BLOCK)
    last_config["ema_counts"], last_config["ema_codebook"] = cfg_a, cfg_b
    _ema_counts_kernel[(M,)](
        counts, cluster_size, n_tot, K, decay, one_minus, BLOCK=cfg_a.BLOCK, num_warps=cfg_a.num_warps
    )
    C.check_grid_dim(M, 65535, "M (subspaces, grid axis 1)")
    grid = (triton.cdiv(K * Ds, cfg_b.BLOCK), M)
    _ema_codebook_kernel[grid](
        sums,
        embed_sum,
        cluster_size,
        n_tot,
        codebooks,
        K,
        Ds,
        decay,
        one_minus,
        float(eps),
        K * float(eps),
        BLOCK=cfg_b.BLOCK,
        num_warps=cfg_b.num_warps,
    )


def compile_spec(cfg) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile`` of ``cfg``."""
    if not isinstance(cfg, EmaConfig):
        from equss.kernels import pq_gather

        return pq_gather.compile_spec(cfg)
    if cfg.kernel == "counts":
        signature = {
            "counts_ptr": "*fp32",
            "cs_ptr": "*fp32",
            "ntot_ptr": "*fp32",
            "K": "i32",
            "decay": "fp32",
            "one_minus_decay": "fp32",
        }
        kernel = _ema_counts_kernel
    else:
        signature = {
            "sums_ptr": "*fp32",
            "es_ptr": "*fp32",
            "cs_ptr": "*fp32",
            "ntot_ptr": "*fp32",
            "cb_ptr": f"*{C.TRITON_TYPE[cfg.dtype]}",
            "K": "i32",
            "Ds": "i32",
            "decay": "fp32",
            "one_minus_decay": "fp32",
            "eps": "fp32",
            "k_eps": "fp32",
        }
        kernel = _ema_codebook_kernel
    constexprs = {"BLOCK": cfg.BLOCK}
    signature.update({name: "constexpr" for name in constexprs})
    return kernel, signature, constexprs, {"num_warps": cfg.num_warps}

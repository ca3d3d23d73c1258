"""Triton EMA codebook update: decay + Laplace smoothing + renormalisation, from one step's statistics.

The statistics themselves come from :mod:`equss.kernels.pq_cluster_stats`. :func:`pq_ema_apply_triton_`
is two launches:

1. ``_ema_counts_kernel`` (one program per subspace) decays ``cluster_size`` in place and reduces
   ``n_tot = Σ_k cluster_size`` (``M·K`` floats in, ``M·K + M`` out).
2. ``_ema_codebook_kernel`` (a grid of ``[BLOCK_K, BLOCK_D]`` codeword tiles × subspaces) decays
   ``embed_sum`` and writes ``codebooks = embed_sum / smoothed`` with ``smoothed_k = (cluster_size_k +
   eps)/(n_tot + K·eps)·n_tot``, computed once per codeword row; per element it reads 8 bytes and writes
   4 + the codebook width, in 16-byte vectors when ``Ds == 32`` (the ``EVEN_D`` variant), with no
   division to find an element's codeword and one 64-bit offset per program.

Two launches because every element of a subspace needs that subspace's complete ``n_tot`` while
``cluster_size`` is updated in place: a program of a single launch could read a ``cluster_size`` entry
that another program had already decayed (a grid-wide barrier, or a scratch copy, would be needed). Both
kernels are memory-bound and tiny (4 MB moved at the EQUSS shape): their cost is the launches. Divisions
use ``div_rn`` (IEEE round-to-nearest, like PyTorch) rather than Triton's default approximate fp32
division. A subspace with ``n_tot == 0`` keeps its codebook, as in the reference.

Semantics: :func:`equss.ops.reference.pq_ema_apply_ref_` (vector-quantize-pytorch's EuclideanCodebook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C

__all__ = ["EmaConfig", "CONFIGS", "pq_ema_apply_triton_", "compile_spec"]


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
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,  # Ds == BLOCK_D: compile-time row stride (16-byte vectors), no column mask
):
    # A [BLOCK_K, BLOCK_D] tile of codewords of subspace m: the smoothed cluster size is computed once per
    # codeword (row), and no element needs a division to find its codeword.
    m = tl.program_id(1)
    if EVEN_D:
        DS = BLOCK_D
    else:
        DS = Ds
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    k_mask = ks < K
    base = m.to(tl.int64) * K * DS  # the only 64-bit offset; within a subspace K·Ds < 2^31
    n_tot = tl.load(ntot_ptr + m)
    cs = tl.load(cs_ptr + m * K + ks, mask=k_mask, other=1.0)
    smoothed = tl.math.div_rn(cs + eps, n_tot + k_eps) * n_tot
    for d0 in range(0, DS, BLOCK_D):
        cols = d0 + dd
        mask = k_mask[:, None] & (cols < DS)[None, :]
        off = base + ks[:, None] * DS + cols[None, :]
        es = tl.load(es_ptr + off, mask=mask, other=0.0)
        s = tl.load(sums_ptr + off, mask=mask, other=0.0)
        es = es * decay + s * one_minus_decay
        tl.store(es_ptr + off, es, mask=mask)
        if n_tot > 0.0:
            new = tl.math.div_rn(es, smoothed[:, None])
            tl.store(cb_ptr + off, new.to(cb_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class EmaConfig:
    kernel: str  # "counts" | "codebook"
    dtype: torch.dtype  # codebooks dtype ("codebook" kernel); float32 for "counts"
    BLOCK: int  # "counts": codewords per step; "codebook": codewords (rows) per tile
    even_d: bool = False  # "codebook": Ds == BLOCK_D
    BLOCK_D: int = 32
    num_warps: int = 4

    def describe(self) -> str:
        if self.kernel == "counts":
            return f"ema_counts[{C.TRITON_TYPE[self.dtype]}] BLOCK={self.BLOCK} warps={self.num_warps}"
        d = f"Ds={self.BLOCK_D}" if self.even_d else f"BLOCK_D={self.BLOCK_D}"
        return f"ema_codebook[{C.TRITON_TYPE[self.dtype]}] BLOCK_K={self.BLOCK} {d} warps={self.num_warps}"


_COUNTS_BLOCK = 1024
_CODEBOOK_BLOCK_K = 32  # 32 codewords × 32 columns: 8 elements (two 16-byte vectors) per thread
CONFIGS: tuple[EmaConfig, ...] = (EmaConfig("counts", torch.float32, _COUNTS_BLOCK),) + tuple(
    EmaConfig("codebook", dtype, _CODEBOOK_BLOCK_K, even_d=even)
    for dtype in C.KERNEL_DTYPES + (torch.float64,)
    for even in (True, False)
)


def pick_configs(codebooks_dtype: torch.dtype, Ds: int = 32) -> tuple[EmaConfig, EmaConfig]:
    """The two configurations :func:`pq_ema_apply_triton_` launches (members of :data:`CONFIGS`)."""
    return CONFIGS[0], EmaConfig("codebook", codebooks_dtype, _CODEBOOK_BLOCK_K, even_d=Ds == 32)


def pq_ema_apply_triton_(
    counts: torch.Tensor,
    sums: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_sum: torch.Tensor,
    codebooks: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """Triton backend of ``equss::pq_ema_apply_`` (buffers validated, contiguous, float32 except ``codebooks``)."""
    M, K, Ds = codebooks.shape
    decay = float(decay)
    one_minus = 1.0 - decay  # in float64 on the host, as the reference's alpha=1.0 - decay
    n_tot = torch.empty(M, dtype=torch.float32, device=codebooks.device)
    cfg_a, cfg_b = pick_configs(codebooks.dtype, Ds)
    _ema_counts_kernel[(M,)](
        counts, cluster_size, n_tot, K, decay, one_minus, BLOCK=cfg_a.BLOCK, num_warps=cfg_a.num_warps
    )
    C.check_grid_dim(M, 65535, "M (subspaces, grid axis 1)")
    grid = (triton.cdiv(K, cfg_b.BLOCK), M)
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
        BLOCK_K=cfg_b.BLOCK,
        BLOCK_D=cfg_b.BLOCK_D,
        EVEN_D=cfg_b.even_d,
        num_warps=cfg_b.num_warps,
    )


def compile_spec(cfg: EmaConfig) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile`` of ``cfg``."""
    if cfg.kernel == "counts":
        kernel, floats = _ema_counts_kernel, ("decay", "one_minus_decay")
        pointers = {"counts_ptr": "fp32", "cs_ptr": "fp32", "ntot_ptr": "fp32"}
        constexprs = {"BLOCK": cfg.BLOCK}
    else:
        kernel, floats = _ema_codebook_kernel, ("decay", "one_minus_decay", "eps", "k_eps")
        pointers = {
            "sums_ptr": "fp32", "es_ptr": "fp32", "cs_ptr": "fp32", "ntot_ptr": "fp32",
            "cb_ptr": C.TRITON_TYPE[cfg.dtype],
        }
        constexprs = {"BLOCK_K": cfg.BLOCK, "BLOCK_D": cfg.BLOCK_D, "EVEN_D": cfg.even_d}
    return C.aot_spec(kernel, pointers, floats, constexprs, {"num_warps": cfg.num_warps})

"""Triton PQ gather (codes → quantized vectors) and its backward, a segment sum of gradients by code.

The backward's reduction is the kernel of :mod:`equss.kernels.pq_segment_sum`.

* Forward: ``out[n, m] = codebooks[m, codes[n, m]]``, a pure copy (bit-exact in every dtype, float64
  included). A code outside ``[0, K)`` (only possible when the caller skipped the range check) yields a
  zero vector instead of an out-of-bounds read.
* Backward: ``grad[m, k] = Σ_{n: codes[n, m] = k} grad_out[n, m]`` in fp32 (float64 for float64
  gradients is summed as float32, like the reference; the caller casts).

Shapes: ``codes [N, M]``, ``codebooks [M, K, Ds]``, ``grad_out / v [N, M, Ds]``, result ``[M, K, Ds]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C
from equss.kernels.pq_segment_sum import as_int32_codes, segment_sum_triton

__all__ = ["GatherConfig", "CONFIGS", "pick_config", "pq_gather_triton", "pq_gather_backward_triton", "compile_spec"]


# -------------------------------------------------------------------------------------------- gather
@triton.jit
def _pq_gather_kernel(
    codes_ptr,  # [N, M] int32
    cb_ptr,  # [M, K, Ds]
    out_ptr,  # [N, M, Ds]
    NM,  # N·M
    M,
    K,
    Ds,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (n, m) index
    r_mask = r < NM
    code = tl.load(codes_ptr + r, mask=r_mask, other=0).to(tl.int64)
    valid = r_mask & (code >= 0) & (code < K)
    src = cb_ptr + ((r % M) * K + code) * Ds
    dst = out_ptr + r * Ds
    d = tl.arange(0, BLOCK_D)
    for d0 in range(0, Ds, BLOCK_D):
        dd = d0 + d
        dd_mask = (dd < Ds)[None, :]
        v = tl.load(src[:, None] + dd[None, :], mask=valid[:, None] & dd_mask, other=0.0)
        tl.store(dst[:, None] + dd[None, :], v, mask=r_mask[:, None] & dd_mask)


@dataclass(frozen=True)
class GatherConfig:
    dtype: torch.dtype  # codebooks / output
    BLOCK_D: int = 32  # Ds is copied in 32-wide chunks (a loop for Ds > 32; masked lanes for Ds < 32)
    # (n, m) pairs per program: 1024 elements, 8 per thread with 4 warps. Every element carries its own
    # 64-bit address; 4096-element tiles needed > 200 registers per thread.
    BLOCK_R: int = 32
    num_warps: int = 4

    def describe(self) -> str:
        return f"gather[{C.TRITON_TYPE[self.dtype]}] BLOCK_R={self.BLOCK_R} BLOCK_D={self.BLOCK_D} warps={self.num_warps}"


CONFIGS: tuple[GatherConfig, ...] = tuple(
    GatherConfig(dtype) for dtype in C.KERNEL_DTYPES + (torch.float64,)
)


def pick_config(dtype: torch.dtype, Ds: int) -> GatherConfig:
    return GatherConfig(dtype)


def pq_gather_triton(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Triton backend of ``equss::pq_gather``: ``[N, M]`` codes → ``[N, M, Ds]`` codewords in the codebooks' dtype."""
    N, M = codes.shape
    _, K, Ds = codebooks.shape
    codes = as_int32_codes(codes, K)
    codebooks = codebooks.contiguous()
    out = torch.empty(N, M, Ds, dtype=codebooks.dtype, device=codebooks.device)
    if N == 0:
        return out
    cfg = pick_config(codebooks.dtype, Ds)
    grid = (triton.cdiv(N * M, cfg.BLOCK_R),)
    _pq_gather_kernel[grid](
        codes,
        codebooks,
        out,
        N * M,
        M,
        K,
        Ds,
        BLOCK_R=cfg.BLOCK_R,
        BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps,
    )
    return out


def pq_gather_backward_triton(grad_out: torch.Tensor, codes: torch.Tensor, K: int) -> torch.Tensor:
    """Triton backend of ``equss::pq_gather_backward``: scatter-add of ``grad_out [N, M, Ds]`` by code.

    Returns ``[M, K, Ds]`` fp32, or float64 for float64 ``grad_out`` (the op's contract, which makes
    gradcheck exact): float64, a debugging dtype here, is summed by ``index_add_`` in float64.
    """
    if grad_out.dtype == torch.float64:
        M, Ds = grad_out.shape[1], grad_out.shape[2]
        flat = as_int32_codes(codes, K).long()
        keep = (flat >= 0).reshape(-1, 1)
        index = (flat + torch.arange(M, device=flat.device) * K).reshape(-1).clamp_min(0)
        src = torch.where(keep, grad_out.reshape(-1, Ds), 0.0)
        return torch.zeros(M * K, Ds, dtype=torch.float64, device=grad_out.device).index_add_(0, index, src).reshape(M, K, Ds)
    sums, _ = segment_sum_triton(grad_out, codes, int(K), with_counts=False)
    return sums


def compile_spec(cfg: GatherConfig) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile`` of ``cfg``."""
    t = C.TRITON_TYPE[cfg.dtype]
    return C.aot_spec(
        _pq_gather_kernel,
        pointers={"codes_ptr": "i32", "cb_ptr": t, "out_ptr": t},
        floats=(),
        constexprs={"BLOCK_R": cfg.BLOCK_R, "BLOCK_D": cfg.BLOCK_D},
        options={"num_warps": cfg.num_warps},
    )

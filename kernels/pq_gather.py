"""Triton PQ gather (codes → quantized vectors) and its backward, a segment sum of gradients by code.

* Forward: ``out[n, m] = codebooks[m, codes[n, m]]``, a pure copy, bit-exact in every dtype (the kernel
  moves the elements as integers of their width: int16 for float16/bfloat16, int32 for float32, int64
  for float64, so no float conversion can touch a bit). A code outside ``[0, K)`` (only possible when the
  caller skipped the range check) yields a zero vector instead of an out-of-bounds read.

  Like the segment sum, the kernel walks ``N·M`` contiguous flat rows ``r = n·M + m`` in tiles of
  ``BLOCK_R`` rows (grid-stride over a grid that fills the GPU once): the codes of a tile are one
  contiguous load, the output rows one contiguous 16-byte-vector store, ``m = r mod M`` is a 32-bit
  remainder per row (never a 64-bit division per element) and the only 64-bit address arithmetic is
  the tile's base. The codeword rows (``M·K·Ds`` elements, a few MB at most) are read through L2.
* Backward: ``grad[m, k] = Σ_{n: codes[n, m] = k} grad_out[n, m]``, the gradient mode of
  :mod:`equss.kernels.pq_segment_sum` (vector atomics, or its deterministic sorted kernel): fp32 for
  fp32/fp16/bf16 gradients and float64, accumulated in float64, for float64 gradients (always the
  deterministic kernel, so gradcheck's reentrancy check holds). Only codes are masked, never values.

Shapes: ``codes [N, M]``, ``codebooks [M, K, Ds]``, ``grad_out / v [N, M, Ds]``, result ``[M, K, Ds]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C
from equss.kernels.pq_segment_sum import _segment_sum, as_int32_codes, row_tile_programs

__all__ = ["GatherConfig", "CONFIGS", "pick_config", "pq_gather_triton", "pq_gather_backward_triton", "compile_spec"]


# -------------------------------------------------------------------------------------------- gather
@triton.jit
def _pq_gather_kernel(
    codes_ptr,  # [N, M] int32
    cb_ptr,  # [M, K, Ds] as integers of the element width
    out_ptr,  # [N, M, Ds] likewise
    NM,  # N·M flat rows
    n_tiles,  # cdiv(NM, BLOCK_R)
    M,
    K,
    Ds,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,  # Ds == BLOCK_D: compile-time row stride, no column mask
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if EVEN_D:
        DS = BLOCK_D
    else:
        DS = Ds
    i = tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    # The launcher makes the grid stride a multiple of M (pq_segment_sum.row_tile_programs): row i of
    # every tile of this program is in the same subspace, so its codebook row offset is loop-invariant.
    cb_row = ((pid * BLOCK_R + i) % M) * K
    for tile in range(pid, n_tiles, nprog):
        r0 = tl.cast(tile, tl.int64) * BLOCK_R
        r_mask = i < NM - r0
        code = tl.load(codes_ptr + r0 + i, mask=r_mask, other=0)
        valid = r_mask & (code >= 0) & (code < K)
        src = cb_ptr + (cb_row + code) * DS
        dst = out_ptr + r0 * DS + i * DS
        for d0 in range(0, DS, BLOCK_D):
            cols = d0 + dd
            c_mask = cols < DS
            x = tl.load(src[:, None] + cols[None, :], mask=valid[:, None] & c_mask[None, :], other=0)
            tl.store(dst[:, None] + cols[None, :], x, mask=r_mask[:, None] & c_mask[None, :])


# Bit-exact copies move integers of the element's width.
_AS_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_INT_TYPE = {torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True)
class GatherConfig:
    dtype: torch.dtype  # the integer type the elements are copied as (their width)
    even_d: bool  # Ds == BLOCK_D
    BLOCK_D: int = 32  # Ds is copied in 32-wide chunks (a loop for Ds > 32; masked lanes for Ds < 32)
    BLOCK_R: int = 64  # rows per tile (_gather_rows)
    num_warps: int = 4

    def describe(self) -> str:
        d = f"Ds={self.BLOCK_D}" if self.even_d else f"BLOCK_D={self.BLOCK_D}"
        return f"gather[{_INT_TYPE[self.dtype]}] BLOCK_R={self.BLOCK_R} {d} warps={self.num_warps}"


def _gather_rows(itemsize: int, even_d: bool) -> int:
    # Ds = 32: 64 rows (32 for 8-byte elements), two to four 16-byte vectors per thread, and per-row
    # values (codes, offsets) that Triton keeps in the tile's row layout (128 rows put the codes in a 1-D
    # layout converted through shared memory, two barriers per tile). Other Ds: 32 rows (16 for 8-byte
    # elements), as every element may carry its own 64-bit address (160 registers at 64 rows).
    rows = 32 if itemsize == 8 else 64
    return rows if even_d else rows // 2


CONFIGS: tuple[GatherConfig, ...] = tuple(
    GatherConfig(dtype, even, BLOCK_R=_gather_rows(size, even)) for size, dtype in _AS_INT.items() for even in (True, False)
)


def pick_config(dtype: torch.dtype, Ds: int) -> GatherConfig:
    """The configuration for codebooks of ``dtype`` (any float dtype) and subspace width ``Ds``."""
    size = torch.empty((), dtype=dtype).element_size()
    return GatherConfig(_AS_INT[size], Ds == 32, BLOCK_R=_gather_rows(size, Ds == 32))


# Programs per SM of the grid-stride gather: all resident at once (8 × 4 warps at ≤ 64 registers per
# thread; sm_90: 31-37 for the Ds = 32 variants), as in pq_segment_sum.
_PROGRAMS_PER_SM = 8


def pq_gather_triton(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Triton backend of ``equss::pq_gather``: ``[N, M]`` codes → ``[N, M, Ds]`` codewords in the codebooks' dtype."""
    N, M = codes.shape
    _, K, Ds = codebooks.shape
    codes = as_int32_codes(codes, K)
    codebooks = codebooks.contiguous()
    out = torch.empty(N, M, Ds, dtype=codebooks.dtype, device=codebooks.device)
    if N == 0:
        return out
    if M * K * Ds >= 2**31:
        raise ValueError(f"equss.kernels: M·K·Ds = {M * K * Ds} must be below 2^31 (int32 codebook offsets)")
    cfg = pick_config(codebooks.dtype, Ds)
    n_tiles = triton.cdiv(N * M, cfg.BLOCK_R)
    grid = (row_tile_programs(n_tiles, cfg.BLOCK_R, M, _PROGRAMS_PER_SM * C.sm_count(codebooks.device)),)
    _pq_gather_kernel[grid](
        codes,
        codebooks.view(cfg.dtype),
        out.view(cfg.dtype),
        N * M,
        n_tiles,
        M,
        K,
        Ds,
        BLOCK_R=cfg.BLOCK_R,
        BLOCK_D=cfg.BLOCK_D,
        EVEN_D=cfg.even_d,
        num_warps=cfg.num_warps,
    )
    return out


def pq_gather_backward_triton(grad_out: torch.Tensor, codes: torch.Tensor, K: int) -> torch.Tensor:
    """Triton backend of ``equss::pq_gather_backward``: scatter-add of ``grad_out [N, M, Ds]`` by code.

    Returns ``[M, K, Ds]`` fp32, or float64 accumulated in float64 for float64 ``grad_out`` (the op's
    contract, which makes gradcheck exact). Codes outside ``[0, K)`` add nothing; gradient values are
    never masked.
    """
    sums, _ = _segment_sum(grad_out, codes, int(K), stats=False, deterministic=None)
    return sums


def compile_spec(cfg: GatherConfig) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile`` of ``cfg``."""
    t = _INT_TYPE[cfg.dtype]
    return C.aot_spec(
        _pq_gather_kernel,
        pointers={"codes_ptr": "i32", "cb_ptr": t, "out_ptr": t},
        floats=(),
        constexprs={"BLOCK_R": cfg.BLOCK_R, "BLOCK_D": cfg.BLOCK_D, "EVEN_D": cfg.even_d},
        options={"num_warps": cfg.num_warps},
    )

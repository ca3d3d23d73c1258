"""Triton PQ gather (codes → quantized vectors) and its backward, a segment sum of gradients by code.

* Forward: ``out[n, m] = codebooks[m, codes[n, m]]``, a pure copy (bit-exact in every dtype, float64
  included). A code outside ``[0, K)`` (only possible when the caller skipped the range check) yields a
  zero vector instead of an out-of-bounds read.
* Backward / segment sum: ``out[m, k] = Σ_{n: codes[n, m] = k} v[n, m]`` in fp32. One program owns a
  ``BLOCK_K × BLOCK_D`` tile of one subspace's output and a contiguous chunk of rows; per ``BLOCK_N``
  rows it builds the on-chip one-hot tile ``[BLOCK_K, BLOCK_N]`` (never a K×N matrix in memory) and
  accumulates ``one_hot @ v`` with ``tl.dot`` (tensor cores) into registers. Only at the end does it
  ``atomic_add`` its tile into the output, so the number of atomics is (#row chunks)·M·K·Ds instead of
  N·M·Ds. The kernel also counts the rows per codeword (one ``tl.sum`` per tile, cheaper than a second
  compiled variant): the backward discards the counts, :mod:`equss.kernels.pq_ema` uses them for the EMA
  statistics.

Precision of the segment sum: the one-hot factor is exact in every format and accumulation is fp32.
float16/bfloat16 values enter the tensor cores as they are (exact products). float32 values are split
into three bfloat16 pieces ``v = v1 + v2 + v3`` (each residual is exact in fp32; 3 × 8 significant bits
cover fp32's 24, so the representation error is ≤ 2⁻²⁴ relative, ≤ 2⁻²¹ under the interpreter, whose
fp32 → bf16 conversion truncates) and summed with three bf16 tensor-core products: fewer registers and
half the tensor-core time of ``input_precision="tf32x3"`` (which spilled on sm_80), while plain fp32
FMAs ("ieee") would cost 2·K·N·Ds CUDA-core FLOPs. Atomic adds from
different programs land in a nondeterministic order, so results may differ between runs in the last
bits (counts are exact: integers below 2²⁴).

Shapes: ``codes [N, M]``, ``codebooks [M, K, Ds]``, ``grad_out / v [N, M, Ds]``, result ``[M, K, Ds]``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C

__all__ = [
    "GatherConfig",
    "SegmentSumConfig",
    "GATHER_CONFIGS",
    "SEGMENT_SUM_CONFIGS",
    "CONFIGS",
    "pq_gather",
    "pq_gather_backward",
    "segment_sum",
    "compile_spec",
]


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


GATHER_CONFIGS: tuple[GatherConfig, ...] = tuple(
    GatherConfig(dtype) for dtype in C.KERNEL_DTYPES + (torch.float64,)
)


def pick_gather_config(dtype: torch.dtype, Ds: int) -> GatherConfig:
    return GatherConfig(dtype)


def _as_int32_codes(codes: torch.Tensor) -> torch.Tensor:
    # Codes index K < 2^31 codewords, so int32 loses nothing and halves the bytes the kernels read.
    return codes.to(torch.int32).contiguous()


last_config: dict[str, object] = {}


def pq_gather(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Backend entry of ``pq_gather``: ``[N, M]`` codes → ``[N, M, Ds]`` codewords in the codebooks' dtype."""
    N, M = codes.shape
    _, K, Ds = codebooks.shape
    codes = _as_int32_codes(codes)
    codebooks = codebooks.contiguous()
    out = torch.empty(N, M, Ds, dtype=codebooks.dtype, device=codebooks.device)
    if N == 0:
        return out
    cfg = pick_gather_config(codebooks.dtype, Ds)
    last_config["pq_gather"] = cfg
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


# --------------------------------------------------------------------------------------- segment sum
@triton.jit
def _pq_segment_sum_kernel(
    v_ptr,  # [N, M, Ds] values to sum
    codes_ptr,  # [N, M] int32
    sums_ptr,  # [M, K, Ds] fp32, zero-initialised, atomically accumulated
    counts_ptr,  # [M, K] fp32, zero-initialised (always computed: one tl.sum per tile, cheaper than a variant)
    N,
    M,
    K,
    Ds,
    rows_per_prog,  # multiple of BLOCK_N
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_FP32: tl.constexpr,  # fp32 values: sum three bf16 pieces (module docstring)
    UPCAST: tl.constexpr,  # interpreter only (bf16 tl.dot is wrong there): run the same dots in fp32
):
    # Axis 0 runs over the (k, d) tiles of one row chunk, so programs that read the same rows are
    # scheduled together and all but the first find them in L2.
    pid_kd = tl.program_id(0)
    pid_r = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    num_d = tl.cdiv(Ds, BLOCK_D)
    k_tile = pid_kd // num_d
    d_tile = pid_kd % num_d
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    dd = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    k_mask = ks < K
    d_mask = dd < Ds
    nn = tl.arange(0, BLOCK_N)

    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_K], dtype=tl.int32)
    row_start = pid_r.to(tl.int64) * rows_per_prog
    for r0 in range(0, rows_per_prog, BLOCK_N):
        rows = row_start + r0 + nn
        r_mask = rows < N
        code = tl.load(codes_ptr + rows * M + m, mask=r_mask, other=-1)  # -1 matches no codeword
        v = tl.load(
            v_ptr + rows[:, None] * (M * Ds) + m * Ds + dd[None, :],
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        hit = ks[:, None] == code[None, :]  # [BLOCK_K, BLOCK_N] on-chip one-hot
        if SPLIT_FP32:
            # v = v1 + v2 + v3 with bf16 pieces: each residual is exact in fp32, and 3 × 8 significant
            # bits cover fp32's 24, so the three exact one-hot products lose (almost) nothing.
            v1 = v.to(tl.bfloat16)
            r = v - v1.to(tl.float32)
            v2 = r.to(tl.bfloat16)
            v3 = (r - v2.to(tl.float32)).to(tl.bfloat16)
            if UPCAST:
                h = hit.to(tl.float32)
                v1, v2, v3 = v1.to(tl.float32), v2.to(tl.float32), v3.to(tl.float32)
            else:
                h = hit.to(tl.bfloat16)
            acc = tl.dot(h, v1, acc)
            acc = tl.dot(h, v2, acc)
            acc = tl.dot(h, v3, acc)
        else:
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(hit.to(v.dtype), v, acc)
        cnt += tl.sum(hit.to(tl.int32), axis=1)

    out = sums_ptr + (m * K + ks[:, None]) * Ds + dd[None, :]
    tl.atomic_add(out, acc, mask=k_mask[:, None] & d_mask[None, :], sem="relaxed")
    tl.atomic_add(counts_ptr + m * K + ks, cnt.to(tl.float32), mask=k_mask & (d_tile == 0), sem="relaxed")


@dataclass(frozen=True)
class SegmentSumConfig:
    dtype: torch.dtype  # of the summed values
    BLOCK_D: int
    num_warps: int
    BLOCK_N: int = 64
    BLOCK_K: int = 64
    num_stages: int = 2

    @property
    def split_fp32(self) -> bool:
        return self.dtype == torch.float32

    def describe(self) -> str:
        return (
            f"segment_sum[{C.TRITON_TYPE[self.dtype]}{',bf16x3' if self.split_fp32 else ''}] BLOCK_N={self.BLOCK_N} BLOCK_K={self.BLOCK_K} "
            f"BLOCK_D={self.BLOCK_D} warps={self.num_warps} stages={self.num_stages}"
        )


def _segment_sum_warps(dtype: torch.dtype) -> int:
    # fp32 values are split into three bf16 tiles: 8 warps keep them in registers without spilling.
    return 8 if dtype == torch.float32 else 4


SEGMENT_SUM_CONFIGS: tuple[SegmentSumConfig, ...] = tuple(
    SegmentSumConfig(dtype, bd, _segment_sum_warps(dtype))
    for dtype, bd in itertools.product(C.KERNEL_DTYPES, C.BLOCK_D_CHOICES)
)


def pick_segment_sum_config(dtype: torch.dtype, Ds: int) -> SegmentSumConfig:
    return SegmentSumConfig(dtype, C.block_d(Ds), _segment_sum_warps(dtype))


# Aim for this many programs per SM: enough to hide latency, few enough that the per-program atomics
# (BLOCK_K·BLOCK_D each) stay a small fraction of the N·Ds values read.
_PROGRAMS_PER_SM = 4


def segment_sum(
    v: torch.Tensor, codes: torch.Tensor, K: int, with_counts: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sums[m, k] = Σ_{n: codes[n,m]=k} v[n, m]`` (``[M, K, Ds]`` fp32) and optionally ``counts [M, K]`` fp32.

    ``v [N, M, Ds]`` in any float dtype (float64 is summed as float32, like the reference); ``codes
    [N, M]`` int32/int64. Codes outside ``[0, K)`` contribute nothing.
    """
    N, M, Ds = v.shape
    if v.dtype == torch.float64:
        v = v.float()
    v = v.contiguous()
    codes = _as_int32_codes(codes)
    sums = torch.zeros(M, K, Ds, dtype=torch.float32, device=v.device)
    counts = torch.zeros(M, K, dtype=torch.float32, device=v.device)
    if N == 0:
        return sums, counts if with_counts else None
    cfg = pick_segment_sum_config(v.dtype, Ds)
    last_config["segment_sum"] = cfg
    kd_tiles = triton.cdiv(K, cfg.BLOCK_K) * triton.cdiv(Ds, cfg.BLOCK_D)
    row_blocks = triton.cdiv(N, cfg.BLOCK_N)
    chunks = max(
        1, min(row_blocks, 65535, triton.cdiv(_PROGRAMS_PER_SM * C.sm_count(v.device), M * kd_tiles))
    )
    rows_per_prog = triton.cdiv(row_blocks, chunks) * cfg.BLOCK_N
    chunks = triton.cdiv(N, rows_per_prog)
    C.check_grid_dim(M, 65535, "M (subspaces, grid axis 2)")
    grid = (kd_tiles, chunks, M)
    _pq_segment_sum_kernel[grid](
        v,
        codes,
        sums,
        counts,
        N,
        M,
        K,
        Ds,
        rows_per_prog,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K,
        BLOCK_D=cfg.BLOCK_D,
        # Under the interpreter bf16 tl.dot is wrong: fp32 (split into bf16 pieces) and bf16 upcast there.
        SPLIT_FP32=cfg.split_fp32,
        UPCAST=v.device.type != "cuda" and v.dtype != torch.float16,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return sums, counts if with_counts else None


def pq_gather_backward(grad_out: torch.Tensor, codes: torch.Tensor, K: int) -> torch.Tensor:
    """Backend entry of ``pq_gather_backward``: scatter-add of ``grad_out [N, M, Ds]`` by code → ``[M, K, Ds]`` fp32."""
    sums, _ = segment_sum(grad_out, codes, int(K), with_counts=False)
    return sums


CONFIGS = GATHER_CONFIGS + SEGMENT_SUM_CONFIGS


def compile_spec(cfg: GatherConfig | SegmentSumConfig) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile`` of ``cfg``."""
    t = C.TRITON_TYPE[cfg.dtype]
    if isinstance(cfg, GatherConfig):
        signature = {
            "codes_ptr": "*i32",
            "cb_ptr": f"*{t}",
            "out_ptr": f"*{t}",
            "NM": "i32",
            "M": "i32",
            "K": "i32",
            "Ds": "i32",
        }
        constexprs = {"BLOCK_R": cfg.BLOCK_R, "BLOCK_D": cfg.BLOCK_D}
        kernel, options = _pq_gather_kernel, {"num_warps": cfg.num_warps}
    else:
        signature = {
            "v_ptr": f"*{t}",
            "codes_ptr": "*i32",
            "sums_ptr": "*fp32",
            "counts_ptr": "*fp32",
            "N": "i32",
            "M": "i32",
            "K": "i32",
            "Ds": "i32",
            "rows_per_prog": "i32",
        }
        constexprs = {
            "BLOCK_N": cfg.BLOCK_N,
            "BLOCK_K": cfg.BLOCK_K,
            "BLOCK_D": cfg.BLOCK_D,
            "SPLIT_FP32": cfg.split_fp32,
            "UPCAST": False,
        }
        kernel, options = _pq_segment_sum_kernel, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    signature.update({name: "constexpr" for name in constexprs})
    return kernel, signature, constexprs, options

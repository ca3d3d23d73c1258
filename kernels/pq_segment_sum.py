"""Triton segment sum by code: ``out[m, k] = Σ_{n: codes[n, m] = k} v[n, m]`` (and the counts), in fp32.

The reduction behind the gather backward (:mod:`equss.kernels.pq_gather`) and the EMA statistics
(:mod:`equss.kernels.pq_cluster_stats`). One program owns a ``BLOCK_K × BLOCK_D`` tile of one
subspace's output and a contiguous chunk of rows; per ``BLOCK_N`` rows it builds the on-chip one-hot
tile ``[BLOCK_K, BLOCK_N]`` (never a K×N matrix in memory) and accumulates ``one_hot @ v`` with
``tl.dot`` (tensor cores) into registers. Only at the end does it ``atomic_add`` its tile into the
output, so the number of atomics is (#row chunks)·M·K·Ds instead of N·M·Ds. The kernel also counts the
rows per codeword (one ``tl.sum`` per tile, cheaper than a second compiled variant).

Precision: the one-hot factor is exact in every format and accumulation is fp32. float16/bfloat16
values enter the tensor cores as they are (exact products). float32 values are split into three
bfloat16 pieces ``v = v1 + v2 + v3`` (each residual is exact in fp32; 3 × 8 significant bits cover
fp32's 24, so the representation error is ≤ 2⁻²⁴ relative, ≤ 2⁻²¹ under the interpreter, whose fp32 →
bf16 conversion truncates) and summed with three bf16 tensor-core products: fewer registers and half
the tensor-core time of ``input_precision="tf32x3"`` (which spilled on sm_80), while plain fp32 FMAs
("ieee") would cost 2·K·N·Ds CUDA-core FLOPs. Atomic adds from different programs land in a
nondeterministic order, so results may differ between runs in the last bits (counts are exact:
integers below 2²⁴). Codes outside ``[0, K)`` contribute nothing.

Shapes: ``v [N, M, Ds]``, ``codes [N, M]``, result ``[M, K, Ds]`` (and ``[M, K]`` counts).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C

__all__ = ["SegmentSumConfig", "CONFIGS", "pick_config", "segment_sum_triton", "as_int32_codes", "compile_spec"]


def as_int32_codes(codes: torch.Tensor, K: int) -> torch.Tensor:
    """int32 codes (half the bytes of int64) with every code outside ``[0, K)`` mapped to -1 first, so an
    int64 code cannot wrap into range (the kernels treat -1 as "no codeword")."""
    if codes.dtype != torch.int32:
        codes = torch.where((codes >= 0) & (codes < K), codes, -1).to(torch.int32)
    return codes.contiguous()


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
        # Rows without a codeword are not even loaded: a NaN times a zero one-hot entry is still NaN.
        has_code = r_mask & (code >= 0) & (code < K)
        v = tl.load(
            v_ptr + rows[:, None] * (M * Ds) + m * Ds + dd[None, :],
            mask=has_code[:, None] & d_mask[None, :],
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


CONFIGS: tuple[SegmentSumConfig, ...] = tuple(
    SegmentSumConfig(dtype, bd, _segment_sum_warps(dtype))
    for dtype, bd in itertools.product(C.KERNEL_DTYPES, C.BLOCK_D_CHOICES)
)


def pick_config(dtype: torch.dtype, Ds: int) -> SegmentSumConfig:
    return SegmentSumConfig(dtype, C.block_d(Ds), _segment_sum_warps(dtype))


# Aim for this many programs per SM: enough to hide latency, few enough that the per-program atomics
# (BLOCK_K·BLOCK_D each) stay a small fraction of the N·Ds values read.
_PROGRAMS_PER_SM = 4


def segment_sum_triton(
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
    codes = as_int32_codes(codes, K)
    sums = torch.zeros(M, K, Ds, dtype=torch.float32, device=v.device)
    counts = torch.zeros(M, K, dtype=torch.float32, device=v.device)
    if N == 0:
        return sums, counts if with_counts else None
    cfg = pick_config(v.dtype, Ds)
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


def compile_spec(cfg: SegmentSumConfig) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile`` of ``cfg``."""
    return C.aot_spec(
        _pq_segment_sum_kernel,
        pointers={"v_ptr": C.TRITON_TYPE[cfg.dtype], "codes_ptr": "i32", "sums_ptr": "fp32", "counts_ptr": "fp32"},
        floats=(),
        constexprs={
            "BLOCK_N": cfg.BLOCK_N,
            "BLOCK_K": cfg.BLOCK_K,
            "BLOCK_D": cfg.BLOCK_D,
            "SPLIT_FP32": cfg.split_fp32,
            "UPCAST": False,
        },
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )

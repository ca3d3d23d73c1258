"""Triton segment sum by code: ``sums[m, k] = Σ_{n: codes[n, m] = k} v[n, m]`` (and the counts).

The reduction behind the gather backward (:mod:`equss.kernels.pq_gather`) and the EMA statistics
(:mod:`equss.kernels.pq_cluster_stats`). Shapes: ``v [N, M, Ds]``, ``codes [N, M]``, result
``sums [M, K, Ds]`` and ``counts [M, K]``, float32 (float64 for float64 gradients).

Two modes, both reading every value once and doing no one-hot products:

* **Scatter** (the default; nondeterministic). ``v`` and ``codes`` are walked as ``N·M`` contiguous
  *flat rows* ``r = n·M + m`` in tiles of ``BLOCK_R`` rows (one contiguous load of codes, one of values
  per tile), grid-stride over a grid that is resident at once; the grid stride is a multiple of ``M``
  (:func:`row_tile_programs`), so each row lane's subspace ``m = r mod M`` is computed once per program,
  never per tile or element. Each row's Ds-vector is added into ``sums[m, code, :]`` by vector atomics
  (sm_90: ``REDG.E.ADD.F32x4``, 16 bytes per thread, one 128-byte row = 4 sector reductions at L2), and
  in statistics mode a ``+1.0`` goes into ``counts[m, code]`` (one 4-byte ``REDG`` per row). The order
  in which the atomics land varies from run to run, so sums may differ in the last bits between runs
  (counts never do: integers below 2²⁴ are exact in fp32 in any order). fp32 atomic adds flush
  subnormal operands to zero (PTX ``red.add.f32``): a subnormal term counts as 0 (an absolute error
  below 2⁻¹²⁶ per term). Shared-memory privatisation of the ``[K, Ds]`` tables would save the L2
  atomic traffic, but Triton cannot scatter into shared memory.
* **Sorted** (deterministic, bit-identical between runs and independent of the GPU). The flat rows are
  stably sorted by ``m·K + code`` (``torch.sort``), segment boundaries found with ``torch.searchsorted``,
  and one program per ``(m, k)`` (and Ds chunk) sums its rows in a fixed order (``BLOCK_R`` lanes, each
  adding its rows in row order, then a fixed tree), writing sums and counts with plain stores. It costs
  a sort of ``N·M`` keys and is load-imbalanced when one codeword holds most rows (its program reads them
  alone), so it is opt-in: pass ``deterministic=True``, set ``EQUSS_DETERMINISTIC=1`` (``0`` forces
  the scatter), or enable ``torch.use_deterministic_algorithms(True)``. float64 gradients (the gradcheck
  dtype, whose reentrancy check compares two backward passes bit for bit) always use it.

Statistics mode (``with_counts=True``, :func:`equss.ops.reference.pq_cluster_stats_ref`) skips *invalid*
rows, whose fp32 squared norm is not finite, in-kernel: a row's atomics (or its lane's additions) are
masked off, so a NaN never meets a sum (no ``0·NaN``). Gradient mode (``with_counts=False``) adds every
row. Codes outside ``[0, K)`` contribute nothing in both. Accumulation is fp32 of the values rounded to
fp32 (float64 statistics rows are rounded first, like the reference; float64 gradients are summed in
float64); an element summing ``n`` terms is within ``(n + 1)·U·Σ|terms|`` of the exact sum in either
mode (every term is added once, in the accumulation format: no splitting or rounding of the values).

Offsets: a row's base offset is int64 (``N·M·Ds`` may pass 2³¹); per-element offsets within a tile and
the offsets into ``[M, K, Ds]`` are int32 (the launcher checks ``M·K·Ds < 2³¹``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C

__all__ = [
    "SegmentSumConfig",
    "CONFIGS",
    "DETERMINISTIC_ENV",
    "pick_config",
    "resolve_deterministic",
    "row_tile_programs",
    "segment_sum_triton",
    "as_int32_codes",
    "compile_spec",
]

DETERMINISTIC_ENV = "EQUSS_DETERMINISTIC"


def as_int32_codes(codes: torch.Tensor, K: int) -> torch.Tensor:
    """int32 codes (half the bytes of int64) with every code outside ``[0, K)`` mapped to -1 first, so an
    int64 code cannot wrap into range (the kernels treat -1 as "no codeword")."""
    if codes.dtype != torch.int32:
        codes = torch.where((codes >= 0) & (codes < K), codes, -1).to(torch.int32)
    return codes.contiguous()


def resolve_deterministic(deterministic: bool | None = None) -> bool:
    """The argument, else ``$EQUSS_DETERMINISTIC`` (``1``/``0``), else ``torch.are_deterministic_algorithms_enabled()``."""
    if deterministic is not None:
        return bool(deterministic)
    env = os.environ.get(DETERMINISTIC_ENV, "").strip().lower()
    if env:
        if env not in ("0", "1", "true", "false"):
            raise ValueError(f"{DETERMINISTIC_ENV}={env!r} is not one of 0, 1, true, false")
        return env in ("1", "true")
    return torch.are_deterministic_algorithms_enabled()


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _columns(BLOCK_D: tl.constexpr, HALF: tl.constexpr):
    """``arange(0, BLOCK_D)``; for 2-byte values written so the compiler sees runs of 4 contiguous columns
    (not 8): their loads become 8-byte vectors laid out like the 4 × fp32 (16-byte) atomics they feed,
    instead of 16-byte loads whose layout must be converted through shared memory (a round trip and two
    barriers per tile). The bytes read are the same; the atomics stay 16-byte vectors."""
    dd = tl.arange(0, BLOCK_D)
    if HALF:
        dd = (dd // 4) * 4 + dd % 4
    return dd


@triton.jit
def _row_validity(x0, v_row, row_mask, dd, Ds, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Per row of a tile: the fp32 squared norm over all Ds columns is finite. ``x0`` is the loaded first
    chunk (columns ``[0, BLOCK_D)``); further chunks (Ds > BLOCK_D) are loaded again here."""
    xf = x0.to(tl.float32)
    sq = tl.sum(xf * xf, axis=1)
    if not EVEN_D:
        for d0 in range(BLOCK_D, Ds, BLOCK_D):
            cols = d0 + dd
            x = tl.load(v_row[:, None] + cols[None, :], mask=row_mask[:, None] & (cols < Ds)[None, :], other=0.0)
            x = x.to(tl.float32)
            sq += tl.sum(x * x, axis=1)
    return sq < float("inf")  # False for +inf and NaN


@triton.jit
def _scatter_kernel(
    v_ptr,  # [N, M, Ds] values, any float dtype
    codes_ptr,  # [N, M] int32, -1 (or anything outside [0, K)) = no codeword
    sums_ptr,  # [M, K, Ds] fp32, zero-initialised, atomically accumulated
    counts_ptr,  # [M, K] fp32, zero-initialised (STATS only)
    NM,  # N·M flat rows
    n_tiles,  # cdiv(NM, BLOCK_R)
    M,
    K,
    Ds,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,  # Ds == BLOCK_D: the row stride is a compile-time constant (16-byte vectors)
    STATS: tl.constexpr,  # counts, and skip rows whose fp32 squared norm is not finite
    HALF: tl.constexpr,  # 2-byte values (see _columns)
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if EVEN_D:
        DS = BLOCK_D
    else:
        DS = Ds
    i = tl.arange(0, BLOCK_R)
    dd = _columns(BLOCK_D, HALF)
    d_mask = dd < DS
    # The launcher makes the grid stride nprog·BLOCK_R a multiple of M (or gives every program a single
    # tile), so row i of every tile of this program has the same subspace: one 32-bit remainder per row
    # and program, none in the loop.
    m_off = ((pid * BLOCK_R + i) % M) * K
    for tile in range(pid, n_tiles, nprog):
        r0 = tl.cast(tile, tl.int64) * BLOCK_R
        r_mask = i < NM - r0
        code = tl.load(codes_ptr + r0 + i, mask=r_mask, other=-1)
        # Every row of the tile is loaded (a row with an out-of-range code too: no load waits on a code),
        # but only rows with a codeword (and, for statistics, a finite norm) reach an atomic.
        v_row = v_ptr + r0 * DS + i * DS
        x = tl.load(v_row[:, None] + dd[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        ok = r_mask & (code >= 0) & (code < K)
        if STATS:
            ok = ok & _row_validity(x, v_row, r_mask, dd, Ds, BLOCK_D, EVEN_D)
        dst = (m_off + code) * DS
        tl.atomic_add(
            sums_ptr + dst[:, None] + dd[None, :],
            x.to(sums_ptr.dtype.element_ty),
            mask=ok[:, None] & d_mask[None, :],
            sem="relaxed",
        )
        if not EVEN_D:
            for d0 in range(BLOCK_D, Ds, BLOCK_D):
                cols = d0 + dd
                c_mask = ok[:, None] & (cols < Ds)[None, :]
                xc = tl.load(v_row[:, None] + cols[None, :], mask=c_mask, other=0.0)
                tl.atomic_add(
                    sums_ptr + dst[:, None] + cols[None, :], xc.to(sums_ptr.dtype.element_ty), mask=c_mask, sem="relaxed"
                )
        if STATS:
            tl.atomic_add(counts_ptr + m_off + code, tl.full([BLOCK_R], 1.0, tl.float32), mask=ok, sem="relaxed")


@triton.jit
def _sorted_kernel(
    v_ptr,  # [N·M, Ds] values (flat rows)
    perm_ptr,  # [N·M] int64: flat rows stably sorted by m·K + code
    bounds_ptr,  # [M·K + 1] int64: segment s = m·K + k is perm[bounds[s] : bounds[s + 1]]
    sums_ptr,  # [M, K, Ds] fp32 or fp64, written (no initialisation needed)
    counts_ptr,  # [M, K] fp32, written (STATS only)
    Ds,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STATS: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)  # segment m·K + k
    d_tile = tl.program_id(1)
    i = tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    cols = d_tile * BLOCK_D + dd
    c_mask = cols < Ds
    start = tl.load(bounds_ptr + s)
    end = tl.load(bounds_ptr + s + 1)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=sums_ptr.dtype.element_ty)
    cnt = tl.zeros([BLOCK_R], dtype=tl.int32)
    for j0 in range(start, end, BLOCK_R):
        j_mask = i < end - j0
        row = tl.load(perm_ptr + j0 + i, mask=j_mask, other=0)
        v_row = v_ptr + row * Ds
        x = tl.load(v_row[:, None] + cols[None, :], mask=j_mask[:, None] & c_mask[None, :], other=0.0)
        ok = j_mask
        if STATS:
            if d_tile == 0:
                x0 = x
            else:
                x0 = tl.load(v_row[:, None] + dd[None, :], mask=j_mask[:, None] & (dd < Ds)[None, :], other=0.0)
            ok = ok & _row_validity(x0, v_row, j_mask, dd, Ds, BLOCK_D, False)
            cnt += ok.to(tl.int32)
        # A select, not a product: an invalid row's NaN/inf never meets the accumulator.
        acc += tl.where(ok[:, None], x.to(acc.dtype), 0.0)
    tl.store(sums_ptr + s * Ds + cols, tl.sum(acc, axis=0), mask=c_mask)
    if STATS:
        if d_tile == 0:
            tl.store(counts_ptr + s, tl.sum(cnt, axis=0).to(tl.float32))


# --------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class SegmentSumConfig:
    dtype: torch.dtype  # of the summed values (float64: gradients, summed in float64)
    stats: bool  # counts + skip invalid rows (statistics) | plain sums (gather backward)
    sorted: bool = False  # deterministic sorted segmented sum | atomic scatter
    even_d: bool = False  # Ds == BLOCK_D (scatter only): compile-time row stride, no column mask
    BLOCK_D: int = 32
    BLOCK_R: int = 64
    num_warps: int = 4

    @property
    def half(self) -> bool:
        return self.dtype in (torch.float16, torch.bfloat16)

    def describe(self) -> str:
        kind = "sorted" if self.sorted else "scatter"
        d = f"Ds={self.BLOCK_D}" if self.even_d else f"BLOCK_D={self.BLOCK_D}"
        return (
            f"segment_sum_{kind}[{C.TRITON_TYPE[self.dtype]},{'stats' if self.stats else 'grad'}] "
            f"BLOCK_R={self.BLOCK_R} {d} warps={self.num_warps}"
        )


_BLOCK_D = 32  # one chunk of a row; Ds = 32 (the EQUSS width) is the compile-time-stride variant
_SCATTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scatter_rows(even_d: bool) -> int:
    # Ds = 32: 64 rows (four 16-byte fp32 / 8-byte half loads and four 16-byte atomics per thread with 4
    # warps; with 128 rows Triton moves the codes into the rows' layout through shared memory). Any other
    # Ds: 32 rows, since a runtime row stride that is not a multiple of 16 leaves every element its own
    # 64-bit address (150-220 registers at 64 rows).
    return 64 if even_d else 32


def _sorted_config(dtype: torch.dtype, stats: bool) -> SegmentSumConfig:
    return SegmentSumConfig(dtype, stats, sorted=True, BLOCK_R=32)


CONFIGS: tuple[SegmentSumConfig, ...] = tuple(
    SegmentSumConfig(dtype, stats, even_d=even, BLOCK_R=_scatter_rows(even))
    for dtype in _SCATTER_DTYPES
    for stats in (False, True)
    for even in (True, False)
) + tuple(_sorted_config(dtype, stats) for dtype in _SCATTER_DTYPES for stats in (False, True)) + (
    _sorted_config(torch.float64, False),
)


def pick_config(dtype: torch.dtype, Ds: int, stats: bool = True, deterministic: bool = False) -> SegmentSumConfig:
    """The configuration :func:`segment_sum_triton` launches for values of ``dtype`` (float64 gradients:
    the sorted kernel in float64; float64 statistics are summed as float32)."""
    if dtype == torch.float64:
        if stats:
            dtype = torch.float32
        else:
            return _sorted_config(torch.float64, False)
    if deterministic:
        return _sorted_config(dtype, stats)
    return SegmentSumConfig(dtype, stats, even_d=Ds == _BLOCK_D, BLOCK_R=_scatter_rows(Ds == _BLOCK_D))


def row_tile_programs(n_tiles: int, block_r: int, M: int, target: int) -> int:
    """Grid size for a grid-stride loop over ``n_tiles`` tiles of ``block_r`` flat rows ``r = n·M + m``.

    Either every program gets one tile (``n_tiles`` programs), or the stride ``programs·block_r`` is a
    multiple of ``M``, so that row ``i`` of all the tiles of one program lies in the same subspace (the
    kernels compute ``m`` once per row and program). ``target`` is the wanted number of programs.
    """
    q = M // math.gcd(M, block_r)  # programs must come in multiples of q
    programs = max(1, target) // q * q or q  # at most target unless q itself is larger
    return max(1, min(n_tiles, programs))


# Programs per SM of the grid-stride scatter: all of them resident at once (no partial second wave), which
# 8 programs × 4 warps are whenever the kernel needs ≤ 64 registers per thread (sm_90: 30-56 for the
# Ds = 32 variants; scripts/triton_resources.py). 32 warps per SM keep ≥ 32 KB of loads in flight, more
# than DRAM latency × bandwidth per SM (≈ 1000 cycles × 14.5 B/cycle).
_PROGRAMS_PER_SM = 8


def _segment_sum(
    v: torch.Tensor, codes: torch.Tensor, K: int, stats: bool, deterministic: bool | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    N, M, Ds = v.shape
    if v.dtype == torch.float64 and stats:
        v = v.float()
    v = v.contiguous()
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    cfg = pick_config(v.dtype, Ds, stats, resolve_deterministic(deterministic))
    if M * K * Ds >= 2**31:
        raise ValueError(f"equss.kernels: M·K·Ds = {M * K * Ds} must be below 2^31 (int32 offsets into the sums)")
    codes = as_int32_codes(codes, K)
    alloc = torch.empty if cfg.sorted else torch.zeros
    sums = alloc(M, K, Ds, dtype=acc, device=v.device)
    counts = alloc(M, K, dtype=torch.float32, device=v.device) if stats else None
    if N == 0:
        return sums.zero_(), counts.zero_() if stats else None
    if counts is not None:
        dummy = counts
    else:  # an fp32 pointer the kernel never touches (STATS=False), as the compiled signature has it
        dummy = sums if acc == torch.float32 else torch.empty(1, dtype=torch.float32, device=v.device)
    if cfg.sorted:
        key = torch.where(codes >= 0, codes + torch.arange(M, device=v.device, dtype=torch.int32) * K, -1)
        sorted_key, perm = torch.sort(key.reshape(-1), stable=True)
        bounds = torch.searchsorted(sorted_key, torch.arange(M * K + 1, device=v.device, dtype=torch.int32))
        C.check_grid_dim(triton.cdiv(Ds, cfg.BLOCK_D), 65535, "Ds chunks (grid axis 1)")
        _sorted_kernel[(M * K, triton.cdiv(Ds, cfg.BLOCK_D))](
            v,
            perm,
            bounds,
            sums,
            dummy,
            Ds,
            BLOCK_R=cfg.BLOCK_R,
            BLOCK_D=cfg.BLOCK_D,
            STATS=stats,
            num_warps=cfg.num_warps,
        )
    else:
        n_tiles = triton.cdiv(N * M, cfg.BLOCK_R)
        grid = (row_tile_programs(n_tiles, cfg.BLOCK_R, M, _PROGRAMS_PER_SM * C.sm_count(v.device)),)
        _scatter_kernel[grid](
            v,
            codes,
            sums,
            dummy,
            N * M,
            n_tiles,
            M,
            K,
            Ds,
            BLOCK_R=cfg.BLOCK_R,
            BLOCK_D=cfg.BLOCK_D,
            EVEN_D=cfg.even_d,
            STATS=stats,
            HALF=cfg.half,
            num_warps=cfg.num_warps,
        )
    return sums, counts


def segment_sum_triton(
    v: torch.Tensor, codes: torch.Tensor, K: int, with_counts: bool, *, deterministic: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sums[m, k] = Σ_{n: codes[n,m]=k} v[n, m]`` (``[M, K, Ds]`` fp32) and optionally ``counts [M, K]`` fp32.

    ``v [N, M, Ds]`` in any float dtype (float64 is summed as float32, like the reference); ``codes
    [N, M]`` int32/int64. Codes outside ``[0, K)`` contribute nothing. ``with_counts=True`` is the
    statistics mode: rows whose fp32 squared norm is not finite enter neither sums nor counts.
    ``deterministic``: the sorted kernel (module docstring); ``None`` asks :func:`resolve_deterministic`.
    """
    if v.dtype == torch.float64:
        v = v.float()
    return _segment_sum(v, codes, int(K), bool(with_counts), deterministic)


def compile_spec(cfg: SegmentSumConfig) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile`` of ``cfg``."""
    acc = "fp64" if cfg.dtype == torch.float64 else "fp32"
    if cfg.sorted:
        return C.aot_spec(
            _sorted_kernel,
            pointers={
                "v_ptr": C.TRITON_TYPE[cfg.dtype],
                "perm_ptr": "i64",
                "bounds_ptr": "i64",
                "sums_ptr": acc,
                "counts_ptr": "fp32",
            },
            floats=(),
            constexprs={"BLOCK_R": cfg.BLOCK_R, "BLOCK_D": cfg.BLOCK_D, "STATS": cfg.stats},
            options={"num_warps": cfg.num_warps},
        )
    return C.aot_spec(
        _scatter_kernel,
        pointers={"v_ptr": C.TRITON_TYPE[cfg.dtype], "codes_ptr": "i32", "sums_ptr": acc, "counts_ptr": "fp32"},
        floats=(),
        constexprs={
            "BLOCK_R": cfg.BLOCK_R,
            "BLOCK_D": cfg.BLOCK_D,
            "EVEN_D": cfg.even_d,
            "STATS": cfg.stats,
            "HALF": cfg.half,
        },
        options={"num_warps": cfg.num_warps},
    )

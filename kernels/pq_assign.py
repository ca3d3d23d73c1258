"""Triton PQ assignment: nearest codeword per row and subspace, the N×M×K distances never leave registers.

One program handles ``BLOCK_N`` rows of one subspace ``m``: it keeps its rows' sub-vectors in registers,
walks the codebook in ``BLOCK_K``-codeword tiles, computes each tile's distances with one ``tl.dot``
(``||c||² − 2 x·c`` for ``l2``, ``−x·c`` for ``dot``; ``||x||²`` is added once at the end) and folds the
tile's minimum into a running min/argmin. The fused variant (``pq_assign_gather_triton``) then gathers the chosen codeword (from the
same or another codebook tensor) and writes it and ``||x − q||²`` in the same launch.

Conventions (shared with :mod:`equss.ops.reference`): int32 codes; ties → lowest index (within a tile
``tl.min(..., return_indices=True)`` keeps the first minimum; across tiles a later tile only wins with a
strictly smaller distance); invalid codewords (non-finite ``||c||²``) get a +inf bias and NaN distances
become +inf, so neither can win; invalid rows get code 0 and ``min_dist`` NaN.

Shapes: ``x [N, M, Ds]``, ``codebooks [M, K, Ds]``, ``codes / min_dist [N, M]``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C
from equss.kernels.pq_segment_sum import segment_sum_triton

__all__ = ["AssignConfig", "CONFIGS", "pick_config", "pq_assign_triton", "pq_assign_gather_triton", "compile_spec"]


@triton.jit
def _pq_assign_kernel(
    x_ptr,  # [N, M, Ds]
    cb_ptr,  # [M, K, Ds]   codebooks used for the distances
    cbo_ptr,  # [M, K, Ds]  codebooks gathered into q (FUSED only; same dtype as cb)
    codes_ptr,  # [N, M] int32
    dist_ptr,  # [N, M] fp32
    q_ptr,  # [N, M, Ds]    (FUSED only)
    err_ptr,  # [N, M] fp32 ||x - q||² (FUSED only)
    N,
    M,
    K,
    Ds,
    l2_weight,  # fp32: 1.0 for "l2", 0.0 for "dot" (a runtime scalar halves the compiled variants)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_LOOP: tl.constexpr,  # Ds > BLOCK_D: loop over Ds chunks instead of keeping x in registers
    PRECISION: tl.constexpr,
    # Interpreter only: tl.dot runs as numpy matmul there, which neither rounds bf16 right nor gives
    # bit-identical results for identical codewords at different positions; an explicit fp32
    # product-and-sum does both (the GPU's FMA/MMA chains are identical per element by construction).
    EXACT_DOT: tl.constexpr,
    FUSED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    # int64 row offsets: N·M·Ds passes 2^31 at N ≈ 10^6 with D = 2048.
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    x_rows = x_ptr + rows * (M * Ds) + m * Ds
    cb_base = cb_ptr + m * K * Ds
    d = tl.arange(0, BLOCK_D)
    kk = tl.arange(0, BLOCK_K)

    if not D_LOOP:
        d_mask = d < Ds
        xt = tl.load(x_rows[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        xf = xt.to(tl.float32)
        x_sq = tl.sum(xf * xf, axis=1)
    else:
        x_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, Ds, BLOCK_D):
            dd = d0 + d
            xc = tl.load(
                x_rows[:, None] + dd[None, :], mask=row_mask[:, None] & (dd < Ds)[None, :], other=0.0
            )
            xc = xc.to(tl.float32)
            x_sq += tl.sum(xc * xc, axis=1)

    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kk
        k_mask = ks < K
        if not D_LOOP:
            ct = tl.load(
                cb_base + ks[:, None] * Ds + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0
            )
            cf = ct.to(tl.float32)
            c_sq = tl.sum(cf * cf, axis=1)
            if EXACT_DOT:
                dots = tl.sum(xf[:, None, :] * cf[None, :, :], axis=2)
            else:
                dots = tl.dot(xt, tl.trans(ct), input_precision=PRECISION)
        else:
            dots = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            c_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for d0 in range(0, Ds, BLOCK_D):
                dd = d0 + d
                dd_mask = dd < Ds
                xc = tl.load(
                    x_rows[:, None] + dd[None, :], mask=row_mask[:, None] & dd_mask[None, :], other=0.0
                )
                cc = tl.load(
                    cb_base + ks[:, None] * Ds + dd[None, :],
                    mask=k_mask[:, None] & dd_mask[None, :],
                    other=0.0,
                )
                ccf = cc.to(tl.float32)
                c_sq += tl.sum(ccf * ccf, axis=1)
                if EXACT_DOT:
                    dots += tl.sum(xc.to(tl.float32)[:, None, :] * ccf[None, :, :], axis=2)
                else:
                    dots = tl.dot(xc, tl.trans(cc), dots, input_precision=PRECISION)
        # Padded and invalid codewords (non-finite ||c||²) get +inf so they never win; with "dot",
        # dist = -2·x·c keeps the argmin and its ties (a power-of-two scale is exact) and is halved once
        # at the end.
        c_ok = k_mask & (c_sq == c_sq) & (c_sq < float("inf"))
        bias = tl.where(c_ok, l2_weight * c_sq, float("inf"))
        dist = bias[None, :] - 2.0 * dots
        # A NaN distance must never win: tl.min's combiner does not order NaN (and the interpreter's
        # np.nanargmin raises on all-NaN rows), so NaN becomes +inf first.
        dist = tl.where(dist != dist, float("inf"), dist)
        tile_best, tile_idx = tl.min(dist, axis=1, return_indices=True)
        better = tile_best < best  # strict: an equal distance in a later tile keeps the lower index
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, k0 + tile_idx.to(tl.int32), best_idx)

    if l2_weight != 0.0:
        md = best + x_sq
        md = tl.where(md < 0.0, 0.0, md)
    else:
        md = 0.5 * best
    # An invalid row (non-finite ||x||²) gets code 0 and min_dist NaN (equss/ops/reference.py).
    row_ok = (x_sq == x_sq) & (x_sq < float("inf"))
    best_idx = tl.where(row_ok, best_idx, 0)
    md = tl.where(row_ok, md, float("nan"))
    out = rows * M + m
    tl.store(codes_ptr + out, best_idx, mask=row_mask)
    tl.store(dist_ptr + out, md, mask=row_mask)

    if FUSED:
        q_src = cbo_ptr + (m * K + best_idx.to(tl.int64)) * Ds
        q_dst = q_ptr + rows * (M * Ds) + m * Ds
        if not D_LOOP:
            qt = tl.load(q_src[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            tl.store(q_dst[:, None] + d[None, :], qt, mask=row_mask[:, None] & d_mask[None, :])
            diff = xf - qt.to(tl.float32)
            err = tl.sum(diff * diff, axis=1)
        else:
            err = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, Ds, BLOCK_D):
                dd = d0 + d
                msk = row_mask[:, None] & (dd < Ds)[None, :]
                qc = tl.load(q_src[:, None] + dd[None, :], mask=msk, other=0.0)
                tl.store(q_dst[:, None] + dd[None, :], qc, mask=msk)
                xc = tl.load(x_rows[:, None] + dd[None, :], mask=msk, other=0.0).to(tl.float32)
                diff = xc - qc.to(tl.float32)
                err += tl.sum(diff * diff, axis=1)
        tl.store(err_ptr + out, err, mask=row_mask)


# ------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class AssignConfig:
    """One compiled variant of the assignment kernel (everything that is a constexpr or a type)."""

    dtype: torch.dtype  # of x, codebooks (and codebooks_out / quantized when fused)
    precision: str  # tl.dot input_precision (only differs from "ieee" for float32)
    fused: bool
    BLOCK_D: int
    D_LOOP: bool
    num_warps: int
    num_stages: int
    BLOCK_K: int
    BLOCK_N: int = 64

    def describe(self) -> str:
        return (
            f"assign[{C.TRITON_TYPE[self.dtype]},{self.precision},{'fused' if self.fused else 'plain'}] "
            f"BLOCK_N={self.BLOCK_N} BLOCK_K={self.BLOCK_K} BLOCK_D={self.BLOCK_D} D_LOOP={self.D_LOOP} "
            f"warps={self.num_warps} stages={self.num_stages}"
        )


# BLOCK_N = 64, BLOCK_K = 64 (32 in the Ds loop, below). fp32 products (FMA "ieee" and the split tf32 forms) hold more operand registers
# than the half-precision tensor-core path: with 4 warps they used 200-255 registers per thread and
# spilled at BLOCK_D = 64, so fp32 runs 8 warps. The Ds-loop variant keeps a separate accumulator across
# its inner loop: it uses BLOCK_K = 32 and no software pipelining (num_stages=1); with BLOCK_K = 64 or
# pipelining it spilled on sm_80. A GPU session may refine these from measurements.
_D_VARIANTS = ((16, False), (32, False), (32, True))


def _launch_params(dtype: torch.dtype, d_loop: bool) -> tuple[int, int, int]:
    """(num_warps, num_stages, BLOCK_K)."""
    return (8 if dtype == torch.float32 else 4), (1 if d_loop else 2), (32 if d_loop else 64)


def _dtype_precisions() -> list[tuple[torch.dtype, str]]:
    return [(torch.float32, p) for p in C.PRECISIONS] + [(torch.float16, "ieee"), (torch.bfloat16, "ieee")]


CONFIGS: tuple[AssignConfig, ...] = tuple(
    AssignConfig(dtype, prec, fused, bd, loop, *_launch_params(dtype, loop))
    for (dtype, prec), fused, (bd, loop) in itertools.product(_dtype_precisions(), (False, True), _D_VARIANTS)
)


def pick_config(dtype: torch.dtype, Ds: int, precision: str, fused: bool) -> AssignConfig:
    """The configuration the launcher uses (always a member of :data:`CONFIGS`)."""
    bd = C.block_d(Ds)
    loop = Ds > bd
    return AssignConfig(
        dtype, precision if dtype == torch.float32 else "ieee", fused, bd, loop, *_launch_params(dtype, loop)
    )


def compile_spec(cfg: AssignConfig) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile`` of ``cfg``."""
    t = C.TRITON_TYPE[cfg.dtype]
    return C.aot_spec(
        _pq_assign_kernel,
        pointers={"x_ptr": t, "cb_ptr": t, "cbo_ptr": t, "codes_ptr": "i32", "dist_ptr": "fp32", "q_ptr": t, "err_ptr": "fp32"},
        floats=("l2_weight",),
        constexprs=_constexprs(cfg, interpreted=False),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )


def _constexprs(cfg: AssignConfig, interpreted: bool) -> dict:
    """Constexpr arguments of ``cfg``; the interpreter-only workarounds are off for GPU compilation."""
    return {
        "BLOCK_N": cfg.BLOCK_N,
        "BLOCK_K": cfg.BLOCK_K,
        "BLOCK_D": cfg.BLOCK_D,
        "D_LOOP": cfg.D_LOOP,
        "PRECISION": cfg.precision,
        "FUSED": cfg.fused,
        "EXACT_DOT": interpreted,
    }


# ---------------------------------------------------------------------------------------- launchers
def _launch(x, codebooks, metric, codebooks_out, precision, fused):
    N, M, Ds = x.shape
    K = codebooks.shape[1]
    C.check_grid_dim(M, 65535, "M (subspaces, grid axis 1)")
    cfg = pick_config(x.dtype, Ds, precision, fused)
    codes = torch.empty(N, M, dtype=torch.int32, device=x.device)
    min_dist = torch.empty(N, M, dtype=torch.float32, device=x.device)
    if fused:
        q = torch.empty(N, M, Ds, dtype=codebooks_out.dtype, device=x.device)
        err = torch.empty(N, M, dtype=torch.float32, device=x.device)
    else:  # unused pointers: pass tensors of the right types so both variants share one signature
        codebooks_out, q, err = codebooks, x, min_dist
    grid = (triton.cdiv(N, cfg.BLOCK_N), M)
    _pq_assign_kernel[grid](
        x,
        codebooks,
        codebooks_out,
        codes,
        min_dist,
        q,
        err,
        N,
        M,
        K,
        Ds,
        1.0 if metric == "l2" else 0.0,
        **_constexprs(cfg, interpreted=x.device.type != "cuda"),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return codes, min_dist, q, err


def pq_assign_triton(
    x: torch.Tensor, codebooks: torch.Tensor, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``equss::pq_assign`` (inputs validated and contiguous by :mod:`equss.ops`).

    Args:
        x: ``[N, M, Ds]`` float16/bfloat16/float32/float64.
        codebooks: ``[M, K, Ds]`` (promoted with ``x`` to a common dtype; float64 runs as float32, like
            the reference).
        metric: ``"l2"`` or ``"dot"``.

    Returns:
        ``codes [N, M]`` int32 and ``min_dist [N, M]`` float32. The fp32 matmul precision comes from
        ``$EQUSS_TRITON_PRECISION`` (default ``ieee``, see :mod:`equss.kernels._config`).
    """
    x, codebooks = _common_dtype(x, codebooks)
    codes, min_dist, _, _ = _launch(x, codebooks, metric, None, C.resolve_precision(None), fused=False)
    return codes, min_dist


def _common_dtype(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(x.dtype, codebooks.dtype)
    dtype = torch.float32 if dtype == torch.float64 else dtype
    return x.to(dtype).contiguous(), codebooks.to(dtype).contiguous()


def pq_assign_gather_triton(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    codebooks_out: torch.Tensor,
    metric: str,
    stats_x: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of ``equss::pq_assign_gather`` (semantics: ``pq_assign_gather_ref``).

    Assignment, gather and squared error in one launch: ``codes, min_dist`` as :func:`pq_assign_triton`,
    ``quantized [N, M, Ds] = codebooks_out[m, codes]`` (bit-exact) and ``sq_err [N, M]`` are written by the
    program that chose the codes, so x is read from memory once. The statistics (``counts [M, K]``, and
    ``sums [M, K, Ds]`` of ``stats_x``) come from :func:`~equss.kernels.pq_segment_sum.segment_sum_triton`.
    ``x``, ``codebooks`` and ``codebooks_out`` share one dtype among float16/bfloat16/float32.
    """
    N, M, Ds = x.shape
    K = codebooks.shape[1]
    if x.dtype == torch.float64:
        # fp64 assigns in fp32 like the reference; the fp64 codewords are gathered bit-exactly.
        from equss.kernels.pq_gather import pq_gather_triton

        codes, min_dist = pq_assign_triton(x, codebooks, metric)
        q = pq_gather_triton(codes, codebooks_out)
        err = (x - q).square().sum(-1).float()
    else:
        codes, min_dist, q, err = _launch(x, codebooks, metric, codebooks_out, C.resolve_precision(None), fused=True)
    keep = ~torch.isnan(min_dist)  # the valid rows of x
    if stats_x is None:
        src, sums_width = x, 0
    else:
        src, sums_width = stats_x, Ds
        keep = keep & torch.isfinite(stats_x.float().square().sum(-1))  # valid rows of stats_x
    sums, counts = segment_sum_triton(src, torch.where(keep, codes, -1), K, with_counts=True)
    if stats_x is None:
        sums = sums[..., :sums_width]
    return codes, min_dist, q, err, counts, sums

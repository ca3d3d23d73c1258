"""Triton PQ assignment: nearest codeword per row and subspace, the N×M×K distances never leave registers.

One program handles ``BLOCK_N`` rows of one subspace ``m``: it keeps its rows' sub-vectors in registers,
walks the codebook in ``BLOCK_K``-codeword tiles, computes each tile's distances with one ``tl.dot``
(``||c||² − 2 x·c`` for ``l2``, ``−x·c`` for ``dot``; ``||x||²`` is added once at the end) and folds the
tile's minimum into a running min/argmin. The fused variant then gathers the chosen codeword (from the
same or another codebook tensor) and writes it and ``||x − q||²`` in the same launch.

Conventions (shared with :mod:`equss.ops.reference`): int32 codes; ties → lowest index (within a tile
``tl.min(..., return_indices=True)`` keeps the first minimum; across tiles a later tile only wins with a
strictly smaller distance); rows holding NaN/inf keep an in-range code (the running argmin starts at 0
and only a strictly smaller, hence non-NaN, distance of a real codeword replaces it) and get a
non-finite ``min_dist``.

Shapes: ``x [N, M, Ds]``, ``codebooks [M, K, Ds]``, ``codes / min_dist [N, M]``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C

__all__ = ["AssignConfig", "CONFIGS", "pick_config", "pq_assign", "pq_assign_fused", "compile_spec"]


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
    UPCAST: tl.constexpr,  # interpreter only: bf16 tl.dot is wrong there, compute it in fp32
    FUSED: tl.constexpr,
    NAN_TO_INF: tl.constexpr,  # interpreter only: its min-with-index is np.nanargmin, which raises on all-NaN rows
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
        if UPCAST:
            xt = xf
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
            if UPCAST:
                ct = cf
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
                if UPCAST:
                    xc = xc.to(tl.float32)
                    cc = ccf
                dots = tl.dot(xc, tl.trans(cc), dots, input_precision=PRECISION)
        # Padded codewords get +inf so they never win; with "dot", dist = -2·x·c keeps the argmin and its
        # ties (a power-of-two scale is exact) and is halved once at the end.
        bias = tl.where(k_mask, l2_weight * c_sq, float("inf"))
        dist = bias[None, :] - 2.0 * dots
        if NAN_TO_INF:
            # On GPU the argmin combiner never prefers a NaN (NaN < v is false), so a NaN distance
            # cannot win there either; this only makes the interpreter behave the same way.
            dist = tl.where(dist != dist, float("inf"), dist)
        tile_best, tile_idx = tl.min(dist, axis=1, return_indices=True)
        better = tile_best < best  # strict: an equal distance in a later tile keeps the lower index
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, k0 + tile_idx.to(tl.int32), best_idx)

    if l2_weight != 0.0:
        md = best + x_sq
        md = tl.where(md < 0.0, 0.0, md)  # not tl.maximum: it would turn a NaN row's NaN into 0
    else:
        md = 0.5 * best
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
    signature = {
        "x_ptr": f"*{t}",
        "cb_ptr": f"*{t}",
        "cbo_ptr": f"*{t}",
        "codes_ptr": "*i32",
        "dist_ptr": "*fp32",
        "q_ptr": f"*{t}",
        "err_ptr": "*fp32",
        "N": "i32",
        "M": "i32",
        "K": "i32",
        "Ds": "i32",
        "l2_weight": "fp32",
    }
    constexprs = _constexprs(cfg, interpreted=False)
    signature.update({name: "constexpr" for name in constexprs})
    return (
        _pq_assign_kernel,
        signature,
        constexprs,
        {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
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
        "UPCAST": interpreted and cfg.dtype == torch.bfloat16,
        "NAN_TO_INF": interpreted,
    }


# Last configuration each launcher used, for benchmarks' extra_info and debugging.
last_config: dict[str, AssignConfig] = {}


# ---------------------------------------------------------------------------------------- launchers
def _launch(x, codebooks, metric, codebooks_out, precision, fused):
    N, M, Ds = x.shape
    K = codebooks.shape[1]
    C.check_grid_dim(M, 65535, "M (subspaces, grid axis 1)")
    cfg = pick_config(x.dtype, Ds, precision, fused)
    last_config["pq_assign_fused" if fused else "pq_assign"] = cfg
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


def pq_assign(
    x: torch.Tensor, codebooks: torch.Tensor, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend entry of ``pq_assign`` (inputs already validated and contiguous by :mod:`equss.ops.pq`).

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


def pq_assign_fused(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    metric: str = "l2",
    codebooks_out: torch.Tensor | None = None,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assignment, gather and commitment partials in one launch (Triton only; no autograd).

    Equivalent to ``codes, min_dist = pq_assign(x, codebooks, metric)``,
    ``quantized = pq_gather(codes, codebooks_out)`` and ``sq_err = ((x − quantized)²).sum(-1)``, but x is
    read once and the N×M×Ds quantized tensor is written from the same program that chose the codes.

    Args:
        x: ``[N, M, Ds]`` float16/bfloat16/float32 (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        codebooks: ``[M, K, Ds]``, same dtype as ``x``; used for the distances (e.g. the l2-normalised
            codewords in EQUSS).
        metric: ``"l2"`` or ``"dot"``.
        codebooks_out: ``[M, K, Ds]`` same dtype, the codewords written to ``quantized`` (EQUSS outputs the
            raw, un-normalised codewords); defaults to ``codebooks``.
        precision: fp32 matmul precision ``"ieee"`` | ``"tf32x3"`` | ``"tf32"``; default
            ``$EQUSS_TRITON_PRECISION`` or ``"ieee"``. Ignored for half-precision inputs.

    Returns:
        ``codes [N, M]`` int32, ``min_dist [N, M]`` float32 (as :func:`pq_assign`),
        ``quantized [N, M, Ds]`` in the dtype of ``codebooks_out`` (bit-exact codewords) and
        ``sq_err [N, M]`` float32 ``= Σ_d (x − quantized)²`` accumulated in fp32: the commitment loss
        ``mse(x, q)`` is ``sq_err.sum() / x.numel()``.
    """
    from equss.ops import validation as V

    op = "pq_assign_fused"
    x, codebooks = V.check_x_codebooks(x, codebooks, op)
    metric = V.check_metric(metric, op)
    if codebooks_out is None:
        codebooks_out = codebooks
    codebooks_out = V.check_codebooks(codebooks_out, op)
    if codebooks_out.shape != codebooks.shape:
        raise ValueError(
            f"{op}: codebooks_out {tuple(codebooks_out.shape)} must match codebooks {tuple(codebooks.shape)}"
        )
    V.check_same_device(op, x=x, codebooks=codebooks, codebooks_out=codebooks_out)
    dtypes = {x.dtype, codebooks.dtype, codebooks_out.dtype}
    if len(dtypes) != 1 or x.dtype not in C.KERNEL_DTYPES:
        raise TypeError(
            f"{op}: x, codebooks and codebooks_out must share one dtype among float16/bfloat16/float32, got "
            f"{x.dtype}, {codebooks.dtype}, {codebooks_out.dtype} (for float64 use pq_assign + pq_gather)"
        )
    if x.device.type != "cuda" and not C.interpreted():
        raise RuntimeError(
            f"{op}: Triton runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {x.device}"
        )
    precision = C.resolve_precision(precision)
    N, M, Ds = x.shape
    if N == 0:
        empty = x.new_empty(0, M)
        return empty.int(), empty.float(), codebooks_out.new_empty(0, M, Ds), empty.float()
    return _launch(
        x.contiguous(), codebooks.contiguous(), metric, codebooks_out.contiguous(), precision, fused=True
    )

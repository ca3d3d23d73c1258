"""The PQ ops as ``torch.library`` custom ops (namespace ``equss``) and their validated public wrappers.

Each custom op has a fake (shape) implementation, so ``torch.compile`` and ``torch.library.opcheck``
work, and picks its backend at call time (:mod:`equss.backends`). The public functions
(``pq_assign``, ``pq_gather``, ...) validate their arguments, promote ``x`` and ``codebooks`` to a
common float dtype and make inputs contiguous before calling the op, so backends only ever see
checked, contiguous tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from equss.backends import get_backend
from equss.ops import validation as V

__all__ = [
    "pq_assign",
    "pq_gather",
    "pq_cluster_stats",
    "pq_ema_apply_",
    "pq_ema_update_",
]


# ----------------------------------------------------------------------------------------------- assign
@torch.library.custom_op("equss::pq_assign", mutates_args=())
def _pq_assign_op(x: Tensor, codebooks: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    N, M, _ = x.shape
    if N == 0:
        return x.new_empty(0, M, dtype=torch.int32), x.new_empty(0, M, dtype=torch.float32)
    return get_backend(x.device).pq_assign(x, codebooks, metric)


@_pq_assign_op.register_fake
def _(x: Tensor, codebooks: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    N, M, _ = x.shape
    return x.new_empty(N, M, dtype=torch.int32), x.new_empty(N, M, dtype=torch.float32)


def _promote(x: Tensor, codebooks: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(x.dtype, codebooks.dtype)
    return x.to(dtype).contiguous(), codebooks.to(dtype).contiguous()


def pq_assign(x: Tensor, codebooks: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Nearest codeword of every row in every subspace, without materialising the N×M×K distances.

    Args:
        x: ``[N, M, Ds]`` float16/bfloat16/float32/float64 (any strides).
        codebooks: ``[M, K, Ds]``, same device; promoted with ``x`` to a common dtype.
        metric: ``"l2"``: ``||x − c||²``; ``"dot"``: ``−x·c`` (use with l2-normalised rows and codewords).

    Returns:
        ``codes [N, M]`` int32 in ``[0, K)`` (ties → lowest index) and ``min_dist [N, M]`` float32.
        Rows with NaN/inf get an in-range code and a non-finite ``min_dist``.
    """
    op = "pq_assign"
    x, codebooks = V.check_x_codebooks(x, codebooks, op)
    metric = V.check_metric(metric, op)
    x, codebooks = _promote(x, codebooks)
    return torch.ops.equss.pq_assign(x, codebooks, metric)


# ----------------------------------------------------------------------------------------------- gather
@torch.library.custom_op("equss::pq_gather", mutates_args=())
def _pq_gather_op(codes: Tensor, codebooks: Tensor) -> Tensor:
    N, M = codes.shape
    if N == 0:
        return codebooks.new_empty(0, M, codebooks.shape[2])
    return get_backend(codebooks.device).pq_gather(codes, codebooks)


@_pq_gather_op.register_fake
def _(codes: Tensor, codebooks: Tensor) -> Tensor:
    return codebooks.new_empty(codes.shape[0], codes.shape[1], codebooks.shape[2])


@torch.library.custom_op("equss::pq_gather_backward", mutates_args=())
def _pq_gather_backward_op(grad_out: Tensor, codes: Tensor, K: int) -> Tensor:
    N, M, Ds = grad_out.shape
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    if N == 0:
        return grad_out.new_zeros(M, K, Ds, dtype=acc)
    return get_backend(grad_out.device).pq_gather_backward(grad_out, codes, K)


@_pq_gather_backward_op.register_fake
def _(grad_out: Tensor, codes: Tensor, K: int) -> Tensor:
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    return grad_out.new_empty(grad_out.shape[1], K, grad_out.shape[2], dtype=acc)


def _gather_setup_context(ctx, inputs, output) -> None:
    codes, codebooks = inputs
    ctx.save_for_backward(codes)
    ctx.K = codebooks.shape[1]
    ctx.codebooks_dtype = codebooks.dtype


def _gather_backward(ctx, grad_out: Tensor):
    (codes,) = ctx.saved_tensors
    grad_codebooks = None
    if ctx.needs_input_grad[1]:
        grad = torch.ops.equss.pq_gather_backward(grad_out.contiguous(), codes, ctx.K)
        grad_codebooks = grad.to(ctx.codebooks_dtype)
    return None, grad_codebooks


torch.library.register_autograd("equss::pq_gather", _gather_backward, setup_context=_gather_setup_context)


def pq_gather(codes: Tensor, codebooks: Tensor, *, check_range: bool = True) -> Tensor:
    """Quantized vectors ``out[n, m] = codebooks[m, codes[n, m]]``; differentiable w.r.t. ``codebooks``.

    Args:
        codes: ``[N, M]`` int32/int64.
        codebooks: ``[M, K, Ds]`` float.
        check_range: raise ``IndexError`` for codes outside ``[0, K)`` (one reduction, a device sync on
            CUDA). Codes straight from :func:`pq_assign` are always in range, so hot loops may pass
            ``False``; backends still never read out of bounds.

    Returns:
        ``[N, M, Ds]`` in the dtype of ``codebooks``, bit-exact copies of the codewords. The backward
        pass scatter-adds the output gradient into ``[M, K, Ds]`` (fp32 accumulation).
    """
    op = "pq_gather"
    codebooks = V.check_codebooks(codebooks, op)
    codes = V.check_codes(codes, op, M=codebooks.shape[0])
    V.check_same_device(op, codes=codes, codebooks=codebooks)
    if check_range:
        V.check_codes_range(codes, codebooks.shape[1], op)
    return torch.ops.equss.pq_gather(codes.contiguous(), codebooks.contiguous())


# ---------------------------------------------------------------------------------------- EMA update
@torch.library.custom_op("equss::pq_cluster_stats", mutates_args=())
def _pq_cluster_stats_op(x: Tensor, codes: Tensor, K: int) -> tuple[Tensor, Tensor]:
    N, M, Ds = x.shape
    if N == 0:
        return x.new_zeros(M, K, dtype=torch.float32), x.new_zeros(M, K, Ds, dtype=torch.float32)
    return get_backend(x.device).pq_cluster_stats(x, codes, K)


@_pq_cluster_stats_op.register_fake
def _(x: Tensor, codes: Tensor, K: int) -> tuple[Tensor, Tensor]:
    _, M, Ds = x.shape
    return x.new_empty(M, K, dtype=torch.float32), x.new_empty(M, K, Ds, dtype=torch.float32)


@torch.library.custom_op("equss::pq_ema_apply_", mutates_args=("cluster_size", "embed_sum", "codebooks"))
def _pq_ema_apply_op(
    counts: Tensor, sums: Tensor, cluster_size: Tensor, embed_sum: Tensor, codebooks: Tensor, decay: float, eps: float
) -> None:
    get_backend(codebooks.device).pq_ema_apply_(counts, sums, cluster_size, embed_sum, codebooks, decay, eps)


@_pq_ema_apply_op.register_fake
def _(counts, sums, cluster_size, embed_sum, codebooks, decay, eps) -> None:
    return None


@torch.library.custom_op("equss::pq_ema_update_", mutates_args=("cluster_size", "embed_sum", "codebooks"))
def _pq_ema_update_op(
    x: Tensor, codes: Tensor, cluster_size: Tensor, embed_sum: Tensor, codebooks: Tensor, decay: float, eps: float
) -> Tensor:
    K = codebooks.shape[1]
    backend = get_backend(x.device)
    if x.shape[0] == 0:
        counts = x.new_zeros(x.shape[1], K, dtype=torch.float32)
        sums = x.new_zeros(x.shape[1], K, x.shape[2], dtype=torch.float32)
    else:
        counts, sums = backend.pq_cluster_stats(x, codes, K)
    backend.pq_ema_apply_(counts, sums, cluster_size, embed_sum, codebooks, decay, eps)
    return counts


@_pq_ema_update_op.register_fake
def _(x, codes, cluster_size, embed_sum, codebooks, decay, eps) -> Tensor:
    return x.new_empty(codebooks.shape[0], codebooks.shape[1], dtype=torch.float32)


def _check_stats_inputs(x: Tensor, codes: Tensor, K: int, op: str, check_range: bool) -> tuple[Tensor, Tensor]:
    x = V.check_float(x, "x", op)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [N, M, Ds], got shape {tuple(x.shape)}")
    codes = V.check_codes(codes, op, N=x.shape[0], M=x.shape[1])
    V.check_same_device(op, x=x, codes=codes)
    if int(K) < 1:
        raise ValueError(f"{op}: K must be >= 1, got {K}")
    if check_range:
        V.check_codes_range(codes, int(K), op)
    return x.contiguous(), codes.contiguous()


def pq_cluster_stats(x: Tensor, codes: Tensor, K: int, *, check_range: bool = True) -> tuple[Tensor, Tensor]:
    """Per-codeword counts and sums of the rows assigned to each codeword this step.

    Args:
        x: ``[N, M, Ds]`` float.
        codes: ``[N, M]`` int32/int64 in ``[0, K)``.
        K: codewords per codebook.
        check_range: raise ``IndexError`` for codes outside ``[0, K)`` (a device sync on CUDA; codes from
            :func:`pq_assign` are always in range, so hot loops may pass ``False``).

    Returns:
        ``counts [M, K]`` and ``sums [M, K, Ds]``, both float32. All-reduce these across ranks before
        :func:`pq_ema_apply_` when training data-parallel.
    """
    x, codes = _check_stats_inputs(x, codes, K, "pq_cluster_stats", check_range)
    return torch.ops.equss.pq_cluster_stats(x, codes, int(K))


def _check_ema_buffers(cluster_size, embed_sum, codebooks, decay, eps, op) -> tuple[int, int, int]:
    codebooks = V.check_codebooks(codebooks, op)
    M, K, Ds = codebooks.shape
    V.check_buffer(cluster_size, "cluster_size", (M, K), op)
    V.check_buffer(embed_sum, "embed_sum", (M, K, Ds), op)
    V.check_buffer(codebooks, "codebooks", (M, K, Ds), op, fp32=False)
    V.check_same_device(op, cluster_size=cluster_size, embed_sum=embed_sum, codebooks=codebooks)
    V.check_ema_scalars(decay, eps, op)
    return M, K, Ds


def pq_ema_apply_(
    counts: Tensor,
    sums: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    codebooks: Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> None:
    """EMA of step statistics, Laplace smoothing and codebook renormalisation, in place.

    See :func:`equss.ops.reference.pq_ema_apply_ref_` for the exact update. ``counts [M, K]`` and
    ``sums [M, K, Ds]`` (float32) come from :func:`pq_cluster_stats` (all-reduced when distributed);
    ``cluster_size [M, K]`` and ``embed_sum [M, K, Ds]`` are contiguous float32 buffers and
    ``codebooks [M, K, Ds]`` a contiguous float buffer, all updated in place.
    """
    op = "pq_ema_apply_"
    M, K, Ds = _check_ema_buffers(cluster_size, embed_sum, codebooks, decay, eps, op)
    V.check_buffer(counts, "counts", (M, K), op)
    V.check_buffer(sums, "sums", (M, K, Ds), op)
    V.check_same_device(op, counts=counts, sums=sums, codebooks=codebooks)
    torch.ops.equss.pq_ema_apply_(counts, sums, cluster_size, embed_sum, codebooks, float(decay), float(eps))


def pq_ema_update_(
    x: Tensor,
    codes: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    codebooks: Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
    *,
    check_range: bool = True,
) -> Tensor:
    """One EMA codebook step in place: :func:`pq_cluster_stats` then :func:`pq_ema_apply_`.

    Args:
        x: ``[N, M, Ds]`` the vectors that were assigned (the EQUSS code sums un-normalised x).
        codes: ``[N, M]`` their codes.
        cluster_size, embed_sum, codebooks: buffers as in :func:`pq_ema_apply_`.
        decay: EMA decay (EQUSS: 0.99). eps: Laplace smoothing (EQUSS: 1e-5).
        check_range: as in :func:`pq_cluster_stats`.

    Returns:
        This step's counts ``[M, K]`` float32 (a count of 0 marks a code unused this step).
    """
    op = "pq_ema_update_"
    M, K, Ds = _check_ema_buffers(cluster_size, embed_sum, codebooks, decay, eps, op)
    x, codes = _check_stats_inputs(x, codes, K, op, check_range)
    if x.shape[1:] != (M, Ds):
        raise ValueError(f"{op}: x [N, M, Ds] = {tuple(x.shape)} does not match codebooks {tuple(codebooks.shape)}")
    V.check_same_device(op, x=x, codebooks=codebooks)
    return torch.ops.equss.pq_ema_update_(x, codes, cluster_size, embed_sum, codebooks, float(decay), float(eps))

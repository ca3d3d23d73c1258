"""``equss::pq_assign_gather``: the fused training forward of a PQ layer (custom op, fake, autograd, wrapper).

One call gives what a quantizer needs per step: the codes and their distances, the quantized vectors
gathered from a second codebook tensor (EQUSS assigns with normalised codewords and outputs the raw
ones), the per-(row, subspace) squared error for the commitment loss, and the step's statistics (counts
for usage, and per-codeword sums for EMA codebooks). A backend that fuses it reads ``x`` from memory
once. Twin: :func:`equss.ops.reference.pq_assign_gather_ref`. Backends: ``kernels/pq_assign.py``
(Triton) and the ext library. Tests: ``tests/test_pq_assign_gather.py``.

Autograd: ``quantized`` is differentiable w.r.t. ``codebooks_out`` (the gather's scatter-add backward);
the other outputs are marked non-differentiable (codes are discrete; the straight-through estimator and
the loss gradient belong to the layer, see :class:`equss.nn.ProductQuantizer`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from equss.backends import get_backend
from equss.ops import validation as V

__all__ = ["pq_assign_gather"]


def _empty_outputs(x: Tensor, codebooks: Tensor, codebooks_out: Tensor, stats_x: Tensor | None):
    N, M, Ds = x.shape
    K = codebooks.shape[1]
    return (
        x.new_empty(N, M, dtype=torch.int32),
        x.new_empty(N, M, dtype=torch.float32),
        codebooks_out.new_empty(N, M, Ds),
        x.new_empty(N, M, dtype=torch.float32),
        x.new_empty(M, K, dtype=torch.float32),
        x.new_empty(M, K, Ds if stats_x is not None else 0, dtype=torch.float32),
    )


@torch.library.custom_op("equss::pq_assign_gather", mutates_args=())
def _pq_assign_gather_op(
    x: Tensor, codebooks: Tensor, codebooks_out: Tensor, metric: str, stats_x: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if x.shape[0] == 0:
        out = _empty_outputs(x, codebooks, codebooks_out, stats_x)
        out[4].zero_()
        out[5].zero_()
        return out
    return get_backend(x.device).pq_assign_gather(x, codebooks, codebooks_out, metric, stats_x)


@_pq_assign_gather_op.register_fake
def _(x, codebooks, codebooks_out, metric, stats_x):
    return _empty_outputs(x, codebooks, codebooks_out, stats_x)


def _setup_context(ctx, inputs, output) -> None:
    _, codebooks, codebooks_out, _, _ = inputs
    codes, min_dist, _, sq_err, counts, sums = output
    ctx.mark_non_differentiable(codes, min_dist, sq_err, counts, sums)
    ctx.save_for_backward(codes)
    ctx.K = codebooks.shape[1]
    ctx.codebooks_out_dtype = codebooks_out.dtype


def _backward(ctx, grad_codes, grad_min_dist, grad_quantized, grad_sq_err, grad_counts, grad_sums):
    (codes,) = ctx.saved_tensors
    grad_out = None
    if ctx.needs_input_grad[2] and grad_quantized is not None:
        grad = torch.ops.equss.pq_gather_backward(grad_quantized.contiguous(), codes, ctx.K)
        grad_out = grad.to(ctx.codebooks_out_dtype)
    return None, None, grad_out, None, None


torch.library.register_autograd("equss::pq_assign_gather", _backward, setup_context=_setup_context)


def pq_assign_gather(
    x: Tensor,
    codebooks: Tensor,
    metric: str = "l2",
    *,
    codebooks_out: Tensor | None = None,
    stats_x: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Assign, gather, squared error and statistics of one PQ training step, in one op.

    Equivalent to ``codes, min_dist = pq_assign(x, codebooks, metric)``,
    ``quantized = pq_gather(codes, codebooks_out)``, ``sq_err = ((x − quantized)²).sum(-1)`` and the counts
    (and, with ``stats_x``, the sums) of :func:`pq_cluster_stats` over the valid rows.

    Args:
        x: ``[N, M, Ds]`` float, the vectors to assign.
        codebooks: ``[M, K, Ds]``, the codewords the distances use.
        metric: ``"l2"``: ``||x − c||²``; ``"dot"``: ``−x·c`` (l2-normalised rows and codewords).
        codebooks_out: ``[M, K, Ds]`` gathered into ``quantized`` (default: ``codebooks``); differentiable.
        stats_x: ``[N, M, Ds]`` vectors to sum per codeword (EMA codebooks), or ``None`` for counts only.

    Returns:
        ``codes [N, M]`` int32, ``min_dist [N, M]`` float32, ``quantized [N, M, Ds]`` (dtype of
        ``codebooks_out``), ``sq_err [N, M]`` float32, ``counts [M, K]`` float32 and ``sums [M, K, Ds]``
        float32 (``[M, K, 0]`` without ``stats_x``). Invalid rows (NaN/inf) get code 0, ``min_dist`` NaN and
        enter no count or sum (:mod:`equss.ops.reference`).
    """
    op = "pq_assign_gather"
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
    if stats_x is not None:
        stats_x = V.check_float(stats_x, "stats_x", op)
        if stats_x.shape != x.shape:
            raise ValueError(f"{op}: stats_x {tuple(stats_x.shape)} must have the shape of x {tuple(x.shape)}")
        V.check_same_device(op, x=x, stats_x=stats_x)
        stats_x = stats_x.contiguous()
    # One compute dtype for x and both codebook tensors (float64 stays float64 for the reference).
    dtype = torch.promote_types(torch.promote_types(x.dtype, codebooks.dtype), codebooks_out.dtype)
    return torch.ops.equss.pq_assign_gather(
        x.to(dtype).contiguous(), codebooks.to(dtype).contiguous(), codebooks_out.to(dtype).contiguous(), metric, stats_x
    )

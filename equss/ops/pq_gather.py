"""``equss::pq_gather`` and its backward ``equss::pq_gather_backward`` (custom ops, fakes, autograd, wrapper).

Twins: :func:`equss.ops.reference.pq_gather_ref`, :func:`~equss.ops.reference.pq_gather_backward_ref`.
Backends: ``kernels/pq_gather.py`` (Triton), ``csrc/cpu/pq_gather*.cpp`` and ``csrc/cuda/pq_gather*.cu``
(ext). Tests: ``tests/test_pq_gather.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from equss.backends import get_backend
from equss.ops import validation as V

__all__ = ["pq_gather"]


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

"""``equss::pq_assign``: nearest codeword per row and subspace (custom op, fake, public wrapper).

Twin: :func:`equss.ops.reference.pq_assign_ref`. Backends: ``kernels/pq_assign.py`` (Triton),
``csrc/cpu/pq_assign.cpp`` and ``csrc/cuda/pq_assign.cu`` (ext). Tests: ``tests/test_pq_assign.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from equss.backends import get_backend
from equss.ops import validation as V

__all__ = ["pq_assign", "promote"]


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


def promote(x: Tensor, codebooks: Tensor) -> tuple[Tensor, Tensor]:
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
    x, codebooks = promote(x, codebooks)
    return torch.ops.equss.pq_assign(x, codebooks, metric)

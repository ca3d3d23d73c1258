"""``equss::pq_cluster_stats``: per-codeword counts and sums of one step (custom op, fake, public wrapper).

Twin: :func:`equss.ops.reference.pq_cluster_stats_ref`. Backends: ``kernels/pq_cluster_stats.py``
(Triton), ``csrc/cpu/pq_cluster_stats.cpp`` and ``csrc/cuda/pq_cluster_stats.cu`` (ext). Tests:
``tests/test_pq_cluster_stats.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from equss.backends import get_backend
from equss.ops import validation as V

__all__ = ["pq_cluster_stats", "check_stats_inputs"]


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


def check_stats_inputs(x: Tensor, codes: Tensor, K: int, op: str, check_range: bool) -> tuple[Tensor, Tensor]:
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
    x, codes = check_stats_inputs(x, codes, K, "pq_cluster_stats", check_range)
    return torch.ops.equss.pq_cluster_stats(x, codes, int(K))

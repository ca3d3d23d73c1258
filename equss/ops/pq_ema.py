"""``equss::pq_ema_apply_`` and ``equss::pq_ema_update_``: the EMA codebook update, in place.

Twins: :func:`equss.ops.reference.pq_ema_apply_ref_`, :func:`~equss.ops.reference.pq_ema_update_ref_`.
Backends: ``kernels/pq_ema_apply.py`` (Triton), ``csrc/cpu/pq_ema_apply.cpp`` and
``csrc/cuda/pq_ema_apply.cu`` (ext); the statistics come from :mod:`equss.ops.pq_cluster_stats`.
Tests: ``tests/test_pq_ema.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from equss.backends import get_backend
from equss.ops import validation as V
from equss.ops.pq_cluster_stats import check_stats_inputs

__all__ = ["pq_ema_apply_", "pq_ema_update_"]


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
    x, codes = check_stats_inputs(x, codes, K, op, check_range)
    if x.shape[1:] != (M, Ds):
        raise ValueError(f"{op}: x [N, M, Ds] = {tuple(x.shape)} does not match codebooks {tuple(codebooks.shape)}")
    V.check_same_device(op, x=x, codebooks=codebooks)
    return torch.ops.equss.pq_ema_update_(x, codes, cluster_size, embed_sum, codebooks, float(decay), float(eps))

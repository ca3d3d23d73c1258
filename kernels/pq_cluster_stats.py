"""Triton EMA statistics: per-codeword counts ``[M, K]`` and sums ``[M, K, Ds]`` of the rows assigned to it.

A segment reduction by code with the kernel of :mod:`equss.kernels.pq_segment_sum` (an on-chip one-hot
``tl.dot``, one atomic add per program and output element; no one_hot tensor and no K×N matrix in
memory). Semantics: :func:`equss.ops.reference.pq_cluster_stats_ref`.
"""

from __future__ import annotations

import torch
from equss.kernels.pq_segment_sum import CONFIGS, compile_spec, segment_sum_triton

__all__ = ["CONFIGS", "compile_spec", "pq_cluster_stats_triton"]


def pq_cluster_stats_triton(x: torch.Tensor, codes: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``equss::pq_cluster_stats``: ``counts [M, K]`` and ``sums [M, K, Ds]``, both float32.

    Invalid rows (non-finite fp32 squared norm) enter neither: their code becomes -1, which matches no
    codeword in the segment sum.
    """
    valid = torch.isfinite(x.float().square().sum(-1))
    sums, counts = segment_sum_triton(x, torch.where(valid, codes, -1), int(K), with_counts=True)
    return counts, sums

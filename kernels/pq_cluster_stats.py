"""Triton EMA statistics: per-codeword counts ``[M, K]`` and sums ``[M, K, Ds]`` of the rows assigned to it.

The statistics mode of :mod:`equss.kernels.pq_segment_sum`: each row's Ds-vector is scattered into its
codeword's sum by vector atomics (or, deterministically, summed in sorted order), and rows whose fp32
squared norm is not finite are skipped inside the kernel (no extra pass over ``x``). Semantics:
:func:`equss.ops.reference.pq_cluster_stats_ref`.
"""

from __future__ import annotations

import torch
from equss.kernels.pq_segment_sum import CONFIGS, compile_spec, segment_sum_triton

__all__ = ["CONFIGS", "compile_spec", "pq_cluster_stats_triton"]


def pq_cluster_stats_triton(x: torch.Tensor, codes: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``equss::pq_cluster_stats``: ``counts [M, K]`` and ``sums [M, K, Ds]``, both float32.

    Invalid rows (non-finite fp32 squared norm) and codes outside ``[0, K)`` enter neither; float64 rows
    are summed as their float32 rounding (like the reference).
    """
    sums, counts = segment_sum_triton(x, codes, int(K), with_counts=True)
    return counts, sums

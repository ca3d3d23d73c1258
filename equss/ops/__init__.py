"""Public functional API of the PQ ops (``torch.library`` custom ops in the ``equss`` namespace).

Shapes: ``x [N, M, Ds]``, ``codebooks [M, K, Ds]``, ``codes [N, M]``. The pure-PyTorch ground truth
lives in :mod:`equss.ops.reference` (``*_ref`` twins).
"""

from equss.ops.pq import pq_assign, pq_cluster_stats, pq_ema_apply_, pq_ema_update_, pq_gather

__all__ = ["pq_assign", "pq_gather", "pq_cluster_stats", "pq_ema_apply_", "pq_ema_update_"]

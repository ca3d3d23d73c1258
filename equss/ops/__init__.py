"""Public functional API of the PQ ops (``torch.library`` custom ops in the ``equss`` namespace).

One module per op (custom op, fake implementation, autograd where there is one, validated wrapper):
:mod:`~equss.ops.pq_assign`, :mod:`~equss.ops.pq_assign_gather`, :mod:`~equss.ops.pq_gather`, :mod:`~equss.ops.pq_cluster_stats`,
:mod:`~equss.ops.pq_ema`. Shapes: ``x [N, M, Ds]``, ``codebooks [M, K, Ds]``, ``codes [N, M]``. The
pure-PyTorch ground truth lives in :mod:`equss.ops.reference` (``*_ref`` twins); the wrappers validate
with :mod:`equss.ops.validation`, so backends only ever see checked, contiguous tensors.
"""

from equss.ops.pq_assign import pq_assign
from equss.ops.pq_assign_gather import pq_assign_gather
from equss.ops.pq_cluster_stats import pq_cluster_stats
from equss.ops.pq_ema import pq_ema_apply_, pq_ema_update_
from equss.ops.pq_gather import pq_gather

__all__ = ["pq_assign", "pq_assign_gather", "pq_gather", "pq_cluster_stats", "pq_ema_apply_", "pq_ema_update_"]

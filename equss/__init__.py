"""equss: fast product quantization for training, and EQUSS (Expand-and-Quantize USS, AAAI 2024)."""

from equss import backends
from equss.backends import describe, use_backend
from equss.ops import pq_assign, pq_assign_gather, pq_cluster_stats, pq_ema_apply_, pq_ema_update_, pq_gather

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "backends",
    "describe",
    "use_backend",
    "pq_assign",
    "pq_assign_gather",
    "pq_gather",
    "pq_cluster_stats",
    "pq_ema_apply_",
    "pq_ema_update_",
]

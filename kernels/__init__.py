"""Triton backend of the PQ ops (installed as ``equss.kernels``; the folder is ``kernels/``).

One file per op, each with private ``@triton.jit`` kernels and a launcher named ``<op>_triton`` that
:mod:`equss.backends` dispatches to; signatures and semantics are those of the ``*_ref`` twins in
:mod:`equss.ops.reference`:

=============================  ============================  ===============================================
file                           launcher                      what it computes
=============================  ============================  ===============================================
``pq_assign.py``               ``pq_assign_triton``          codes, min_dist (tensor-core + FMA recheck)
                               ``pq_assign_gather_triton``   codes, min_dist, quantized, sq_err, statistics
``pq_gather.py``               ``pq_gather_triton``          quantized vectors
                               ``pq_gather_backward_triton`` scatter-add of gradients by code
``pq_cluster_stats.py``        ``pq_cluster_stats_triton``   per-codeword counts and sums
``pq_segment_sum.py``          ``segment_sum_triton``        the segment sum behind the two above
``pq_ema_apply.py``            ``pq_ema_apply_triton_``      EMA, Laplace smoothing, renormalisation
=============================  ============================  ===============================================

Each kernel module exposes ``CONFIGS`` (every compiled variant its launchers can pick), ``pick_config``
(the launcher's choice) and ``compile_spec(cfg)`` for the ahead-of-time compile; ``_config.py``
documents the fp32 matmul precision (``EQUSS_TRITON_PRECISION``: ``exact`` by default) and block sizes.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported; the root ``conftest.py`` does that when no GPU is present).
"""

from equss.kernels.pq_assign import pq_assign_gather_triton, pq_assign_triton
from equss.kernels.pq_cluster_stats import pq_cluster_stats_triton
from equss.kernels.pq_ema_apply import pq_ema_apply_triton_
from equss.kernels.pq_gather import pq_gather_backward_triton, pq_gather_triton
from equss.kernels.pq_segment_sum import segment_sum_triton

__all__ = [
    "pq_assign_triton",
    "pq_assign_gather_triton",
    "pq_gather_triton",
    "pq_gather_backward_triton",
    "pq_cluster_stats_triton",
    "pq_ema_apply_triton_",
    "segment_sum_triton",
]

#: Module of each op's launcher, for tools that walk every kernel (scripts/triton_resources.py).
KERNEL_MODULES = ("pq_assign", "pq_gather", "pq_segment_sum", "pq_ema_apply")

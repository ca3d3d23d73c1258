"""Triton backend of the PQ ops (installed as ``equss.kernels``; the folder is ``kernels/``).

The five backend functions have the signatures and semantics of the ``*_ref`` functions in
:mod:`equss.ops.reference` and are what :mod:`equss.backends` dispatches to for ``triton``:

* ``pq_assign(x, codebooks, metric) -> (codes int32 [N, M], min_dist f32 [N, M])``
* ``pq_gather(codes, codebooks) -> [N, M, Ds]``
* ``pq_gather_backward(grad_out, codes, K) -> [M, K, Ds] f32``
* ``pq_cluster_stats(x, codes, K) -> (counts f32 [M, K], sums f32 [M, K, Ds])``
* ``pq_ema_apply_(counts, sums, cluster_size, embed_sum, codebooks, decay, eps) -> None``

Beyond the backend contract, :func:`equss.kernels.pq_assign.pq_assign_fused` assigns, gathers (from the
same or another codebook tensor) and writes the per-(row, subspace) squared error for the commitment
loss in one launch. One file per op (``pq_assign.py``, ``pq_gather.py``, ``pq_ema.py``); each exposes
``CONFIGS`` (every compiled variant its launchers can pick) and ``compile_spec(cfg)`` for the
ahead-of-time compile test; ``_config.py`` documents the fp32 matmul precision
(``EQUSS_TRITON_PRECISION``: ``ieee`` by default) and the block-size heuristics.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is imported; the root ``conftest.py`` does that when no GPU is present).
"""

from equss.kernels.pq_assign import pq_assign
from equss.kernels.pq_ema import pq_cluster_stats, pq_ema_apply_
from equss.kernels.pq_gather import pq_gather, pq_gather_backward

__all__ = ["pq_assign", "pq_gather", "pq_gather_backward", "pq_cluster_stats", "pq_ema_apply_"]

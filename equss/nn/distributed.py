"""The few collectives :class:`equss.nn.ProductQuantizer` needs to keep codebooks identical across ranks.

Every function is a no-op (no collective, no communication) when ``torch.distributed`` is not
initialised or the group has a single rank, so single-process training pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "all_reduce_sum_", "all_gather_cat", "broadcast_from_first_"]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (default: the world), or 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum_(*tensors: Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Sum each tensor over the ranks of ``group`` in place (nothing when not distributed)."""
    if world_size(group) == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def all_gather_cat(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order (``t`` itself when not distributed).

    Every rank must pass a tensor of the same shape and dtype.
    """
    n = world_size(group)
    if n == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim=0)


def broadcast_from_first_(t: Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite ``t`` on every rank with its value on the group's first rank (in place)."""
    if world_size(group) == 1:
        return
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast(t, src=src, group=group)

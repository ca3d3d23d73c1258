"""``PairDataset``: an anchor image with one of its kNN positives (spec §6)."""

from __future__ import annotations

import numpy as np
import torch


class PairDataset(torch.utils.data.Dataset):
    """Item ``i`` = dataset item ``i`` plus a positive ``j = nns[i, r]``, ``r`` uniform in
    ``1..num_neighbors`` (column 0 is the image itself).

    The draw is a pure function of ``(seed, epoch, i)`` (numpy ``default_rng([seed, epoch, i])``), so it
    does not depend on worker count, worker seeding or the order in which items are fetched. Call
    :meth:`set_epoch` at the start of every epoch for fresh positives.

    Returns the anchor's keys (``img``, ``label``, ``index``, ...) and the positive's with a ``_pos``
    suffix (``img_pos``, ``label_pos``, ``index_pos``, ...).

    Args:
        dataset: the anchor dataset (items are dicts).
        nns: ``int [len(dataset), k]`` neighbour table with ``k > num_neighbors``.
        num_neighbors: 7 in STEGO/EQUSS.
        seed: base seed of the positive draws.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, nns: np.ndarray, num_neighbors: int = 7, seed: int = 0):
        nns = np.asarray(nns)
        if nns.ndim != 2 or not np.issubdtype(nns.dtype, np.integer):
            raise ValueError(f"PairDataset: nns must be an int array [N, k], got {nns.dtype} {nns.shape}")
        if nns.shape[0] != len(dataset):
            raise ValueError(
                f"PairDataset: nns has {nns.shape[0]} rows but the dataset has {len(dataset)} images "
                f"(a kNN file of another dataset, split or crop?)"
            )
        if not 1 <= num_neighbors < nns.shape[1]:
            raise ValueError(f"PairDataset: need 1 <= num_neighbors < k={nns.shape[1]}, got {num_neighbors}")
        if nns.min() < 0 or nns.max() >= len(dataset):
            raise ValueError(f"PairDataset: nns indices must lie in [0, {len(dataset)})")
        self.dataset = dataset
        self.nns = nns.astype(np.int64)
        self.num_neighbors = int(num_neighbors)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def positive_index(self, index: int) -> int:
        """The positive drawn for ``index`` in the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        r = int(rng.integers(1, self.num_neighbors + 1))
        return int(self.nns[index, r])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        out = dict(self.dataset[index])
        pos = self.dataset[self.positive_index(index)]
        out.update({f"{key}_pos": value for key, value in pos.items()})
        return out

"""Product k-means on top of the fused ops: all M subspaces at once, never an N×K distance matrix.

Used for k-means codebook initialisation, the "k-means on backbone features" baseline and the product
codebooks of the analyses. Lloyd iterations: :func:`pq_assign` for the assignment step and
:func:`pq_cluster_stats` (a segment reduction) for the update step, so it runs at the speed of the
fastest available backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from equss.ops.pq import pq_assign, pq_cluster_stats

__all__ = ["product_kmeans"]


def _init_kmeanspp(x: Tensor, K: int, metric: str, generator: torch.Generator) -> Tensor:
    """k-means++ seeding per subspace, vectorised over M: ``x [N, M, Ds]`` → ``[M, K, Ds]``."""
    N, M, Ds = x.shape
    idx = torch.randint(0, N, (M,), generator=generator).to(x.device)
    centers = [x[idx, torch.arange(M, device=x.device)]]  # [M, Ds]
    # Squared distance of every row to its nearest centre so far, per subspace: [N, M].
    d2 = ((x - centers[0].unsqueeze(0)) ** 2).sum(-1)
    for _ in range(1, K):
        weights = d2.clamp_min(0).t()  # [M, N]
        total = weights.sum(1, keepdim=True)
        # Rows all identical to the chosen centres (total 0): fall back to uniform sampling.
        weights = torch.where(total > 0, weights, torch.ones_like(weights))
        pick = torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(x.device)
        c = x[pick, torch.arange(M, device=x.device)]
        centers.append(c)
        d2 = torch.minimum(d2, ((x - c.unsqueeze(0)) ** 2).sum(-1))
    cb = torch.stack(centers, dim=1)
    if metric == "dot":
        cb = torch.nn.functional.normalize(cb, dim=-1)
    return cb


def product_kmeans(
    x: Tensor,
    K: int,
    iters: int = 20,
    metric: str = "l2",
    init: str = "kmeans++",
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means in every subspace at once.

    Args:
        x: ``[N, M, Ds]`` float (computed in fp32).
        K: clusters per subspace (``N >= K`` required).
        iters: maximum Lloyd iterations (stops early when the mean distance changes by < ``tol`` relative).
        metric: ``"l2"`` (euclidean k-means) or ``"dot"`` (spherical k-means: rows should be l2-normalised;
            centroids are re-normalised after each update).
        init: ``"kmeans++"`` (default) or ``"random"`` (K distinct random rows per subspace).
        generator: CPU generator for reproducible seeding.

    Returns:
        ``codebooks [M, K, Ds]`` float32 and the final ``codes [N, M]`` int32.
    """
    if x.dim() != 3:
        raise ValueError(f"product_kmeans: x must be [N, M, Ds], got shape {tuple(x.shape)}")
    N, M, Ds = x.shape
    if K < 1 or N < K:
        raise ValueError(f"product_kmeans: need 1 <= K <= N, got K={K} for x of shape {tuple(x.shape)}")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"product_kmeans: init must be 'kmeans++' or 'random', got {init!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x = x.float().contiguous()
    if init == "random":
        rows = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(M)], dim=0).to(x.device)  # [M, K]
        cb = x[rows, torch.arange(M, device=x.device).unsqueeze(1)]
        if metric == "dot":
            cb = torch.nn.functional.normalize(cb, dim=-1)
    else:
        cb = _init_kmeanspp(x, K, metric, g)
    cb = cb.contiguous()
    previous = None
    codes = None
    for _ in range(max(1, iters)):
        codes, dist = pq_assign(x, cb, metric)
        counts, sums = pq_cluster_stats(x, codes, K)
        new = sums / counts.clamp_min(1).unsqueeze(-1)
        empty = counts == 0
        if empty.any():
            # Re-seed each empty cluster with the row that is currently worst served in its subspace.
            worst = dist.argsort(dim=0, descending=True)  # [N, M]
            for m, k in empty.nonzero().tolist():
                j = int((empty[m, :k]).sum())  # distinct rows for distinct empty clusters
                new[m, k] = x[worst[min(j, N - 1), m], m]
        if metric == "dot":
            new = torch.nn.functional.normalize(new, dim=-1)
        cb = new.contiguous()
        mean_dist = float(dist.mean())
        if previous is not None and abs(previous - mean_dist) <= tol * max(abs(previous), 1e-12):
            break
        previous = mean_dist
    codes, _ = pq_assign(x, cb, metric)
    return cb, codes

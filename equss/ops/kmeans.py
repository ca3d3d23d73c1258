"""Product k-means on top of the fused ops: all M subspaces at once, never an N×K distance matrix.

Used for k-means codebook initialisation, the "k-means on backbone features" baseline and the product
codebooks of the analyses. Lloyd iterations: :func:`pq_assign` for the assignment step and
:func:`pq_cluster_stats` (a segment reduction) for the update step, so it runs at the speed of the
fastest available backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from equss.ops import pq_assign, pq_cluster_stats

__all__ = ["product_kmeans"]


def _init_kmeanspp(x: Tensor, K: int, metric: str, generator: torch.Generator, max_rows: int) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) in every subspace at once: ``[N, M, Ds]`` → ``[M, K, Ds]``.

    Each next centre is a row drawn with probability ∝ its squared distance to the nearest centre so far,
    which avoids the local minima of uniform seeding (two seeds in one cluster). Seeding costs K·N·M·Ds,
    so it runs on a random subset of ``max_rows`` rows; distances use the ``‖x‖² − 2x·c + ‖c‖²``
    expansion as one batched matrix-vector product, and sampling is an inverse-CDF lookup.
    """
    N, M, _ = x.shape
    if N > max_rows:
        x = x[torch.randperm(N, generator=generator)[:max_rows].to(x.device)]
        N = max_rows
    xt = x.transpose(0, 1).contiguous()  # [M, N, Ds]
    x_sq = (xt * xt).sum(-1)  # [M, N]
    m_idx = torch.arange(M, device=x.device)
    pick = torch.randint(0, N, (M,), generator=generator).to(x.device)
    centres, min_d2 = [], None
    for _ in range(K):
        c = xt[m_idx, pick]  # [M, Ds]
        centres.append(c)
        d2 = (x_sq - 2.0 * torch.bmm(xt, c.unsqueeze(-1)).squeeze(-1) + (c * c).sum(-1, keepdim=True)).clamp_min(0)
        min_d2 = d2 if min_d2 is None else torch.minimum(min_d2, d2)
        # Fewer distinct rows than K (all weights 0): fall back to uniform sampling.
        w = torch.where(min_d2.sum(1, keepdim=True) > 0, min_d2, torch.ones_like(min_d2)).double().cpu()
        cdf = w.cumsum(1)
        u = torch.rand(M, 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(N - 1).to(x.device)
    cb = torch.stack(centres, dim=1)
    return torch.nn.functional.normalize(cb, dim=-1) if metric == "dot" else cb


def product_kmeans(
    x: Tensor,
    K: int,
    iters: int = 20,
    metric: str = "l2",
    init: str = "kmeans++",
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    seed_rows: int | None = None,
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
        seed_rows: k-means++ seeds from a random subset of this many rows (default ``32·K``).

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
        cb = _init_kmeanspp(x, K, metric, g, seed_rows or 32 * K)
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

"""Product k-means built on the fused ops."""

from __future__ import annotations

import pytest
import torch

from equss.ops.kmeans import product_kmeans


def _clustered(N, M, K, Ds, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(M, K, Ds, generator=g) * 5
    truth = torch.randint(0, K, (N, M), generator=g)
    x = centers[torch.arange(M), truth] + spread * torch.randn(N, M, Ds, generator=g)
    return x, centers, truth


def test_recovers_well_separated_clusters():
    init = "kmeans++"  # random seeding can legitimately land in a local minimum; k-means++ separates these
    x, centers, truth = _clustered(600, 3, 6, 4, 0.05, 0)
    cb, codes = product_kmeans(x, 6, iters=30, init=init, generator=torch.Generator().manual_seed(1))
    for m in range(3):
        # Each true cluster maps to exactly one found cluster (a permutation of labels).
        pairs = set(zip(truth[:, m].tolist(), codes[:, m].tolist()))
        assert len(pairs) == 6, (init, m, pairs)
        # Every found centroid lies within the noise of a true centre.
        d = torch.cdist(cb[m], centers[m]).min(dim=1).values
        assert torch.all(d < 0.1)


def test_random_init_lloyd_lowers_error():
    x, _, _ = _clustered(400, 2, 5, 3, 0.3, 4)
    g = torch.Generator().manual_seed(5)
    cb1, codes1 = product_kmeans(x, 5, iters=1, init="random", generator=g)
    cb, codes = product_kmeans(x, 5, iters=25, init="random", generator=torch.Generator().manual_seed(5))
    err = lambda c, k: ((x - c[torch.arange(2), k.long()]) ** 2).sum(-1).mean()
    assert err(cb, codes) <= err(cb1, codes1)


def test_spherical_kmeans_gives_unit_centroids():
    x, _, _ = _clustered(300, 2, 4, 8, 0.1, 2)
    x = torch.nn.functional.normalize(x, dim=-1)
    cb, _ = product_kmeans(x, 4, metric="dot")
    torch.testing.assert_close(cb.norm(dim=-1), torch.ones(2, 4))


def test_no_empty_clusters_with_duplicates():
    # 3 distinct points, K = 3, many duplicates: every cluster must end up non-empty.
    base = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = base.repeat(50, 1).unsqueeze(1)  # [150, 1, 2]
    cb, codes = product_kmeans(x, 3, init="random", generator=torch.Generator().manual_seed(3))
    assert set(codes[:, 0].tolist()) == {0, 1, 2}


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"K <= N"):
        product_kmeans(torch.randn(3, 1, 2), 5)
    with pytest.raises(ValueError, match=r"\[N, M, Ds\]"):
        product_kmeans(torch.randn(3, 2), 2)

#!/usr/bin/env python
"""Reference numbers of the SyntheticScenes benchmark (``python scripts/synthetic_baselines.py``).

Chance levels, k-means (K = num_classes) + Hungarian on raw 8×8 pixel colour means and on the frozen
:class:`equss.models.demo_backbone.DemoBackbone` features, and a linear probe on those features (the
upper reference: how much class information a trained head could extract). k-means is the package's
own :func:`equss.ops.kmeans.product_kmeans` (k-means++ seeding, best of 5 starts by inertia) and the
matching is :class:`equss.evaluate.ConfusionMatrix`'s Hungarian matching, the same code the EQUSS
evaluation uses. The measured values are in the :mod:`equss.data.synthetic` docstring.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from equss.data.synthetic import SyntheticScenes  # noqa: E402
from equss.evaluate import ConfusionMatrix  # noqa: E402
from equss.normalization import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from equss.ops.kmeans import product_kmeans  # noqa: E402
from equss.report import majority_accuracy  # noqa: E402


def chance_levels(labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Chance accuracies (fractions) for labels (ignore < 0): ``majority`` (the most frequent class
    everywhere, what a constant prediction gets after matching) and ``uniform`` (``1 / num_classes``)."""
    return {"majority": majority_accuracy([labels]) / 100.0, "uniform": 1.0 / num_classes}


def hungarian_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Pixel accuracy (fraction) after the one-to-one cluster → class matching (labels < 0 ignored)."""
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, labels)
    return cm.compute("hungarian").accuracy / 100.0


def _kmeans_predict(x: torch.Tensor, k: int, seed: int, n_init: int = 5) -> torch.Tensor:
    """Cluster ids ``[n]`` of the rows of ``x [n, d]``: the best of ``n_init`` k-means++ starts."""
    best, best_inertia = None, float("inf")
    rows = x.float().unsqueeze(1)  # [n, 1, d]: one subspace holding the whole vector
    for i in range(n_init):
        g = torch.Generator().manual_seed(seed + i)
        centroids, codes = product_kmeans(rows, k, iters=50, metric="l2", generator=g)
        inertia = float((rows[:, 0] - centroids[0][codes[:, 0].long()]).square().sum())
        if inertia < best_inertia:
            best, best_inertia = codes[:, 0].long(), inertia
    return best


@torch.no_grad()
def featurize(featurizer: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``featurizer`` over a dataset: returns ``feats [n, C, h, w]`` and ``labels [n, H, W]``."""
    feats, labels = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        feats.append(featurizer(batch["img"]))
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def _patch_kmeans_accuracy(feats: torch.Tensor, labels: torch.Tensor, k: int, seed: int) -> float:
    """k-means on per-patch feature vectors ``feats [n, C, h, w]``, prediction upsampled (nearest) to the
    label grid ``labels [n, H, W]``, Hungarian pixel accuracy."""
    n, C, h, w = feats.shape
    pred = _kmeans_predict(feats.permute(0, 2, 3, 1).reshape(-1, C), k, seed).reshape(n, h, w)
    H, W = labels.shape[-2:]
    pred_up = torch.nn.functional.interpolate(pred[:, None].float(), size=(H, W), mode="nearest")[:, 0].long()
    return hungarian_accuracy(pred_up, labels, k)


def _linear_probe_accuracy(train_f, train_l, val_f, val_l, num_classes: int, steps: int = 100,
                           max_rows: int = 40000) -> float:
    """Logistic regression (L-BFGS, tiny l2) on per-patch features (standardised) against the patch's
    centre-pixel label; reports pixel accuracy on ``val`` after nearest upsampling. An upper reference: how much
    class information is linearly present in the frozen features."""
    def patch_rows(f, lab):
        n, C, h, w = f.shape
        H, W = lab.shape[-2:]
        centre = lab[:, (H // h) // 2 :: H // h, (W // w) // 2 :: W // w][:, :h, :w]
        return f.permute(0, 2, 3, 1).reshape(-1, C), centre.reshape(-1)

    xtr, ytr = patch_rows(train_f, train_l)
    keep = ytr >= 0
    xtr, ytr = xtr[keep], ytr[keep]
    g = torch.Generator().manual_seed(0)
    if xtr.shape[0] > max_rows:  # a random subset is plenty for a C×n_classes linear model
        sel = torch.randperm(xtr.shape[0], generator=g)[:max_rows]
        xtr, ytr = xtr[sel], ytr[sel]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr = (xtr - mu) / sd
    lin = torch.nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + 1e-4 * lin.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    n, C, h, w = val_f.shape
    with torch.no_grad():
        pred = lin((val_f.permute(0, 2, 3, 1).reshape(-1, C) - mu) / sd).argmax(1).reshape(n, 1, h, w)
    H, W = val_l.shape[-2:]
    pred_up = torch.nn.functional.interpolate(pred.float(), size=(H, W), mode="nearest")[:, 0].long()
    valid = val_l >= 0
    return float((pred_up[valid] == val_l[valid]).float().mean())


def kmeans_baselines(
    num_train: int = 600,
    num_val: int = 100,
    res: int = 112,
    num_classes: int = 5,
    seed: int = 0,
    featurizer: torch.nn.Module | None = None,
    linear_probe: bool = True,
) -> dict[str, float]:
    """Measure the reference numbers of the synthetic benchmark on its ``val`` split (fractions):

    * ``chance_majority``, ``chance_uniform``: see :func:`chance_levels`;
    * ``kmeans_pixel_mean``: k-means (K = num_classes) on the raw RGB mean of each 8×8 patch;
    * ``kmeans_demo``: k-means on the l2-normalised :class:`DemoBackbone` patch features (cosine
      geometry, as the cluster probe uses);
    * ``kmeans_demo_raw``: k-means on the un-normalised demo features;
    * ``linear_demo``: linear probe on the demo features trained on ``train`` (upper reference).

    All k-means predictions are per 8×8 patch, upsampled to pixels, matched with the Hungarian method.
    """
    from equss.models.demo_backbone import DemoBackbone

    if featurizer is None:
        featurizer = DemoBackbone()
    featurizer.eval()
    val = SyntheticScenes("val", num_val, res, num_classes, seed)
    out = {}
    feats, labels = featurize(featurizer, val)
    ch = chance_levels(labels, num_classes)
    out["chance_majority"], out["chance_uniform"] = ch["majority"], ch["uniform"]

    p = featurizer.patch_size
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    imgs = torch.cat([val[i]["img"][None] for i in range(len(val))]) * std + mean
    pix = torch.nn.functional.avg_pool2d(imgs, p)
    out["kmeans_pixel_mean"] = _patch_kmeans_accuracy(pix, labels, num_classes, seed)
    out["kmeans_demo"] = _patch_kmeans_accuracy(
        torch.nn.functional.normalize(feats, dim=1), labels, num_classes, seed
    )
    out["kmeans_demo_raw"] = _patch_kmeans_accuracy(feats, labels, num_classes, seed)
    if linear_probe:
        train = SyntheticScenes("train", num_train, res, num_classes, seed)
        tf, tl = featurize(featurizer, train)
        out["linear_demo"] = _linear_probe_accuracy(tf, tl, feats, labels, num_classes)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Reference numbers of the SyntheticScenes benchmark: chance, k-means on pixel "
        "colour means, k-means on the frozen demo featurizer, linear probe on it (val split)."
    )
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--res", type=int, default=112)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-linear", action="store_true", help="skip the linear probe (and the train split)")
    args = parser.parse_args(argv)
    res = kmeans_baselines(args.num_train, args.num_val, args.res, args.num_classes, args.seed,
                           linear_probe=not args.no_linear)
    for k, v in res.items():
        print(f"{k:>20s}: {100 * v:6.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What a run reports beside its own numbers: the k-means baseline, the chance level, the results table."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from equss.config import TrainConfig
from equss.evaluate import ConfusionMatrix
from equss.ops import pq_assign
from equss.ops.kmeans import product_kmeans

__all__ = [
    "chance_level", "format_results", "kmeans_baseline", "linear_baseline", "majority_accuracy", "summarize",
]

log = logging.getLogger(__name__)


@torch.no_grad()
def kmeans_baseline(train_base, val_loader, featurize, n_classes, device, seed) -> dict[str, Any]:
    """The baseline every USS paper reports: k-means (K = n_classes) on the frozen backbone's features,
    fitted on (a sample of) the training features, predicted on the validation set, Hungarian-matched.

    ``train_base`` items carry ``"feat"`` (cached features) or ``"img"``; ``featurize`` is the run's
    :class:`equss.pipeline.Featurizer`.
    """
    g = torch.Generator().manual_seed(seed)
    rows, budget = [], 200_000
    idx = torch.randperm(len(train_base), generator=g).tolist()
    count = 0
    for i in idx:
        item = train_base[i]
        f = featurize({k: item[k].unsqueeze(0) for k in ("feat", "img") if k in item})
        f = F.normalize(f.float(), dim=1)
        rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu())
        count += rows[-1].shape[0]
        if count >= budget:
            break
    t0 = time.perf_counter()
    x = torch.cat(rows).unsqueeze(1)  # [P, 1, C], l2-normalised: spherical (cosine) k-means
    centroids, _ = product_kmeans(x, n_classes, iters=30, metric="dot", generator=g)
    cm = ConfusionMatrix(n_classes, n_clusters=n_classes)
    for batch in val_loader:
        label = batch["label"].to(device)
        f = F.normalize(featurize(batch).float(), dim=1)
        B, C, h, w = f.shape
        codes, _ = pq_assign(f.permute(0, 2, 3, 1).reshape(-1, 1, C).cpu(), centroids, "dot")
        pred = codes.reshape(B, 1, h, w).float()
        pred = F.interpolate(pred, size=label.shape[-2:], mode="nearest").long().squeeze(1)
        cm.update(pred.to(device), label)
    log.info("k-means baseline: K=%d on %d backbone features, evaluated in %.1f s", n_classes, x.shape[0],
             time.perf_counter() - t0)
    return {"cluster": cm.compute("hungarian")}


@torch.no_grad()
def linear_baseline(train_base, val_loader, featurize, n_classes, device, seed, max_rows: int = 200_000,
                    iters: int = 100) -> dict[str, Any]:
    """The upper reference: a linear classifier on the frozen backbone's features, trained with labels.

    Multinomial logistic regression (full-batch L-BFGS, tiny l2, standardised features) on (a sample of)
    the training patches, each labelled with the label of its centre pixel; on the validation set the
    logits are upsampled bilinearly to the label size (as the EQUSS linear probe's are) and scored with the
    identity mapping. It shows how much class information is linearly present before any training of a
    head: EQUSS's unsupervised clusters approach it from below.
    """
    g = torch.Generator().manual_seed(seed)
    xs, ys, count = [], [], 0
    for i in torch.randperm(len(train_base), generator=g).tolist():
        item = train_base[i]
        if "label" not in item:
            raise ValueError("linear baseline: the training items have no 'label' (set eval.linear_baseline=false "
                             "for data without labels)")
        f = featurize({k: item[k].unsqueeze(0) for k in ("feat", "img") if k in item}).float()[0].cpu()  # [C, h, w]
        C, h, w = f.shape
        lab = item["label"]
        H, W = lab.shape[-2:]
        centre = lab[(H // h) // 2 :: H // h, (W // w) // 2 :: W // w][:h, :w].reshape(-1)
        keep = centre >= 0
        xs.append(f.reshape(C, -1).T[keep])
        ys.append(centre[keep])
        count += int(keep.sum())
        if count >= max_rows:
            break
    x, y = torch.cat(xs)[:max_rows].to(device), torch.cat(ys)[:max_rows].to(device)
    t0 = time.perf_counter()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    lin = torch.nn.Linear(x.shape[1], n_classes).to(device)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 1e-4 * lin.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    cm = ConfusionMatrix(n_classes)
    for batch in val_loader:
        label = batch["label"].to(device)
        f = featurize(batch).float()
        logits = lin((f.permute(0, 2, 3, 1) - mu) / sd).permute(0, 3, 1, 2)
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1), label)
    log.info("linear baseline: %d classes on %d labelled backbone features, fitted and evaluated in %.1f s",
             n_classes, x.shape[0], time.perf_counter() - t0)
    return {"linear": cm.compute("identity")}


def majority_accuracy(labels: Iterable[Tensor]) -> float:
    """Pixel accuracy (%) of predicting the most frequent class everywhere (labels < 0 ignored): what a
    constant prediction gets after Hungarian matching. NaN when there is no valid pixel."""
    counts = None
    for lab in labels:
        lab = lab.flatten()
        c = torch.bincount(lab[lab >= 0])
        counts = c if counts is None else _add_padded(counts, c)
    if counts is None or counts.sum() == 0:
        return float("nan")
    return 100.0 * float(counts.max()) / float(counts.sum())


def chance_level(loader) -> dict[str, float]:
    """Majority-class pixel accuracy of the evaluation labels (the accuracy of predicting one class)."""
    return {"majority_acc": majority_accuracy(batch["label"] for batch in loader)}


def _add_padded(a: Tensor, b: Tensor) -> Tensor:
    n = max(len(a), len(b))
    return F.pad(a, (0, n - len(a))) + F.pad(b, (0, n - len(b)))


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"selected": result.get("selected"), "chance": result.get("chance")}
    for key in ("no_crf", "crf", "kmeans_baseline", "linear_baseline"):
        if key in result:
            out[key] = {probe: res.to_dict() for probe, res in result[key].items() if probe in ("cluster", "linear")}
    return out


def format_results(result: dict[str, Any], cfg: TrainConfig) -> str:
    random = cfg.backbone.name != "demo" and str(cfg.backbone.weights).lower() == "none"
    lines = [
        f"## EQUSS results: {cfg.data.dataset}, backbone {cfg.backbone.name}"
        + (" with RANDOM weights (backbone.weights=none: not meaningful)" if random else "")
        + f" (checkpoint: {result['selected']['select_on']}, step {result['selected']['step']})",
        "",
        "| method | cluster Acc | cluster mIoU | linear Acc | linear mIoU |",
        "| --- | --- | --- | --- | --- |",
    ]
    chance = result.get("chance", {}).get("majority_acc", float("nan"))
    lines.append(f"| chance (majority class) | {chance:.1f} | — | — | — |")
    if "kmeans_baseline" in result:
        km = result["kmeans_baseline"]["cluster"]
        lines.append(f"| k-means on the frozen backbone features | {km.accuracy:.1f} | {km.miou:.1f} | — | — |")
    if "linear_baseline" in result:
        lb = result["linear_baseline"]["linear"]
        lines.append(f"| linear probe on the frozen backbone features (labels; upper reference) | — | — | {lb.accuracy:.1f} "
                     f"| {lb.miou:.1f} |")
    for key, name in (("no_crf", "EQUSS"), ("crf", "EQUSS + CRF")):
        if key in result:
            c, lin = result[key]["cluster"], result[key]["linear"]
            lines.append(f"| {name} | {c.accuracy:.1f} | {c.miou:.1f} | {lin.accuracy:.1f} | {lin.miou:.1f} |")
    return "\n".join(lines)

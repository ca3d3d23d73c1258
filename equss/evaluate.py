"""Evaluation: confusion matrix + Hungarian matching, and the whole-set evaluation of a model.

The protocol is STEGO's, reused by EQUSS: the probes' predictions over the whole evaluation split are
accumulated in a :class:`ConfusionMatrix`; :meth:`ConfusionMatrix.compute` gives pixel accuracy,
per-class IoU and accuracy, and mIoU in percent (:class:`SegmentationMetrics`), with Hungarian
matching for the cluster probe and the identity for the linear probe. :func:`evaluate_model` runs a
model over a loader (optionally with DenseCRF, :mod:`equss.crf`, and flip averaging).

Label convention: classes are ``0 .. n_classes-1``; any label ``< 0`` or ``>= n_classes`` is ignored
(the data pipeline maps "unlabelled" to ``-1``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from equss.io import save_json
from equss.progress import Progress

__all__ = ["ConfusionMatrix", "SegmentationMetrics", "evaluate_model"]


def _default_names(n: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"class_{i}" for i in range(n)]
    names = list(names)
    if len(names) != n:
        raise ValueError(f"expected {n} class names, got {len(names)}")
    return names


@dataclass
class SegmentationMetrics:
    """Result of :meth:`ConfusionMatrix.compute`. All rates are in percent.

    Attributes:
        accuracy: pixel accuracy, matched pixels / valid pixels (pixels of unmatched clusters are errors).
        miou: mean of ``iou`` over the classes whose IoU is defined (not NaN).
        iou: ``[n_classes]`` TP/(TP+FP+FN); NaN for a class that is neither in the labels nor predicted.
        class_accuracy: ``[n_classes]`` TP / pixels of that class (recall); NaN for a class with no pixel.
        assignment: ``[n_clusters]`` class index of each cluster, ``-1`` for an unmatched cluster.
        confusion: ``[n_classes, n_classes]`` counts after the mapping, rows = predicted class, columns =
            true class (pixels of unmatched clusters appear in no row but in their column's total).
        class_pixels: ``[n_classes]`` valid pixels per true class.
        n_pixels: total valid pixels.
        mapping: ``"hungarian"`` or ``"identity"``.
        class_names: names used by :meth:`table` and the CSV.
    """

    accuracy: float
    miou: float
    iou: np.ndarray
    class_accuracy: np.ndarray
    assignment: np.ndarray
    confusion: np.ndarray
    class_pixels: np.ndarray
    n_pixels: int
    mapping: str
    class_names: list[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return int(self.iou.shape[0])

    @property
    def class_frequency(self) -> np.ndarray:
        """``[n_classes]`` fraction (0–1) of the valid pixels that belong to each class."""
        return self.class_pixels / max(self.n_pixels, 1)

    def map_predictions(self, pred: Tensor) -> Tensor:
        """Cluster ids → class ids with :attr:`assignment` (unmatched clusters → ``-1``); any shape."""
        lut = torch.as_tensor(self.assignment, dtype=torch.long, device=pred.device)
        return lut[pred.long()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mapping": self.mapping,
            "accuracy": self.accuracy,
            "miou": self.miou,
            "n_pixels": self.n_pixels,
            "class_names": self.class_names,
            "iou": self.iou,
            "class_accuracy": self.class_accuracy,
            "class_frequency": self.class_frequency * 100.0,
            "class_pixels": self.class_pixels,
            "assignment": self.assignment,
            "confusion": self.confusion,
        }

    def table(self) -> str:
        """Per-class table (name, pixel share, IoU, accuracy) followed by the summary line."""
        width = max([len(n) for n in self.class_names] + [5])
        lines = [f"{'class':<{width}}  {'pixels%':>8}  {'IoU':>6}  {'Acc':>6}"]
        freq = self.class_frequency * 100.0
        for i, name in enumerate(self.class_names):
            lines.append(
                f"{name:<{width}}  {freq[i]:8.2f}  {_fmt(self.iou[i]):>6}  {_fmt(self.class_accuracy[i]):>6}"
            )
        lines.append(
            f"[{self.mapping}] pixel accuracy {self.accuracy:.2f}  mIoU {self.miou:.2f}  "
            f"({self.n_pixels} valid pixels)"
        )
        return "\n".join(lines)

    def save_json(self, path: str | os.PathLike) -> Path:
        return save_json(path, self.to_dict())

    def save_csv(self, path: str | os.PathLike) -> Path:
        """One row per class (index, name, pixel share %, IoU %, accuracy %); empty cell = undefined."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        freq = self.class_frequency * 100.0
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["class", "name", "pixel_percent", "iou", "accuracy"])
            for i, name in enumerate(self.class_names):
                w.writerow([i, name, f"{freq[i]:.4f}", _csv(self.iou[i]), _csv(self.class_accuracy[i])])
        return path


def _fmt(v: float) -> str:
    return "-" if not np.isfinite(v) else f"{v:.2f}"


def _csv(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.4f}"


class ConfusionMatrix:
    """Counts ``[n_clusters, n_classes]`` (rows = predicted cluster, columns = true class) over a whole
    evaluation set.

    Args:
        n_classes: number of classes; labels outside ``[0, n_classes)`` are ignored.
        n_clusters: number of predicted ids (default ``n_classes``; ``n_classes + extra_clusters`` for a
            cluster probe with extra clusters). Predictions outside ``[0, n_clusters)`` raise ``ValueError``
            (silently dropping them is how STEGO's metric loses extra-cluster pixels).
        device: where the counts live (use the predictions' device to avoid transfers).
        class_names: optional names for reports.
    """

    def __init__(
        self,
        n_classes: int,
        n_clusters: int | None = None,
        device: torch.device | str | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        n_clusters = n_classes if n_clusters is None else n_clusters
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        self.n_classes = int(n_classes)
        self.n_clusters = int(n_clusters)
        self.class_names = _default_names(self.n_classes, class_names)
        self.matrix = torch.zeros(self.n_clusters, self.n_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add one batch. ``pred`` and ``label`` are integer tensors of the same shape (e.g. ``[B, H, W]``)."""
        if pred.shape != label.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and label {tuple(label.shape)} must have the same shape"
            )
        if pred.is_floating_point() or label.is_floating_point():
            raise TypeError(f"pred and label must be integer tensors, got {pred.dtype} and {label.dtype}")
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        label = label.reshape(-1).to(self.matrix.device, torch.int64)
        valid = (label >= 0) & (label < self.n_classes)
        pred, label = pred[valid], label[valid]
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= self.n_clusters):
            raise ValueError(
                f"predictions must lie in [0, {self.n_clusters}), got range [{int(pred.min())}, {int(pred.max())}]"
            )
        self.matrix += torch.bincount(
            pred * self.n_classes + label, minlength=self.n_clusters * self.n_classes
        ).reshape(self.n_clusters, self.n_classes)

    def all_reduce_(self, group=None) -> None:
        """Sum the counts over the ranks of ``torch.distributed`` (no-op when it is not initialised)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix, group=group)

    def assignment(self, mapping: str = "hungarian") -> np.ndarray:
        """``[n_clusters]`` class of each cluster (``-1`` = unmatched).

        ``"hungarian"``: one-to-one matching maximising the matched pixels
        (``linear_sum_assignment(matrix, maximize=True)``); with more clusters than classes the extra
        clusters stay unmatched, with fewer some classes get no cluster. ``"identity"``: cluster i → class
        i for ``i < n_classes``.
        """
        counts = self.matrix.cpu().numpy()
        out = np.full(self.n_clusters, -1, dtype=np.int64)
        if mapping == "hungarian":
            rows, cols = linear_sum_assignment(counts, maximize=True)
            out[rows] = cols
        elif mapping == "identity":
            n = min(self.n_clusters, self.n_classes)
            out[:n] = np.arange(n)
        else:
            raise ValueError(f"mapping must be 'hungarian' or 'identity', got {mapping!r}")
        return out

    def compute(self, mapping: str = "hungarian") -> SegmentationMetrics:
        """Metrics in percent after mapping clusters to classes (see :class:`SegmentationMetrics`)."""
        assign = self.assignment(mapping)
        counts = self.matrix.cpu().numpy().astype(np.int64)
        confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        matched = assign >= 0
        # Summing rows (instead of indexing) keeps this right for any many-to-one mapping as well.
        np.add.at(confusion, assign[matched], counts[matched])
        class_pixels = counts.sum(axis=0)
        n_pixels = int(class_pixels.sum())
        tp = np.diag(confusion).astype(np.float64)
        fp = confusion.sum(axis=1) - tp  # predicted as the class, labelled otherwise
        fn = class_pixels - tp  # labelled as the class, predicted otherwise (incl. unmatched clusters)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = 100.0 * tp / (tp + fp + fn)
            class_acc = 100.0 * tp / class_pixels
        defined = ~np.isnan(iou)
        miou = float(iou[defined].mean()) if defined.any() else float("nan")
        accuracy = 100.0 * float(tp.sum()) / n_pixels if n_pixels else float("nan")
        return SegmentationMetrics(
            accuracy=accuracy,
            miou=miou,
            iou=iou,
            class_accuracy=class_acc,
            assignment=assign,
            confusion=confusion,
            class_pixels=class_pixels,
            n_pixels=n_pixels,
            mapping=mapping,
            class_names=list(self.class_names),
        )


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    featurize,
    n_classes: int,
    device: torch.device,
    n_clusters: int | None = None,
    crf: bool = False,
    crf_processes: int = 2,
    flip: bool = False,
    progress: bool = True,
    desc: str = "eval",
    keep: bool = False,
) -> dict[str, Any]:
    """Cluster- and linear-probe metrics over a whole evaluation set (docs/method.md §9).

    ``featurize(batch, flip=False)`` returns the backbone features of a batch. With ``crf`` the probe
    log-probabilities are refined by DenseCRF per image (needs the ``img`` of every item). ``keep`` also
    returns the per-pixel predictions (for pictures).
    """
    from equss.crf import CRFPool, batched_crf

    model.eval()
    cm_cluster = ConfusionMatrix(n_classes, n_clusters=n_clusters or n_classes)
    cm_linear = ConfusionMatrix(n_classes)
    kept: dict[str, list] = {"cluster": [], "linear": [], "label": [], "index": []}
    crf_failed = 0
    with CRFPool(crf_processes) if crf else nullcontext() as pool:
        for batch in Progress(loader, desc=desc, unit="batch", enabled=progress, leave=False):
            label = batch["label"].to(device)
            f = featurize(batch).to(device)
            flip_f = featurize(batch, flip=True).to(device) if flip else None
            cluster_lp, linear_lp = model.predict(f, tuple(label.shape[-2:]), flip_f=flip_f)
            if crf:
                crf_c = batched_crf(batch["img"], cluster_lp.cpu(), pool=pool)
                crf_l = batched_crf(batch["img"], linear_lp.cpu(), pool=pool)
                crf_failed += len(crf_c.failed) + len(crf_l.failed)
                cluster_pred, linear_pred = crf_c.probs.argmax(1).to(device), crf_l.probs.argmax(1).to(device)
            else:
                cluster_pred, linear_pred = cluster_lp.argmax(1), linear_lp.argmax(1)
            cm_cluster.update(cluster_pred, label)
            cm_linear.update(linear_pred, label)
            if keep:
                kept["cluster"].append(cluster_pred.cpu())
                kept["linear"].append(linear_pred.cpu())
                kept["label"].append(label.cpu())
                kept["index"].append(torch.as_tensor(batch["index"]))
    result: dict[str, Any] = {"cluster": cm_cluster.compute("hungarian"), "linear": cm_linear.compute("identity")}
    if crf:
        result["crf_failed"] = crf_failed
    if keep:
        result["predictions"] = {k: torch.cat([torch.as_tensor(t) for t in v]) for k, v in kept.items()}
    return result

"""Evaluation building blocks: confusion matrix + Hungarian matching, the two probes, DenseCRF.

The protocol is STEGO's, reused by EQUSS (``shared/EQUSS_SPEC.md`` §9):

* the (quantized) code ``[B, D, h, w]`` is bilinearly upsampled (``align_corners=False``) to the label
  size (:func:`upsample_to`) before the probes;
* :class:`ClusterProbe`: ``n_classes + extra_clusters`` learnable centroids, cosine similarity, hard
  assignment; its predictions are matched to classes with the Hungarian algorithm;
* :class:`LinearProbe`: a 1×1 convolution trained with cross-entropy on pixels with a valid label,
  evaluated with the identity mapping;
* :class:`ConfusionMatrix` accumulates ``[n_clusters, n_classes]`` counts over the whole evaluation
  set; :meth:`ConfusionMatrix.compute` gives pixel accuracy, per-class IoU and accuracy, and mIoU, in
  percent (:class:`SegmentationMetrics`);
* :func:`dense_crf` / :func:`batched_crf` refine per-pixel class probabilities with a fully connected
  CRF (pydensecrf), one image per worker process, with a per-image timeout.

Label convention: classes are ``0 .. n_classes-1``; any label ``< 0`` or ``>= n_classes`` is ignored
(the data pipeline maps "unlabelled" to ``-1``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CRF_PARAMS",
    "ConfusionMatrix",
    "SegmentationMetrics",
    "ClusterProbe",
    "LinearProbe",
    "upsample_to",
    "unnormalize_image",
    "crf_available",
    "dense_crf",
    "batched_crf",
    "CRFPool",
    "CRFBatchResult",
    "save_json",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# JSON output (shared with equss.analysis)
# --------------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """numpy / torch / NaN → plain JSON values. NaN and ±inf become ``null`` (JSON has no NaN)."""
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()] if obj.ndim else _jsonable(obj.item())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as standard JSON (numpy arrays → lists, NaN/inf → ``null``); creates parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------


def upsample_to(features: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize ``[B, D, h, w] → [B, D, H, W]`` with ``align_corners=False`` (STEGO/EQUSS eval)."""
    if features.dim() != 4:
        raise ValueError(f"features must be [B, D, h, w], got shape {tuple(features.shape)}")
    size = tuple(int(s) for s in size[-2:])
    if tuple(features.shape[-2:]) == size:
        return features
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def _check_features(x: Tensor, dim: int, who: str) -> None:
    if x.dim() != 4 or x.shape[1] != dim:
        raise ValueError(f"{who}: expected features [B, {dim}, h, w], got shape {tuple(x.shape)}")


class ClusterProbe(nn.Module):
    """STEGO's ``ClusterLookup``: cosine similarity to ``n_classes + extra_clusters`` centroids.

    Args:
        dim: feature dimension D.
        n_classes: number of classes.
        extra_clusters: additional centroids (they stay unmatched by the Hungarian matching).

    Shapes: ``x [B, D, h, w]`` → similarity ``[B, n_clusters, h, w]``.
    """

    def __init__(self, dim: int, n_classes: int, extra_clusters: int = 0) -> None:
        super().__init__()
        if dim < 1 or n_classes < 1 or extra_clusters < 0:
            raise ValueError(
                f"invalid ClusterProbe(dim={dim}, n_classes={n_classes}, extra_clusters={extra_clusters})"
            )
        self.dim = dim
        self.n_classes = n_classes
        self.n_clusters = n_classes + extra_clusters
        self.clusters = nn.Parameter(torch.randn(self.n_clusters, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Cosine similarity ``[B, n_clusters, h, w]`` between l2-normalised pixels and centroids."""
        _check_features(x, self.dim, "ClusterProbe")
        c = F.normalize(self.clusters, dim=1)
        return torch.einsum("bdhw,nd->bnhw", F.normalize(x, dim=1), c.to(x.dtype))

    @torch.no_grad()
    def init_from_features(self, x: Tensor, generator: torch.Generator | None = None, iters: int = 20) -> None:
        """Set the centroids by spherical k-means on the pixels of ``x [B, D, h, w]`` (an option; STEGO and
        EQUSS start from ``randn``). With hard assignment a random centroid that wins no pixel never gets
        a gradient, so random starts often leave clusters unused; data-initialised centroids all start
        with pixels."""
        from equss.ops.kmeans import product_kmeans

        _check_features(x, self.dim, "ClusterProbe")
        rows = F.normalize(x.detach().float(), dim=1).permute(0, 2, 3, 1).reshape(-1, 1, self.dim)
        if rows.shape[0] < self.n_clusters:
            raise ValueError(f"ClusterProbe: need at least {self.n_clusters} pixels to initialise, got {rows.shape[0]}")
        centroids, _ = product_kmeans(rows, self.n_clusters, iters=iters, metric="dot", generator=generator)
        self.clusters.copy_(centroids[0].to(self.clusters))

    def loss(self, x: Tensor) -> Tensor:
        """Hard-assignment loss: ``−mean over pixels of max_n similarity`` (all pixels, no labels)."""
        return -self(x).max(dim=1).values.mean()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Cluster id ``[B, h, w]`` (int64) of each pixel."""
        return self(x).argmax(dim=1)

    def log_probs(self, x: Tensor, alpha: float = 2.0) -> Tensor:
        """``log_softmax(alpha · similarity)`` over clusters, ``[B, n_clusters, h, w]`` (CRF input)."""
        return F.log_softmax(alpha * self(x), dim=1)


class LinearProbe(nn.Module):
    """1×1 convolution ``D → n_classes`` trained with cross-entropy on labelled pixels.

    Shapes: ``x [B, D, h, w]`` → logits ``[B, n_classes, h, w]``.
    """

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        if dim < 1 or n_classes < 1:
            raise ValueError(f"invalid LinearProbe(dim={dim}, n_classes={n_classes})")
        self.dim = dim
        self.n_classes = n_classes
        self.conv = nn.Conv2d(dim, n_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        _check_features(x, self.dim, "LinearProbe")
        return self.conv(x)

    def loss(self, x: Tensor, label: Tensor) -> Tensor:
        """Mean cross-entropy over pixels with ``0 <= label < n_classes`` (``-1`` = ignore).

        ``label [B, H, W]``; if ``H, W`` differ from the feature size the logits are bilinearly upsampled
        to the label (as STEGO trains its linear probe). A batch without any valid pixel gives a zero loss
        that is still connected to the graph (``F.cross_entropy`` would return NaN).
        """
        if label.dim() != 3 or label.shape[0] != x.shape[0]:
            raise ValueError(f"label must be [B, H, W] with B = {x.shape[0]}, got shape {tuple(label.shape)}")
        logits = upsample_to(self(x), label.shape[-2:])
        label = label.long()
        valid = (label >= 0) & (label < self.n_classes)
        if not bool(valid.any()):
            return logits.sum() * 0.0
        target = torch.where(valid, label, torch.full_like(label, -1))
        return F.cross_entropy(logits, target, ignore_index=-1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Class id ``[B, h, w]`` (int64)."""
        return self(x).argmax(dim=1)

    def log_probs(self, x: Tensor) -> Tensor:
        """``log_softmax`` of the logits, ``[B, n_classes, h, w]`` (CRF input)."""
        return F.log_softmax(self(x), dim=1)


# --------------------------------------------------------------------------------------------------
# DenseCRF
# --------------------------------------------------------------------------------------------------

#: STEGO's / EQUSS's DenseCRF settings (``MAX_ITER``, ``POS_*``, ``Bi_*`` in STEGO's ``crf.py``).
CRF_PARAMS: dict[str, float] = {
    "iterations": 10,
    "gaussian_sxy": 1,
    "gaussian_compat": 3,
    "bilateral_sxy": 67,
    "bilateral_srgb": 3,
    "bilateral_compat": 4,
}

_CRF_INSTALL_HINT = "pip install 'equss[crf]'  (pydensecrf2 and pebble; pydensecrf2 imports as `pydensecrf`)"


def crf_available() -> tuple[bool, str]:
    """``(True, "")`` when pydensecrf and pebble import, else ``(False, reason)``."""
    try:
        import pebble  # noqa: F401
        import pydensecrf.densecrf  # noqa: F401
        import pydensecrf.utils  # noqa: F401
    except ImportError as exc:
        return False, f"{exc}; install with: {_CRF_INSTALL_HINT}"
    return True, ""


def _require_crf() -> None:
    ok, reason = crf_available()
    if not ok:
        raise RuntimeError(f"DenseCRF is not available: {reason}")


def unnormalize_image(
    image: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channel_order: str = "bgr",
) -> np.ndarray:
    """ImageNet-normalised ``[3, H, W]`` (or ``[B, 3, H, W]``) float tensor → ``uint8`` ``[H, W, 3]``
    (or ``[B, H, W, 3]``) numpy array.

    ``x·std + mean`` clamped to [0, 1], times 255, rounded. ``channel_order="bgr"`` (default) reverses the
    channels, as STEGO's ``dense_crf`` does (``np.array(to_pil_image(unnorm(img)))[:, :, ::-1]``) — the
    order the authors feed to the CRF; ``"rgb"`` keeps them. The bilateral kernel uses the same ``srgb``
    for every channel, so the order only changes the permutohedral lattice's rounding, not the model;
    BGR is the default to reproduce the authors' numbers. (STEGO truncates ``x·255`` to uint8; we round,
    a difference of at most one grey level.)
    """
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must be [3, H, W] or [B, 3, H, W], got shape {tuple(image.shape)}")
    if channel_order not in ("bgr", "rgb"):
        raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
    img = image.detach().float().cpu()
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    img = (img * s + m).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    img = img.movedim(-3, -1)  # [..., H, W, 3]
    if channel_order == "bgr":
        img = img.flip(-1)
    return np.ascontiguousarray(img.numpy())


def _softmax_upsampled(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """``[C, h, w]`` logits → ``[C, H, W]`` float32 probabilities (bilinear, align_corners False)."""
    up = F.interpolate(logits.detach().float().unsqueeze(0), size=size, mode="bilinear", align_corners=False)
    return F.softmax(up[0], dim=0)


def _crf_from_probs(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int = 10,
    gaussian_sxy: float = 1,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 67,
    bilateral_srgb: float = 3,
    bilateral_compat: float = 4,
) -> np.ndarray:
    """The pydensecrf part of :func:`dense_crf` (numpy in, numpy out; what the workers run)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    C, H, W = probs.shape
    unary = np.ascontiguousarray(unary_from_softmax(probs))
    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    d.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image), compat=bilateral_compat
    )
    q = d.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(C, H, W)


def _check_crf_inputs(image: np.ndarray, logits) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
        raise TypeError(f"image must be a uint8 numpy array [H, W, 3], got {desc}")
    if logits.ndim != 3:
        raise ValueError(f"logits must be [C, h, w], got shape {tuple(logits.shape)}")


def dense_crf(image: np.ndarray, logits: Tensor | np.ndarray, **params: float) -> np.ndarray:
    """Fully connected CRF on one image (STEGO's ``dense_crf``).

    Args:
        image: ``uint8 [H, W, 3]`` (see :func:`unnormalize_image`; the authors pass BGR).
        logits: ``[C, h, w]`` unnormalised scores or log-probabilities (softmax is applied, so
            log-softmax inputs give the same result); bilinearly upsampled to ``H, W``.
        **params: overrides of :data:`CRF_PARAMS` (10 iterations; Gaussian sxy 1, compat 3; bilateral
            sxy 67, srgb 3, compat 4).

    Returns:
        ``float32 [C, H, W]`` marginals (each pixel sums to 1).

    Raises:
        RuntimeError: pydensecrf is not installed (``pip install 'equss[crf]'``).
    """
    _require_crf()
    logits = torch.as_tensor(logits)
    _check_crf_inputs(image, logits)
    unknown = set(params) - set(CRF_PARAMS)
    if unknown:
        raise ValueError(f"unknown CRF parameters {sorted(unknown)}; known: {sorted(CRF_PARAMS)}")
    probs = _softmax_upsampled(logits, image.shape[:2]).numpy()
    return _crf_from_probs(image, probs, **{**CRF_PARAMS, **params})


@dataclass
class CRFBatchResult:
    """Output of :func:`batched_crf`.

    Attributes:
        probs: ``[B, C, H, W]`` float32 CPU tensor; CRF marginals, or for a failed image the plain
            softmax of its upsampled logits (the non-CRF prediction).
        failed: ``{image index in the batch: reason}`` for the images that fell back.
    """

    probs: Tensor
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return len(self.failed)


class CRFPool:
    """Worker processes for :func:`batched_crf`, to reuse across batches (a context manager).

    Backed by ``pebble.ProcessPool``: a task that runs longer than its timeout is cancelled **and its
    worker process is killed and replaced**, so a hung image (pydensecrf is C++ and cannot be
    interrupted from Python) costs one timeout, never the run. The timeout counts from when a worker
    starts the image, not from submission, so queueing behind other images does not count.

    Args:
        processes: number of workers (default: ``os.cpu_count()``).
        context: multiprocessing start method (``"fork"``, ``"spawn"``, ``"forkserver"``) or ``None`` for
            the platform default. Workers only run numpy + pydensecrf, so ``fork`` is safe even after
            CUDA is initialised in the parent.
    """

    def __init__(self, processes: int | None = None, context: str | None = None) -> None:
        _require_crf()
        import multiprocessing

        import pebble

        self.processes = processes or os.cpu_count() or 1
        ctx = multiprocessing.get_context(context) if context else None
        kwargs = {"context": ctx} if ctx is not None else {}
        self._pool = pebble.ProcessPool(max_workers=self.processes, **kwargs)

    def schedule(self, fn: Callable, args: tuple, timeout: float | None):
        return self._pool.schedule(fn, args=args, timeout=timeout)

    def close(self) -> None:
        self._pool.stop()
        self._pool.join()

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batched_crf(
    images: Tensor | np.ndarray | Sequence[np.ndarray],
    logits: Tensor,
    *,
    pool: CRFPool | None = None,
    processes: int | None = None,
    timeout: float | None = 60.0,
    channel_order: str = "bgr",
    crf_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    **params: float,
) -> CRFBatchResult:
    """DenseCRF on a batch, one image per worker process, with a per-image timeout and fallback.

    Args:
        images: ImageNet-normalised float ``[B, 3, H, W]`` tensor (un-normalised with
            :func:`unnormalize_image` in ``channel_order``), or ``uint8 [B, H, W, 3]`` array / list of
            ``[H, W, 3]`` arrays used as they are.
        logits: ``[B, C, h, w]`` scores or log-probabilities (e.g. :meth:`ClusterProbe.log_probs`).
        pool: a :class:`CRFPool` to reuse; if ``None`` a temporary one with ``processes`` workers is made.
        timeout: seconds per image (from when its worker starts it); ``None`` = no limit.
        channel_order: for float ``images`` (see :func:`unnormalize_image`).
        crf_fn: per-image function ``(image uint8 [H,W,3], probs float32 [C,H,W]) -> [C,H,W]`` run in the
            workers; default pydensecrf with :data:`CRF_PARAMS` updated by ``params``. Must be picklable.

    Returns:
        :class:`CRFBatchResult`; images whose CRF timed out or raised keep their non-CRF probabilities
        and are listed in ``failed`` (a warning is logged).
    """
    if isinstance(images, Tensor):
        images = unnormalize_image(images, channel_order=channel_order)
        if images.ndim == 3:
            images = images[None]
    images = [np.asarray(im) for im in images]
    if logits.dim() != 4 or logits.shape[0] != len(images):
        raise ValueError(
            f"logits must be [B, C, h, w] with B = {len(images)}, got shape {tuple(logits.shape)}"
        )
    for im in images:
        _check_crf_inputs(im, logits[0])
    unknown = set(params) - set(CRF_PARAMS)
    if unknown:
        raise ValueError(f"unknown CRF parameters {sorted(unknown)}; known: {sorted(CRF_PARAMS)}")
    if crf_fn is None:
        _require_crf()
        crf_fn = partial(_crf_from_probs, **{**CRF_PARAMS, **params})

    # Upsample + softmax once in the parent (on the logits' device; fast on a GPU); the workers get
    # numpy only, so they never touch torch/CUDA.
    fallback = [_softmax_upsampled(logits[i], im.shape[:2]).cpu() for i, im in enumerate(images)]
    own_pool = pool is None
    pool = CRFPool(processes) if own_pool else pool
    failed: dict[int, str] = {}
    out: list[Tensor] = []
    try:
        futures = [pool.schedule(crf_fn, (im, fallback[i].numpy()), timeout) for i, im in enumerate(images)]
        for i, fut in enumerate(futures):
            try:
                q = np.asarray(fut.result(), dtype=np.float32)
                if q.shape != tuple(fallback[i].shape):
                    raise ValueError(f"CRF returned shape {q.shape}, expected {tuple(fallback[i].shape)}")
                out.append(torch.from_numpy(q))
            except (TimeoutError, FutureTimeoutError):  # distinct classes before Python 3.11
                failed[i] = f"timed out after {timeout} s"
                out.append(fallback[i])
            except Exception as exc:  # a crashed worker or a pydensecrf error: fall back, keep going
                failed[i] = f"{type(exc).__name__}: {exc}"
                out.append(fallback[i])
    finally:
        if own_pool:
            pool.close()
    if failed:
        log.warning(
            "DenseCRF fell back to the non-CRF prediction for %d/%d images: %s",
            len(failed),
            len(images),
            failed,
        )
    return CRFBatchResult(probs=torch.stack(out), failed=failed)

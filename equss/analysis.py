"""The paper's analyses of the quantized space ("Analyses on EQUSS", docs/method.md §10).

Input everywhere: per-pixel PQ codes ``codes [P, M]`` (int, in ``[0, K)``) and labels ``labels [P]``
(``0 .. n_classes-1``; anything else = unlabelled). Codes of an EQUSS model come from its PQ head; for
a model without PQ (a STEGO-style head) first fit a k-means product codebook with the same M, K
(:func:`fit_product_kmeans`) and quantize (:func:`quantize`). Codes live on the feature grid (e.g.
40×40 at 320 px with patch 8) while labels live at full resolution: pair them by nearest-resizing one to
the other (``F.interpolate(..., mode="nearest")``) before flattening.

The statistics accumulate into per-class code histograms (:class:`CodeHistogram`,
``counts [n_classes + 1, M, K]``, the last row for unlabelled pixels), so a whole evaluation set can be
streamed batch by batch. Definitions (the paper's exact estimator is not public; these are ours):

* **per-class entropy** (a): ``H(c) = Σ_m H(k_m | class c)`` in bits, where ``H(k_m | c)`` is the
  plug-in entropy of the codes of subspace m over the pixels of class c. By subadditivity it is an upper
  bound on the joint entropy of the M-tuple ``H(k_1, ..., k_M | c)``; the two are equal iff the
  subspaces are independent within the class. A constant code gives 0; codes uniform over all K
  values give ``M·log2 K``. To compare models with different M or K, ``entropy_normalized`` divides by
  that maximum (the bar chart uses it when the models' M, K differ). The joint entropy is reported by :func:`joint_code_entropy`, a plug-in
  estimate over distinct tuples that is only trusted when each observed tuple has on average at least
  ``min_samples_per_tuple`` pixels (otherwise it saturates at ``log2(pixels)``).
* **codeword selection frequency** (b): ``freq[m, k]`` = fraction of all pixels (labelled or not) whose
  subspace-m code is k; plus per codebook the fraction of codewords used and the perplexity ``2^H``.
* **entropy vs accuracy** (c): per-class entropy against per-class accuracy (from
  :class:`equss.evaluate.SegmentationMetrics`), with each class's pixel share, and Spearman's rank
  correlation.
* **inter-class distance** (d), a symmetric ``[n_classes, n_classes]`` matrix with zero diagonal except
  for ``"pairwise"``:

  - ``"centroid"`` (default): ``‖μ_a − μ_b‖`` between the mean quantized vectors of two classes,
    ``μ_c = concat_m Σ_k p_c^m(k) c_{m,k}`` — exact from the histograms and the codebooks;
  - ``"pairwise"``: ``sqrt(E‖q_a − q_b‖²)`` over all pixel pairs of the two classes
    ``= sqrt(‖μ_a − μ_b‖² + v_a + v_b)`` with ``v_c`` the spread of class c (diagonal ``sqrt(2 v_c)``);
  - ``"hamming"``: fraction of subspaces where the two classes' modal codewords differ;
  - ``"js"``: mean over subspaces of the Jensen–Shannon distance (base 2) between the classes' code
    distributions — needs no codebook.

  ``"centroid"`` and ``"pairwise"`` are divided by their largest entry (→ [0, 1]); ``"hamming"`` and
  ``"js"`` already live on an absolute [0, 1] scale and are left as they are, so models can be compared.
  Classes without pixels get NaN rows/columns.

Every analysis is written as JSON numbers and a PNG (matplotlib's object-oriented ``Figure``, rendered by Agg; pyplot's global state is never touched) by :func:`run_analyses`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from scipy.spatial.distance import jensenshannon
from scipy.stats import spearmanr
from torch import Tensor

from equss.io import save_json
from equss.ops import pq_assign
from equss.ops.kmeans import product_kmeans

__all__ = [
    "plot_stego_shifts",
    "CodeHistogram",
    "class_entropy",
    "joint_code_entropy",
    "codeword_frequency",
    "codebook_usage",
    "entropy_vs_accuracy",
    "class_distance",
    "DISTANCE_METRICS",
    "fit_product_kmeans",
    "quantize",
    "plot_class_entropy",
    "plot_codeword_usage",
    "plot_entropy_vs_accuracy",
    "plot_class_distance",
    "run_analyses",
]

DISTANCE_METRICS = ("centroid", "pairwise", "hamming", "js")

# Indices per bincount call in CodeHistogram.update: 2^24 int64 = 128 MiB of temporaries at most.
_MAX_INDICES_PER_CHUNK = 1 << 24


def _check_codes_labels(codes: Tensor, labels: Tensor, M: int | None = None) -> None:
    if codes.dim() != 2:
        raise ValueError(f"codes must be [P, M], got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or labels.is_floating_point():
        raise TypeError(f"codes and labels must be integer tensors, got {codes.dtype} and {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != codes.shape[0]:
        raise ValueError(f"labels must be [P] with P = {codes.shape[0]}, got shape {tuple(labels.shape)}")
    if M is not None and codes.shape[1] != M:
        raise ValueError(f"codes must have M = {M} columns, got shape {tuple(codes.shape)}")


class CodeHistogram:
    """Per-class code counts ``counts [n_classes + 1, M, K]`` accumulated over batches (int64).

    Row ``n_classes`` collects pixels whose label is outside ``[0, n_classes)`` (unlabelled), so
    codeword usage covers every pixel while class statistics use labelled pixels only.
    """

    def __init__(self, n_classes: int, M: int, K: int, device: torch.device | str | None = None) -> None:
        if n_classes < 1 or M < 1 or K < 1:
            raise ValueError(f"invalid CodeHistogram(n_classes={n_classes}, M={M}, K={K})")
        self.n_classes, self.M, self.K = int(n_classes), int(M), int(K)
        self.counts = torch.zeros(self.n_classes + 1, self.M, self.K, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, codes: Tensor, labels: Tensor) -> None:
        """Add ``codes [P, M]`` with their ``labels [P]``."""
        _check_codes_labels(codes, labels, self.M)
        codes = codes.to(self.counts.device, torch.int64)
        labels = labels.to(self.counts.device, torch.int64)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.K):
            raise ValueError(f"codes must lie in [0, {self.K}), got [{int(codes.min())}, {int(codes.max())}]")
        row = torch.where((labels >= 0) & (labels < self.n_classes), labels, self.n_classes)
        m_off = torch.arange(self.M, device=codes.device) * self.K
        n_bins = self.counts.numel()
        step = max(1, _MAX_INDICES_PER_CHUNK // self.M)
        flat = self.counts.view(-1)
        for s in range(0, codes.shape[0], step):
            idx = (row[s : s + step, None] * (self.M * self.K) + m_off + codes[s : s + step]).reshape(-1)
            flat += torch.bincount(idx, minlength=n_bins)

    @property
    def class_counts(self) -> np.ndarray:
        """``[n_classes, M, K]`` counts of labelled pixels (numpy int64)."""
        return self.counts[: self.n_classes].cpu().numpy()

    @property
    def class_pixels(self) -> np.ndarray:
        """``[n_classes]`` labelled pixels per class."""
        return self.class_counts[:, 0, :].sum(-1)

    @property
    def all_counts(self) -> np.ndarray:
        """``[M, K]`` counts over every pixel, labelled or not."""
        return self.counts.sum(0).cpu().numpy()


def _entropy_bits(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Plug-in entropy in bits of count vectors along ``axis``; NaN where the total is 0."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / total
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    h = terms.sum(axis=axis)
    return np.where(np.squeeze(total, axis=axis) > 0, h, np.nan)


def class_entropy(counts: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-class code entropy from ``counts [n_classes, M, K]``.

    Returns:
        ``total [n_classes]`` = Σ_m H(k_m | class) in bits and ``per_subspace [n_classes, M]``;
        NaN for classes without pixels.
    """
    counts = counts.cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)
    if counts.ndim != 3:
        raise ValueError(f"counts must be [n_classes, M, K], got shape {counts.shape}")
    per_subspace = _entropy_bits(counts, axis=-1)
    return per_subspace.sum(axis=1), per_subspace


def joint_code_entropy(
    codes: Tensor, labels: Tensor, n_classes: int, min_samples_per_tuple: float = 5.0
) -> dict[str, np.ndarray]:
    """Plug-in entropy (bits) of the whole M-tuple of codes per class, from raw ``codes [P, M]``.

    With ``S`` distinct tuples among ``n`` pixels the plug-in estimate is biased low by about
    ``(S − 1) / (2 n ln 2)`` bits (Miller–Madow, also returned as a corrected value) and can never exceed
    ``log2 n``; it is flagged ``reliable`` only when ``n >= min_samples_per_tuple · S``.

    Returns:
        dict of ``[n_classes]`` arrays: ``entropy``, ``entropy_miller_madow``, ``distinct_tuples``,
        ``pixels``, ``max_entropy`` (= log2 pixels), ``reliable`` (bool). NaN for empty classes.
    """
    _check_codes_labels(codes, labels)
    out = {k: np.full(n_classes, np.nan) for k in ("entropy", "entropy_miller_madow", "max_entropy")}
    out["distinct_tuples"] = np.zeros(n_classes, dtype=np.int64)
    out["pixels"] = np.zeros(n_classes, dtype=np.int64)
    out["reliable"] = np.zeros(n_classes, dtype=bool)
    for c in range(n_classes):
        rows = codes[labels == c]
        n = rows.shape[0]
        if n == 0:
            continue
        _, tuple_counts = torch.unique(rows, dim=0, return_counts=True)
        S = tuple_counts.numel()
        h = float(_entropy_bits(tuple_counts.cpu().numpy()))
        out["entropy"][c] = h
        out["entropy_miller_madow"][c] = h + (S - 1) / (2.0 * n * np.log(2.0))
        out["distinct_tuples"][c] = S
        out["pixels"][c] = n
        out["max_entropy"][c] = np.log2(n)
        out["reliable"][c] = n >= min_samples_per_tuple * S
    return out


def codeword_frequency(all_counts: np.ndarray | Tensor) -> np.ndarray:
    """``[M, K]`` counts → selection frequency per codebook (each row sums to 1; NaN rows if empty)."""
    c = all_counts.cpu().numpy() if isinstance(all_counts, Tensor) else np.asarray(all_counts)
    c = c.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return c / c.sum(axis=-1, keepdims=True)


def codebook_usage(freq: np.ndarray) -> dict[str, np.ndarray]:
    """Per codebook: ``used_fraction [M]`` (share of the K codewords selected at least once) and
    ``perplexity [M]`` = 2^H(freq) (the effective number of codewords, K when uniform)."""
    freq = np.asarray(freq, dtype=np.float64)
    return {"used_fraction": (freq > 0).mean(axis=-1), "perplexity": np.exp2(_entropy_bits(freq, axis=-1))}


def entropy_vs_accuracy(
    entropy: np.ndarray, accuracy: np.ndarray, frequency: np.ndarray | None = None
) -> dict[str, Any]:
    """Pair per-class entropy (bits) with per-class accuracy (%) and pixel frequency; Spearman's ρ over
    the classes where both are defined (NaN with fewer than 3 such classes)."""
    entropy, accuracy = np.asarray(entropy, float), np.asarray(accuracy, float)
    if entropy.shape != accuracy.shape:
        raise ValueError(f"entropy {entropy.shape} and accuracy {accuracy.shape} must have the same shape")
    ok = np.isfinite(entropy) & np.isfinite(accuracy)
    rho, pval = (np.nan, np.nan)
    if ok.sum() >= 3 and np.ptp(entropy[ok]) > 0 and np.ptp(accuracy[ok]) > 0:
        res = spearmanr(entropy[ok], accuracy[ok])
        rho, pval = float(res.statistic), float(res.pvalue)
    out: dict[str, Any] = {"entropy": entropy, "accuracy": accuracy, "spearman_rho": rho, "spearman_p": pval}
    if frequency is not None:
        out["frequency"] = np.asarray(frequency, float)
    return out


def _probs(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / counts.sum(axis=-1, keepdims=True)


def class_distance(
    counts: np.ndarray | Tensor,
    codebooks: Tensor | np.ndarray | None = None,
    metric: str = "centroid",
    normalize: bool = True,
) -> np.ndarray:
    """Inter-class distance ``[n_classes, n_classes]`` from ``counts [n_classes, M, K]`` (module docs).

    Args:
        counts: per-class code histograms (:attr:`CodeHistogram.class_counts`).
        codebooks: ``[M, K, Ds]`` the vectors the codes stand for (raw codewords for EQUSS, the k-means
            centroids for continuous features); needed by ``"centroid"`` and ``"pairwise"``.
        metric: one of :data:`DISTANCE_METRICS`.
        normalize: divide ``"centroid"``/``"pairwise"`` by their largest finite entry (→ [0, 1]).
    """
    counts = counts.cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)
    if counts.ndim != 3:
        raise ValueError(f"counts must be [n_classes, M, K], got shape {counts.shape}")
    C, M, K = counts.shape
    empty = counts[:, 0, :].sum(-1) == 0
    p = _probs(counts)  # [C, M, K], NaN rows for empty classes
    if metric in ("centroid", "pairwise"):
        if codebooks is None:
            raise ValueError(f"metric {metric!r} needs the codebooks [M, K, Ds]")
        cb = (
            codebooks.detach().cpu().double().numpy()
            if isinstance(codebooks, Tensor)
            else np.asarray(codebooks, float)
        )
        if cb.ndim != 3 or cb.shape[:2] != (M, K):
            raise ValueError(f"codebooks must be [M={M}, K={K}, Ds], got shape {cb.shape}")
        mu = np.einsum("cmk,mkd->cmd", p, cb).reshape(C, -1)  # class mean of the quantized vectors
        sq = np.einsum("cmk,mk->c", p, (cb**2).sum(-1))  # E‖q‖² per class
        if metric == "centroid":
            d2 = ((mu[:, None, :] - mu[None, :, :]) ** 2).sum(-1)
        else:
            d2 = sq[:, None] + sq[None, :] - 2.0 * mu @ mu.T
        d = np.sqrt(np.clip(d2, 0.0, None))
        if metric == "centroid":
            np.fill_diagonal(d, 0.0)
        if normalize:
            finite = d[np.isfinite(d)]
            if finite.size and finite.max() > 0:
                d = d / finite.max()
    elif metric == "hamming":
        modal = counts.argmax(-1)  # [C, M]
        d = (modal[:, None, :] != modal[None, :, :]).mean(-1).astype(np.float64)
    elif metric == "js":
        with np.errstate(invalid="ignore", divide="ignore"):
            d = jensenshannon(p[:, None], p[None, :], axis=-1, base=2).mean(-1)
        np.fill_diagonal(d, 0.0)
    else:
        raise ValueError(f"metric must be one of {DISTANCE_METRICS}, got {metric!r}")
    d = np.array(d, dtype=np.float64)
    d[empty, :] = np.nan
    d[:, empty] = np.nan
    return d


# --------------------------------------------------------------------------------------------------
# Product k-means for continuous features
# --------------------------------------------------------------------------------------------------


def _split(x: Tensor, M: int, normalize: bool) -> Tensor:
    if x.dim() != 2 or x.shape[1] % M:
        raise ValueError(f"features must be [P, D] with D divisible by M = {M}, got shape {tuple(x.shape)}")
    x = x.float().reshape(x.shape[0], M, x.shape[1] // M)
    return F.normalize(x, dim=-1) if normalize else x


def fit_product_kmeans(
    features: Tensor,
    M: int,
    K: int,
    iters: int = 25,
    normalize: bool = True,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Product k-means codebook ``[M, K, Ds]`` for continuous features ``[P, D]`` (``D = M·Ds``).

    A thin wrapper over :func:`equss.ops.kmeans.product_kmeans` (k-means++ seeding, Lloyd iterations
    with :func:`equss.ops.pq_assign` for the assignment and :func:`equss.ops.pq_cluster_stats` for the
    update, all M subspaces at once on the features' device, ties → lowest index like the PQ head).
    That is why it is preferred to ``scipy.cluster.vq.kmeans2``, which would loop over the M subspaces
    in float64 on the CPU.

    Args:
        features: ``[P, D]`` float, ``P >= K``; subsample large sets before fitting (the cost of seeding
            grows as K·P·D).
        normalize: l2-normalise each sub-vector first, as EQUSS's head does (``normalize: l2``) —
            recommended so continuous and PQ features are quantized alike (use the same flag in
            :func:`quantize`).
        iters: maximum Lloyd iterations.

    Returns:
        ``codebooks [M, K, Ds]`` float32 and the codes ``[P, M]`` int32 of ``features``.
    """
    x = _split(features, M, normalize)
    if x.shape[0] < K:
        raise ValueError(f"need at least K = {K} rows to fit k-means, got P = {x.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    return product_kmeans(x, K, iters=iters, metric="l2", init="kmeans++", generator=g)


def quantize(features: Tensor, codebooks: Tensor, normalize: bool = True) -> Tensor:
    """Codes ``[P, M]`` int32 of ``features [P, D]`` under ``codebooks [M, K, Ds]`` (l2 metric)."""
    x = _split(features, codebooks.shape[0], normalize)
    return pq_assign(x, codebooks.to(x.device, torch.float32), "l2")[0]


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _figure(figsize: tuple[float, float], **subplots_kw):
    """A pyplot-free figure: rendered by the Agg canvas, no global backend switch, nothing to close."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(**subplots_kw)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_stego_shifts(samples: Mapping[str, Tensor], shifts: Mapping[str, float], path: str | os.PathLike) -> Path:
    """Histograms of the feature correlations of the STEGO loss's three pairings, each with its shift.

    Pairs to the right of a pairing's shift attract (their codes are pulled together), those to the left
    repel; the caption states which fraction of each pairing attracts.
    """
    titles = {"pos_intra": "self (same image)", "pos_inter": "kNN neighbour", "neg_inter": "random image"}
    fig, axes = _figure((11.0, 3.3), ncols=3, sharey=False)
    for ax, key in zip(axes, ("pos_intra", "pos_inter", "neg_inter")):
        v = samples[key].detach().float().cpu().numpy().ravel()
        b = float(shifts[key])
        ax.hist(v, bins=80, color="0.55")
        ax.axvline(b, color="C3", lw=2)
        attract = float((v > b).mean()) if v.size else float("nan")
        ax.set_title(f"{titles[key]}: shift {b:.3f}, {100 * attract:.0f}% attract", fontsize=9)
        ax.set_xlabel("feature correlation (cosine, point-wise centred)")
    axes[0].set_ylabel("sampled point pairs")
    fig.suptitle("STEGO shifts measured on the training data (loss.preset=auto)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_class_entropy(
    entropies: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    path: str | os.PathLike,
    ylabel: str = "per-class entropy Σ_m H (bits)",
) -> Path:
    """Grouped bar chart of per-class entropy, one bar per model (e.g. EQUSS vs STEGO)."""
    names = list(class_names)
    n = len(names)
    fig, ax = _figure((max(6.0, 0.45 * n + 2), 4.0))
    width = 0.8 / max(1, len(entropies))
    for i, (label, h) in enumerate(entropies.items()):
        h = np.asarray(h, float)
        if h.shape != (n,):
            raise ValueError(f"entropy of {label!r} must have shape ({n},), got {h.shape}")
        ax.bar(np.arange(n) + (i - (len(entropies) - 1) / 2) * width, np.nan_to_num(h), width, label=label)
    ax.set_xticks(np.arange(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_codeword_usage(freq: np.ndarray, path: str | os.PathLike) -> Path:
    """Heat map of the selection frequency ``[M, K]`` (log scale) and each codebook's sorted frequencies."""
    freq = np.asarray(freq, float)
    M, K = freq.shape
    fig, (ax0, ax1) = _figure((12, 4), ncols=2, gridspec_kw={"width_ratios": [2, 1]})
    floor = 0.1 / max(1, K * 1000)  # unused codewords are shown at the bottom of the colour scale
    im = ax0.imshow(
        np.log10(np.maximum(np.nan_to_num(freq), floor)),
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
    )
    ax0.set_xlabel("codeword k")
    ax0.set_ylabel("codebook m")
    ax0.set_title("log10 selection frequency")
    fig.colorbar(im, ax=ax0)
    ranks = np.arange(1, K + 1)
    for m in range(M):
        ax1.plot(ranks, np.sort(np.nan_to_num(freq[m]))[::-1], lw=0.8, alpha=0.6)
    ax1.axhline(1.0 / K, color="k", ls="--", lw=1, label="uniform 1/K")
    ax1.set_yscale("log")
    ax1.set_xlabel("codeword rank")
    ax1.set_ylabel("frequency")
    ax1.set_title("sorted per codebook")
    ax1.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_entropy_vs_accuracy(
    entropy: np.ndarray,
    accuracy: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    frequency: np.ndarray | None = None,
) -> Path:
    """Scatter of per-class entropy (x) against accuracy (y), coloured by pixel share (log), labelled."""
    entropy, accuracy = np.asarray(entropy, float), np.asarray(accuracy, float)
    ok = np.isfinite(entropy) & np.isfinite(accuracy)
    fig, ax = _figure((7, 5))
    if frequency is not None:
        f = np.asarray(frequency, float) * 100.0
        sc = ax.scatter(entropy[ok], accuracy[ok], c=np.log10(np.maximum(f[ok], 1e-4)), cmap="plasma", s=30)
        fig.colorbar(sc, ax=ax, label="log10 pixel share (%)")
    else:
        ax.scatter(entropy[ok], accuracy[ok], s=30)
    for i in np.flatnonzero(ok):
        ax.annotate(
            class_names[i], (entropy[i], accuracy[i]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlabel("per-class entropy (bits)")
    ax.set_ylabel("per-class accuracy (%)")
    fig.tight_layout()
    return _save(fig, path)


def plot_class_distance(
    matrix: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "inter-class distance",
) -> Path:
    """Class × class heat map; darker = closer (``magma``: 0 is black); NaN (absent class) in grey."""
    n = len(class_names)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")
    fig, ax = _figure((max(5.0, 0.3 * n + 3), max(4.0, 0.3 * n + 2)))
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, interpolation="nearest")
    ax.set_xticks(np.arange(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(n), class_names, fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------


def run_analyses(
    out_dir: str | os.PathLike,
    histogram: CodeHistogram,
    class_names: Sequence[str],
    *,
    codebooks: Tensor | None = None,
    class_accuracy: np.ndarray | None = None,
    model_name: str = "EQUSS",
    reference: Mapping[str, CodeHistogram] | None = None,
    joint: Mapping[str, np.ndarray] | None = None,
    distance_metrics: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write the four analyses of the paper's figure to ``out_dir`` and return the files written.

    Args:
        histogram: the model's per-class code histograms.
        class_names: ``n_classes`` names.
        codebooks: ``[M, K, Ds]`` for the ``"centroid"`` and ``"pairwise"`` distances (skipped without).
        class_accuracy: ``[n_classes]`` per-class accuracy in % (e.g. the cluster probe's
            ``SegmentationMetrics.class_accuracy``); without it (c) is skipped.
        reference: other models' histograms for the entropy bar chart, e.g. ``{"STEGO": hist}``.
        joint: output of :func:`joint_code_entropy`, stored with the entropy if given.
        distance_metrics: which of :data:`DISTANCE_METRICS` (default: all that the inputs allow).

    Files: ``class_entropy.{json,png}``, ``codeword_usage.{json,png}``,
    ``entropy_vs_accuracy.{json,png}``, ``class_distance_<metric>.{json,png}``.
    """
    out = Path(out_dir)
    names = list(class_names)
    if len(names) != histogram.n_classes:
        raise ValueError(f"expected {histogram.n_classes} class names, got {len(names)}")
    files: dict[str, Path] = {}
    freq_class = histogram.class_pixels / max(1, histogram.class_pixels.sum())

    total, per_sub = class_entropy(histogram.class_counts)
    hists = {model_name: histogram, **(reference or {})}
    entropies, normalized, shapes = {}, {}, {}
    for label, h in hists.items():
        if h.n_classes != histogram.n_classes:
            raise ValueError(f"reference {label!r} has {h.n_classes} classes, expected {histogram.n_classes}")
        entropies[label] = total if h is histogram else class_entropy(h.class_counts)[0]
        normalized[label] = entropies[label] / (h.M * np.log2(h.K)) if h.K > 1 else np.zeros_like(total)
        shapes[label] = {"M": h.M, "K": h.K}
    payload: dict[str, Any] = {
        "definition": "sum over subspaces m of the plug-in entropy (bits) of the codes of subspace m "
        "over the pixels of the class; 'entropy_normalized' divides by its maximum M·log2 K",
        "class_names": names,
        "codebooks": shapes,
        "class_frequency": freq_class,
        "entropy": entropies,
        "entropy_normalized": normalized,
        "entropy_per_subspace": per_sub,
    }
    if joint is not None:
        payload["joint_entropy"] = dict(joint)
    files["class_entropy.json"] = save_json(out / "class_entropy.json", payload)
    # Sums over different M (or K) are not comparable: then plot the share of the maximum M·log2 K.
    same_shape = len({(v["M"], v["K"]) for v in shapes.values()}) == 1
    files["class_entropy.png"] = plot_class_entropy(
        entropies if same_shape else normalized,
        names,
        out / "class_entropy.png",
        ylabel="per-class entropy Σ_m H (bits)" if same_shape else "per-class entropy / (M·log2 K)",
    )

    freq = codeword_frequency(histogram.all_counts)
    usage = codebook_usage(freq)
    files["codeword_usage.json"] = save_json(out / "codeword_usage.json", {"frequency": freq, **usage})
    files["codeword_usage.png"] = plot_codeword_usage(freq, out / "codeword_usage.png")

    if class_accuracy is not None:
        eva = entropy_vs_accuracy(total, class_accuracy, freq_class)
        files["entropy_vs_accuracy.json"] = save_json(
            out / "entropy_vs_accuracy.json", {"class_names": names, **eva}
        )
        files["entropy_vs_accuracy.png"] = plot_entropy_vs_accuracy(
            total, class_accuracy, names, out / "entropy_vs_accuracy.png", freq_class
        )

    metrics = distance_metrics or [
        m for m in DISTANCE_METRICS if codebooks is not None or m in ("hamming", "js")
    ]
    for metric in metrics:
        d = class_distance(histogram.class_counts, codebooks, metric=metric)
        stem = f"class_distance_{metric}"
        files[f"{stem}.json"] = save_json(
            out / f"{stem}.json", {"metric": metric, "class_names": names, "distance": d}
        )
        files[f"{stem}.png"] = plot_class_distance(
            d, names, out / f"{stem}.png", title=f"inter-class distance ({metric})"
        )
    return files

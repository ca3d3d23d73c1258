"""The two probes of the unsupervised-segmentation protocol, trained on the side of the EQUSS head.

* :class:`ClusterProbe` (STEGO's ``ClusterLookup``): ``n_classes + extra_clusters`` learnable centroids,
  cosine similarity, hard assignment; its predictions are matched to classes by the Hungarian algorithm
  at evaluation (:mod:`equss.evaluate`).
* :class:`LinearProbe`: a 1×1 convolution trained with cross-entropy on pixels with a valid label,
  evaluated with the identity mapping.

The (quantized) code ``[B, D, h, w]`` is bilinearly upsampled (``align_corners=False``) to the label
size by :func:`upsample_to` before the probes at evaluation (STEGO/EQUSS protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClusterProbe", "LinearProbe", "upsample_to"]

_NORM_EPS = 1e-12  # F.normalize's


def _source_index(out_size: int, in_size: int, device) -> tuple[Tensor, Tensor]:
    """For each output position of a bilinear resize (``align_corners=False``): the lower source index and
    the weight of the upper one, as PyTorch computes them (source coordinates below 0 are clamped)."""
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    lo = src.floor().long().clamp_max(in_size - 1)
    return lo, (src - lo).to(torch.float32)


def _upsampled_norm(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``‖up(x)‖`` per pixel ``[B, H, W]`` of the bilinear upsampling of ``x [B, D, h, w]``, without forming it.

    With replicate padding the upper neighbour of every source index is index + 1 (a border pixel pairs
    with itself), so five Gram maps cover every pair of the four source pixels: ``‖x‖²``, right, down,
    down-right and down-left inner products.
    """
    H, W = size
    xp = F.pad(x.float(), (0, 1, 0, 1), mode="replicate")  # [B, D, h+1, w+1]
    a, r, d, rd = xp[..., :-1, :-1], xp[..., :-1, 1:], xp[..., 1:, :-1], xp[..., 1:, 1:]
    g_aa = (a * a).sum(1)
    g_rr = (r * r).sum(1)
    g_dd = (d * d).sum(1)
    g_xx = (rd * rd).sum(1)
    g_ar, g_ad, g_ax = (a * r).sum(1), (a * d).sum(1), (a * rd).sum(1)
    g_rd, g_rx, g_dx = (r * d).sum(1), (r * rd).sum(1), (d * rd).sum(1)
    y0, ly = _source_index(H, x.shape[-2], x.device)
    x0, lx = _source_index(W, x.shape[-1], x.device)
    hy, hx = 1 - ly, 1 - lx
    pick = lambda g: g[:, y0][:, :, x0]  # noqa: E731  [B, H, W]
    wa = (hy[:, None] * hx[None, :])[None]
    wr = (hy[:, None] * lx[None, :])[None]
    wd = (ly[:, None] * hx[None, :])[None]
    wx = (ly[:, None] * lx[None, :])[None]
    sq = (wa * wa * pick(g_aa) + wr * wr * pick(g_rr) + wd * wd * pick(g_dd) + wx * wx * pick(g_xx)
          + 2 * (wa * wr * pick(g_ar) + wa * wd * pick(g_ad) + wa * wx * pick(g_ax)
                 + wr * wd * pick(g_rd) + wr * wx * pick(g_rx) + wd * wx * pick(g_dx)))
    return sq.clamp_min(0).sqrt().to(x.dtype)


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

    def loss(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Hard-assignment loss: ``−mean over pixels of max_n similarity`` (all pixels, no labels).

        ``size``: the mean is over the pixels of ``x`` upsampled bilinearly (``align_corners=False``) to this
        ``(H, W)`` — what the EQUSS authors' training does (their evaluator upsamples q to the label size
        before both probes). Computed without forming the ``[B, D, H, W]`` upsampled features: bilinear
        upsampling is linear, so ``up(x)·ĉ_n = up(x·ĉ_n)`` (an ``n_clusters``-channel map), and the norm of
        each upsampled pixel is a quadratic form in its four source pixels, ``‖Σ_i w_i x_i‖² =
        Σ_ij w_i w_j ⟨x_i, x_j⟩``, built from five neighbour Gram maps at the feature resolution
        (:func:`_upsampled_norm`). Equal to upsampling first up to fp32 rounding, at ``~n_clusters/D`` of
        its memory and time.
        """
        if size is None or tuple(x.shape[-2:]) == tuple(int(s) for s in size[-2:]):
            return -self(x).max(dim=1).values.mean()
        _check_features(x, self.dim, "ClusterProbe")
        H, W = (int(s) for s in size[-2:])
        c = F.normalize(self.clusters, dim=1).to(x.dtype)
        dots = torch.einsum("bdhw,nd->bnhw", x, c)  # x·ĉ at the feature resolution
        num = F.interpolate(dots, size=(H, W), mode="bilinear", align_corners=False)
        den = _upsampled_norm(x.detach(), (H, W)).clamp_min(_NORM_EPS).unsqueeze(1)
        return -(num / den).max(dim=1).values.float().mean()

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

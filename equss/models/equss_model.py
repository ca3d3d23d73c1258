"""The trainable part of EQUSS: feature dropout → expansion head → product quantizer, plus the probes.

The frozen backbone lives outside this module (:func:`equss.models.backbone.build_backbone`), so the
model can train on cached backbone features (docs/method.md §1):

    f [B, C, h, w] ─ Dropout2d (train only) ─ ExpansionHead ─ z [B, D, h, w] ─ ProductQuantizer ─ q [B, D, h, w]
                                                                          q.detach() → cluster probe, linear probe
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equss.losses import StegoCorrespondenceLoss
from equss.nn import ExpansionHead, ProductQuantizer
from equss.nn.probes import ClusterProbe, LinearProbe, upsample_to
from equss.nn.quantizer import PQStats

__all__ = ["EQUSSModel", "EQUSSOutput", "TrainOutput"]


class EQUSSOutput(NamedTuple):
    z: Tensor  # [B, D, h, w] continuous expanded code
    q: Tensor  # [B, D, h, w] quantized code (straight-through)
    codes: Tensor  # [B, M, h, w] PQ codes
    pq_loss: Tensor  # scalar
    pq_stats: PQStats


class TrainOutput(NamedTuple):
    loss: Tensor  # the total that is back-propagated
    terms: dict  # every scalar term, detached (for logging)


class EQUSSModel(nn.Module):
    """Expansion + product-quantization head with its cluster and linear probes.

    Args:
        in_dim: backbone channels C (384 for ViT-S, 768 for ViT-B).
        n_classes: classes of the dataset (probe outputs).
        dim: D, the expanded dimension (1024 in the paper).
        num_subspaces: M. codebook_size: K.
        dropout: Dropout2d probability on the backbone feature map during training.
        extra_clusters: cluster-probe centroids beyond ``n_classes``.
        cluster_init: ``"randn"`` (STEGO/EQUSS) or ``"kmeans"`` (centroids from k-means on the first
            training batch's codes).
        cluster_loss_at: ``"label"`` (default, the authors' code): the cluster-probe loss is a mean over q
            upsampled bilinearly to the label size, as their evaluator does in training; ``"feature"``: over
            the ``h × w`` feature map (cheaper; the linear probe is the same either way).
        quantizer: keyword arguments of :class:`equss.nn.ProductQuantizer` (``learning``, ``normalize``,
            ``beta``, ``init``, ...); its defaults are the paper's head.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        dim: int = 1024,
        num_subspaces: int = 32,
        codebook_size: int = 256,
        dropout: float = 0.1,
        extra_clusters: int = 0,
        cluster_init: str = "randn",
        cluster_loss_at: str = "label",
        quantizer: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if cluster_init not in ("randn", "kmeans"):
            raise ValueError(f"cluster_init must be 'randn' (STEGO/EQUSS) or 'kmeans', got {cluster_init!r}")
        if cluster_loss_at not in ("label", "feature"):
            raise ValueError(f"cluster_loss_at must be 'label' (the authors') or 'feature', got {cluster_loss_at!r}")
        self.cluster_loss_at = cluster_loss_at
        self.n_classes = n_classes
        self.cluster_init = cluster_init
        # Whether the cluster probe was initialised from data (cluster_init="kmeans"); a buffer so it
        # survives checkpoints and a resumed run does not re-initialise.
        self.register_buffer("cluster_initialized", torch.tensor(cluster_init == "randn"))
        # The dropped-out features feed both the head and the STEGO loss, so the model applies the head's
        # dropout itself and then calls head.project (docs/method.md §1).
        self.head = ExpansionHead(in_dim, dim, dropout=dropout)
        self.quantizer = ProductQuantizer(dim, num_subspaces, codebook_size, channel_dim=1, **dict(quantizer or {}))
        self.cluster_probe = ClusterProbe(dim, n_classes, extra_clusters=extra_clusters)
        self.linear_probe = LinearProbe(dim, n_classes)

    @classmethod
    def from_config(cls, model_cfg, in_dim: int, n_classes: int) -> EQUSSModel:
        """Build from the ``model`` section of a :class:`equss.config.TrainConfig` (its keys are this
        constructor's arguments)."""
        return cls(in_dim=in_dim, n_classes=n_classes, **asdict(model_cfg))

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the main optimiser (and clipped): expansion head + codebooks."""
        return [
            p for p in list(self.head.parameters()) + list(self.quantizer.parameters()) if p.requires_grad
        ]

    def encode(self, f: Tensor) -> EQUSSOutput:
        """``f [B, C, h, w]`` (already dropped out if training) → z, q, codes, PQ loss and statistics."""
        z = self.head.project(f)
        out = self.quantizer(z)
        return EQUSSOutput(z, out.quantized, out.codes, out.loss, out.stats)

    def forward(
        self,
        f: Tensor,
        f_pos: Tensor,
        label: Tensor,
        stego: StegoCorrespondenceLoss,
        stego_weight: float = 1.0,
        pq_weight: float = 1.0,
    ) -> TrainOutput:
        """One training forward: losses of docs/method.md §1 (stego + PQ + both probes).

        Args:
            f, f_pos: backbone features of the anchors and their kNN positives ``[B, C, h, w]``.
            label: anchor labels ``[B, H, W]`` int64, -1 = ignore (used by the linear probe only).
        """
        fd, fd_pos = self.head.dropout(f), self.head.dropout(f_pos)
        out = self.encode(fd)
        z_pos = self.head.project(fd_pos)  # the positive view is not quantized (docs/method.md §1)
        stego_loss, stego_terms = stego(fd, fd_pos, out.z, z_pos)

        q = out.q.detach().float()
        if not bool(self.cluster_initialized):
            self._init_cluster_probe(q)
        cluster_loss = self.cluster_probe.loss(q, size=label.shape[-2:] if self.cluster_loss_at == "label" else None)
        linear_loss = self.linear_probe.loss(q, label)  # upsamples its logits to the label size

        loss = stego_weight * stego_loss + pq_weight * out.pq_loss + cluster_loss + linear_loss
        terms = {
            "loss": loss.detach(),
            "stego": stego_loss.detach(),
            "pq": out.pq_loss.detach(),
            "cluster_probe": cluster_loss.detach(),
            "linear_probe": linear_loss.detach(),
            **{f"stego_{k}": v.detach() for k, v in stego_terms.items()},
        }
        terms["pq_usage"] = out.pq_stats.usage.detach().float()
        terms["pq_perplexity"] = out.pq_stats.perplexity.detach().float().mean()
        with torch.no_grad():  # how many clusters the probe predicts, and how evenly (collapse monitor)
            share = torch.bincount(self.cluster_probe(q).argmax(1).reshape(-1), minlength=self.cluster_probe.n_clusters)
            share = share.float() / share.sum().clamp_min(1)
            terms["clusters_used"] = (share > 0).sum().float()
            terms["cluster_entropy"] = -(share * torch.log2(share.clamp_min(1e-12))).sum()
        return TrainOutput(loss, terms)

    @torch.no_grad()
    def _init_cluster_probe(self, q: Tensor) -> None:
        """k-means on the first training batch's codes; rank 0's centroids are broadcast under DDP."""
        import torch.distributed as dist

        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
        self.cluster_probe.init_from_features(q, generator=g)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.cluster_probe.clusters.data, src=0)
        self.cluster_initialized.fill_(True)

    @torch.no_grad()
    def predict(
        self, f: Tensor, size: tuple[int, int], flip_f: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Probe log-probabilities at ``size``: ``(cluster [B, n_clusters, H, W], linear [B, n_classes, H, W])``.

        ``flip_f`` (features of the horizontally flipped images) averages the code of an image and of its
        flip, as STEGO does (docs/method.md §9; off by default in EQUSS).
        """
        q = self.encode(f).q.float()
        if flip_f is not None:
            q = (q + self.encode(flip_f).q.float().flip(-1)) / 2
        q = upsample_to(q, size)
        cluster = self.cluster_probe.log_probs(q)
        linear = F.log_softmax(self.linear_probe(q), dim=1)
        return cluster, linear

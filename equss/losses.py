"""STEGO correspondence loss (the feature-distillation loss EQUSS trains its expansion head with).

docs/method.md §5. For two images a, b with frozen backbone features ``f`` and head codes ``z``, sample
``S×S`` random points per image, and compare the cosine-correlation tensors

    F[n,h,w,i,j]  = <f̂_a(h,w), f̂_b(i,j)>        (no grad; "pointwise" re-centred per (h,w))
    Cc[n,h,w,i,j] = <ẑ_a(h,w), ẑ_b(i,j)>

with the pair loss ``−clamp(Cc, min=0)·(F − shift)``: codes are pulled together where the backbone
features agree more than ``shift`` and pushed apart where they agree less. Three pairings are used:
the image with itself (``pos_intra``), with its kNN neighbour (``pos_inter``) and with a random other
image of the batch (``neg_inter``, repeated ``neg_samples`` times). The PQ losses live in the quantizer
(:class:`equss.nn.ProductQuantizer` returns them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AUTO",
    "AUTO_QUANTILES",
    "AUTO_WEIGHTS",
    "STEGO_PRESETS",
    "auto_shifts",
    "stego_config_from_shifts",
    "StegoLossConfig",
    "StegoCorrespondenceLoss",
    "correspondence_pair_loss",
    "derangement",
    "sample_points",
    "tensor_correlation",
]


@dataclass(frozen=True)
class StegoLossConfig:
    """Weights and shifts of the three pairings (docs/method.md §5 table) and the sampling settings."""

    pos_intra_weight: float = 0.47
    pos_intra_shift: float = 0.18
    pos_inter_weight: float = 0.45
    pos_inter_shift: float = 0.02
    neg_inter_weight: float = 0.53
    neg_inter_shift: float = 0.23
    feature_samples: int = 11
    neg_samples: int = 5
    zero_clamp: bool = True
    pointwise: bool = True
    stabilize: bool = False


def _preset(intra: tuple[float, float], inter: tuple[float, float], neg: tuple[float, float]) -> StegoLossConfig:
    return StegoLossConfig(intra[0], intra[1], inter[0], inter[1], neg[0], neg[1])


# (dataset, backbone) → weights/shifts, from the authors' configs (docs/method.md §5).
STEGO_PRESETS: dict[str, StegoLossConfig] = {
    "cocostuff27/vit_small_patch8": _preset((0.47, 0.18), (0.45, 0.02), (0.53, 0.23)),
    "cocostuff27/vit_small_patch8/stego": _preset((0.67, 0.08), (0.25, 0.02), (0.63, 0.66)),
    "cocostuff27/vit_base_patch8": _preset((0.10, 0.10), (1.00, 0.20), (0.15, 1.00)),
    "cityscapes/vit_small_patch8": _preset((1.00, 0.36), (0.43, 0.22), (0.95, 0.31)),
    "cityscapes/vit_base_patch8": _preset((1.00, 0.36), (0.43, 0.22), (0.95, 0.31)),
    "potsdam/vit_small_patch8": _preset((0.67, 0.08), (0.25, 0.02), (0.63, 0.46)),
    "potsdam/vit_base_patch8": _preset((0.67, 0.21), (0.25, 0.12), (0.63, 0.26)),
}


AUTO = "auto"
#: Which quantile of each pairing's measured feature correlations ``loss.preset=auto`` takes as its shift
#: (:func:`auto_shifts`). The pairs above the shift attract, those below repel: self pairs are split at
#: the median, kNN pairs likewise, random pairs so that 90 % of them repel (two random images mostly show
#: different things). Chosen on the synthetic benchmark's variants (docs/configuration.md, "loss").
AUTO_QUANTILES = {"pos_intra": 0.5, "pos_inter": 0.5, "neg_inter": 0.9}
#: Weights of the three pairings under ``loss.preset=auto`` (the EQUSS COCO-Stuff ViT-S/8 preset's).
AUTO_WEIGHTS = {"pos_intra": 0.47, "pos_inter": 0.45, "neg_inter": 0.53}


def auto_shifts(samples: dict[str, Tensor], quantiles: dict[str, float] | None = None) -> dict[str, float]:
    """Shifts from measured feature correlations: ``shift_t = quantile_{q_t}(F_t)`` per pairing ``t``.

    ``samples``: 1-D correlation samples per pairing (:meth:`StegoCorrespondenceLoss.correlation_samples`,
    concatenated over a few batches). A large sample is subsampled with a fixed generator (quantiles are
    insensitive to it; ``torch.quantile`` has a size limit).
    """
    q = {**AUTO_QUANTILES, **(quantiles or {})}
    out = {}
    g = torch.Generator().manual_seed(0)
    for key in ("pos_intra", "pos_inter", "neg_inter"):
        v = samples[key].detach().float().cpu().reshape(-1)
        if v.numel() == 0:
            raise ValueError(f"auto_shifts: no {key} samples (a batch of one image has no negative pairs)")
        if v.numel() > 1_000_000:
            v = v[torch.randperm(v.numel(), generator=g)[:1_000_000]]
        out[key] = float(torch.quantile(v, q[key]))
    return out


def stego_config_from_shifts(shifts: dict[str, float], **settings) -> StegoLossConfig:
    """A :class:`StegoLossConfig` with the :data:`AUTO_WEIGHTS` and the given shifts (and settings)."""
    return StegoLossConfig(
        pos_intra_weight=AUTO_WEIGHTS["pos_intra"], pos_intra_shift=shifts["pos_intra"],
        pos_inter_weight=AUTO_WEIGHTS["pos_inter"], pos_inter_shift=shifts["pos_inter"],
        neg_inter_weight=AUTO_WEIGHTS["neg_inter"], neg_inter_shift=shifts["neg_inter"], **settings,
    )


def _norm(t: Tensor) -> Tensor:
    return F.normalize(t, dim=1, eps=1e-10)


def tensor_correlation(a: Tensor, b: Tensor) -> Tensor:
    """``[N, C, H, W] × [N, C, I, J] → [N, H, W, I, J]``: channel inner products of every point pair."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def sample_points(t: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples of ``t [N, C, H, W]`` at ``coords [N, S, S, 2]`` in ``[-1, 1]`` → ``[N, C, S, S]``.

    Border padding and ``align_corners=True`` as in STEGO (which also swaps the two grid axes; the points
    are uniform random, so the swap only matters for bit-exact reproduction and is kept).
    """
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


@torch.no_grad()
def feature_correlation(f1: Tensor, f2: Tensor, pointwise: bool = True) -> Tensor:
    """``F [N, S, S, S, S]``: cosine correlations of sampled backbone features, the target of the loss.

    With ``pointwise``, each anchor point's correlations are centred over the other image's points and the
    global mean is restored (so only the per-point offsets are removed), as STEGO does.
    """
    fd = tensor_correlation(_norm(f1), _norm(f2))
    if pointwise:
        old_mean = fd.mean()
        fd = fd - fd.mean(dim=(3, 4), keepdim=True)
        fd = fd - fd.mean() + old_mean
    return fd


def correspondence_pair_loss(
    f1: Tensor,
    f2: Tensor,
    c1: Tensor,
    c2: Tensor,
    shift: float,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-pair loss tensor ``[N, S, S, S, S]`` and the code correlation ``Cc``.

    Args:
        f1, f2: sampled backbone features ``[N, C, S, S]`` (no gradient flows into them).
        c1, c2: sampled codes ``[N, D, S, S]``.
        shift: the constant subtracted from the feature correlation.
    """
    fd = feature_correlation(f1, f2, pointwise)
    cd = tensor_correlation(_norm(c1), _norm(c2))
    min_val = 0.0 if zero_clamp else -9999.0
    cd_clamped = cd.clamp(min_val, 0.8) if stabilize else cd.clamp(min=min_val)
    return -cd_clamped * (fd - shift), cd


def derangement(n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
    """A random index map with no fixed point (STEGO's ``super_perm``): image i is never its own negative.

    Needs ``n >= 2``. Like STEGO, fixed points of a random permutation are moved to the next index, so the
    map has no fixed point but is not always a permutation.
    """
    if n < 2:
        raise ValueError(f"negative pairs need a batch of at least 2 images, got {n}")
    perm = torch.randperm(n, generator=generator, device="cpu")
    perm = torch.where(perm == torch.arange(n), perm + 1, perm) % n
    return perm.to(device)


class StegoCorrespondenceLoss(nn.Module):
    """The STEGO correspondence loss ``L_stego`` of docs/method.md §5.

    Call with backbone features ``f, f_pos [B, C, h, w]`` (anchor and kNN positive, after dropout) and
    head codes ``z, z_pos [B, D, h, w]`` (before quantization). Returns ``(total, terms)`` where
    ``terms`` holds the three unweighted means (``pos_intra``, ``pos_inter``, ``neg_inter``).
    """

    def __init__(self, config: StegoLossConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = config or StegoLossConfig()
        if overrides:
            cfg = StegoLossConfig(**{**asdict(cfg), **overrides})
        if cfg.feature_samples < 1:
            raise ValueError(f"feature_samples must be >= 1, got {cfg.feature_samples}")
        if cfg.neg_samples < 0:
            raise ValueError(f"neg_samples must be >= 0, got {cfg.neg_samples}")
        self.cfg = cfg

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.cfg).items())

    def _pair(self, f1, f2, c1, c2, shift) -> Tensor:
        loss, _ = correspondence_pair_loss(
            f1, f2, c1, c2, shift, self.cfg.pointwise, self.cfg.zero_clamp, self.cfg.stabilize
        )
        return loss.mean()

    @torch.no_grad()
    def correlation_samples(self, f: Tensor, f_pos: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The feature correlations each pairing of :meth:`forward` compares with its shift, for one batch.

        Sampled exactly as the loss samples them (``feature_samples²`` random points per image, the kNN
        positive, ``neg_samples`` derangements of the batch); returns 1-D tensors keyed ``pos_intra``,
        ``pos_inter`` and ``neg_inter``. :func:`auto_shifts` turns them into shifts.
        """
        cfg = self.cfg
        B, S = f.shape[0], cfg.feature_samples
        coords1 = (torch.rand(B, S, S, 2, generator=generator) * 2 - 1).to(f.device, f.dtype)
        coords2 = (torch.rand(B, S, S, 2, generator=generator) * 2 - 1).to(f.device, f.dtype)
        fs, fs_pos = sample_points(f, coords1), sample_points(f_pos, coords2)
        out = {
            "pos_intra": feature_correlation(fs, fs, cfg.pointwise).reshape(-1),
            "pos_inter": feature_correlation(fs, fs_pos, cfg.pointwise).reshape(-1),
        }
        neg = []
        for _ in range(max(cfg.neg_samples, 1) if B >= 2 else 0):
            perm = derangement(B, f.device, generator)
            neg.append(feature_correlation(fs, sample_points(f[perm], coords2), cfg.pointwise).reshape(-1))
        out["neg_inter"] = torch.cat(neg) if neg else f.new_zeros(0)
        return out

    def forward(
        self, f: Tensor, f_pos: Tensor, z: Tensor, z_pos: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if f.dim() != 4 or z.dim() != 4 or f.shape != f_pos.shape or z.shape != z_pos.shape:
            raise ValueError(
                f"StegoCorrespondenceLoss: expected f, f_pos [B, C, h, w] and z, z_pos [B, D, h, w] with "
                f"matching shapes, got f {tuple(f.shape)}, f_pos {tuple(f_pos.shape)}, z {tuple(z.shape)}, "
                f"z_pos {tuple(z_pos.shape)}"
            )
        if f.shape[0] != z.shape[0]:
            raise ValueError(f"batch sizes differ: f {tuple(f.shape)} vs z {tuple(z.shape)}")
        cfg = self.cfg
        B, S = f.shape[0], cfg.feature_samples
        # Sampling points are drawn on the CPU generator so runs are reproducible on any device.
        coords1 = (torch.rand(B, S, S, 2, generator=generator) * 2 - 1).to(f.device, f.dtype)
        coords2 = (torch.rand(B, S, S, 2, generator=generator) * 2 - 1).to(f.device, f.dtype)
        fs, zs = sample_points(f, coords1), sample_points(z, coords1)
        fs_pos, zs_pos = sample_points(f_pos, coords2), sample_points(z_pos, coords2)

        terms = {
            "pos_intra": self._pair(fs, fs, zs, zs, cfg.pos_intra_shift),
            "pos_inter": self._pair(fs, fs_pos, zs, zs_pos, cfg.pos_inter_shift),
        }
        if cfg.neg_samples > 0 and B >= 2:
            neg = []
            for _ in range(cfg.neg_samples):
                perm = derangement(B, f.device, generator)
                neg.append(self._pair(fs, sample_points(f[perm], coords2), zs, sample_points(z[perm], coords2), cfg.neg_inter_shift))
            terms["neg_inter"] = torch.stack(neg).mean()
        else:
            terms["neg_inter"] = f.new_zeros(())
        total = (
            cfg.pos_intra_weight * terms["pos_intra"]
            + cfg.pos_inter_weight * terms["pos_inter"]
            + cfg.neg_inter_weight * terms["neg_inter"]
        )
        return total, terms

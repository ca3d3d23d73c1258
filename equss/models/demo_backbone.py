"""``DemoBackbone``: a frozen, weight-free featurizer with the ViT backbone contract.

It lets the whole EQUSS pipeline (kNN precompute → expansion head → PQ → probes) run with no download,
on :class:`equss.data.synthetic.SyntheticScenes` or any image. Contract shared with the DINO ViTs
(``equss.models.backbone``): ``forward(images [B,3,H,W]) -> [B, C, H/p, W/p]`` with images normalised
with the ImageNet mean/std, ``H`` and ``W`` multiples of ``patch_size`` (p = 8), attributes
``patch_size`` and ``embed_dim`` (= C). Deterministic; no learned parameters (everything is a buffer).

Features per p×p patch (a classic texture descriptor, V1-like):

1. **Oriented band-pass energy.** Analytic log-Gabor filters at ``len(wavelengths)`` scales ×
   ``orientations`` orientations are applied in the Fourier domain to each RGB channel (reflect-padded),
   and the complex magnitudes are combined over channels, ``E = sqrt(Σ_c |r_c|²)``: phase invariant and
   independent of *which* colours paint a texture, only of its contrast.
2. **Rectification + compression + normalisation:** ``log(1 + E / e0)`` minus its mean over the filter
   bank at that patch (contrast normalisation) and minus a fixed per-scale offset, so that features
   are centred and cosine similarities informative.
3. **Local pooling:** mean over each p×p patch, and the same maps averaged over the 3×3 neighbourhood
   of patches (context, like the receptive field growth of a ViT's later blocks).
4. **Colour statistics:** per-patch RGB mean − 0.5 and standard deviation − 0.15 (in [0, 1] units), × 3.

Output channels ``C = 2·S·O + 6`` (S scales, O orientations): 38 with the defaults (4 × 4).

On :class:`SyntheticScenes` (5 classes, 112×112, val split of 100 images) these features carry the
texture class — a linear probe on them reaches ~88 % pixel accuracy — but not trivially: k-means
(K = 5) + Hungarian on them gives 54-59 % (colour means alone: ~24 %, chance 22 %), because scale
changes, faint regions and the colour channels (pure nuisance there; ``colour_weight`` 3 puts them on the scale of the
texture channels, as colour is prominent in real ViT features) pull the clusters apart. That is the
gap a trained head (EQUSS: expansion + PQ with the STEGO loss on kNN positives) has to close.
Cost: ~20 ms of CPU per 112×112 image (FFTs of the 128×128 reflect-padded image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equss.normalization import IMAGENET_MEAN, IMAGENET_STD

# Bump when the features change in a way no constructor argument shows (the feature cache and the kNN
# files key on it, through ``version`` and the backbone's ``weights_id``).
DEMO_VERSION = 2


class DemoBackbone(nn.Module):
    """Fixed log-Gabor filter bank + colour statistics on p×p patches (see the module docstring).

    Args:
        patch_size: output stride p (default 8, like ViT-S/8).
        wavelengths: centre wavelengths of the log-Gabor scales in pixels (default 3, 6, 12, 24).
        orientations: number of orientations in [0, π) (default 4).
        bandwidth: log-Gabor radial bandwidth σ_r/f0 (0.55 ≈ 2 octaves).
        angular_sigma: angular bandwidth in radians (default π/(2·orientations)·1.2).
        pad: reflect padding before the FFT (kills wrap-around at the image border; 8 makes 112 → 128).
        energy_scale: e0 of the ``log(1 + E/e0)`` compression (E in [0, 1] image units).
        colour_weight: multiplier of the 6 colour-statistic channels.
        spectral_offset: per-scale constant subtracted from the normalised log-energies (default: the
            mean profile of SyntheticScenes for the default wavelengths; None = 0).
    """

    def __init__(
        self,
        patch_size: int = 8,
        wavelengths: tuple[float, ...] = (3.0, 6.0, 12.0, 24.0),
        orientations: int = 4,
        bandwidth: float = 0.55,
        angular_sigma: float | None = None,
        pad: int = 8,
        energy_scale: float = 0.01,
        colour_weight: float = 3.0,
        spectral_offset: tuple[float, ...] | None = (0.33, 0.19, -0.18, -0.34),
    ):
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = int(patch_size)
        self.version = DEMO_VERSION
        self.wavelengths = tuple(float(w) for w in wavelengths)
        self.orientations = int(orientations)
        self.bandwidth = float(bandwidth)
        self.angular_sigma = (
            float(angular_sigma) if angular_sigma is not None else 1.2 * math.pi / (2 * orientations)
        )
        self.pad = int(pad)
        self.energy_scale = float(energy_scale)
        self.colour_weight = float(colour_weight)
        self.colour_std_centre = 0.15  # typical within-patch RGB std of a textured region
        offset = torch.zeros(len(self.wavelengths)) if spectral_offset is None else torch.tensor(spectral_offset)
        if offset.numel() != len(self.wavelengths):
            raise ValueError(
                f"spectral_offset needs one value per wavelength ({len(self.wavelengths)}), got {offset.numel()}"
            )
        # [S·O, 1, 1], scale-major like the filter bank
        self.register_buffer(
            "spectral_offset", offset.float().repeat_interleave(self.orientations).view(-1, 1, 1), persistent=False
        )
        self.num_filters = len(self.wavelengths) * self.orientations
        self.embed_dim = 2 * self.num_filters + 6
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._bank_cache: dict[tuple[int, int, torch.device], Tensor] = {}
        self.requires_grad_(False)
        self.eval()

    def _bank(self, H: int, W: int, device: torch.device) -> Tensor:
        """Real, even frequency responses ``[S·O, H, W//2+1]`` (rfft layout) of the log-Gabor filters.

        Even-symmetric (angular Gaussians around θ and θ+π) so the spatial filter is real and the rfft
        halves the work; squaring then patch-averaging the response measures the local energy (the
        classic filter → rectify → filter texture model), phase effects average out over the patch.
        """
        key = (H, W, device)
        if key not in self._bank_cache:
            fy = torch.fft.fftfreq(H, dtype=torch.float64).view(H, 1)
            fx = torch.fft.rfftfreq(W, dtype=torch.float64).view(1, -1)
            fy, fx = torch.broadcast_tensors(fy, fx)
            radius = torch.sqrt(fx * fx + fy * fy)
            radius[0, 0] = 1.0  # avoid log(0); the DC term is zeroed below
            angle = torch.atan2(fy, fx)
            filters = []
            for lam in self.wavelengths:
                f0 = 1.0 / lam
                radial = torch.exp(-(torch.log(radius / f0) ** 2) / (2 * math.log(1 + self.bandwidth) ** 2))
                radial[0, 0] = 0.0
                for o in range(self.orientations):
                    theta = math.pi * o / self.orientations
                    # angular distance to the axis θ (mod π: even filter)
                    d = torch.remainder(angle - theta + math.pi / 2, math.pi) - math.pi / 2
                    filters.append(radial * torch.exp(-(d * d) / (2 * self.angular_sigma**2)))
            self._bank_cache[key] = torch.stack(filters).to(device=device, dtype=torch.float32)
        return self._bank_cache[key]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``images [B,3,H,W]`` (ImageNet-normalised, H and W multiples of p) → ``[B, embed_dim, H/p, W/p]``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DemoBackbone expects images [B, 3, H, W], got shape {tuple(images.shape)}")
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"DemoBackbone: H and W must be multiples of patch_size={p}, got {H}x{W}")
        rgb = images.float() * self.std + self.mean  # back to [0, 1]

        P = min(self.pad, H - 1, W - 1)
        x = F.pad(rgb, (P, P, P, P), mode="reflect") if P > 0 else rgb
        Hp, Wp = x.shape[-2:]
        spec = torch.fft.rfft2(x)  # [B, 3, Hp, Wp//2+1]
        bank = self._bank(Hp, Wp, x.device)  # [S·O, Hp, Wp//2+1]
        local = []
        # one filter at a time keeps the working set at [B, 3, Hp, Wp] instead of ×S·O
        for f in bank:
            r = torch.fft.irfft2(spec * f, s=(Hp, Wp))[..., P : P + H, P : P + W]
            local.append(F.avg_pool2d(r.square().sum(1, keepdim=True), p))
        energy = torch.cat(local, 1).sqrt()  # [B, S·O, h, w] rms response per patch
        local = torch.log1p(energy / self.energy_scale)
        context = F.avg_pool2d(local, 3, stride=1, padding=1, count_include_pad=False)
        # Centring (data-independent): subtract each patch's mean log-energy over the filter bank (a
        # divisive contrast normalisation in the log domain) and centre the colour statistics on fixed
        # values. Uncentred, every feature is positive and all patches have cosine similarity ~0.95,
        # which leaves the STEGO correspondence loss (thresholds ~0.1-0.3 on cosine similarity) nothing
        # to separate. The spectral offset (per scale; the mean profile of SyntheticScenes, measured once
        # on its seed-0 train split and frozen here) removes the typical "more fine than coarse energy"
        # slope shared by all textures; then same-class patches have cosine ~0.2 and others ~0, the
        # range DINO features have and that the STEGO presets' shifts (0.02-0.3) were tuned for.
        local = local - local.mean(1, keepdim=True) - self.spectral_offset
        context = context - context.mean(1, keepdim=True) - self.spectral_offset
        c_mean = F.avg_pool2d(rgb, p)
        c_std = (F.avg_pool2d(rgb * rgb, p) - c_mean * c_mean).clamp_min(0).sqrt()
        colour = torch.cat([c_mean - 0.5, c_std - self.colour_std_centre], dim=1)
        return torch.cat([local, context, self.colour_weight * colour], dim=1)

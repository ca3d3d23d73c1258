"""ImageNet normalisation of input images and its inverse (for DenseCRF and pictures).

The one copy of the constants every part of the package uses: the data pipeline normalises with them
(:mod:`equss.data.transforms`), the demo backbone undoes them to see colours, the CRF and the pictures
turn normalised tensors back into uint8 images (:func:`unnormalize_image`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "unnormalize_image"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

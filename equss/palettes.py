"""Fixed colour palettes per dataset, and label maps → RGB.

Class index ``i`` of a dataset gets ``palette[i]`` (``uint8 [n_classes, 3]``, RGB). Pixels whose label is
outside ``[0, n_classes)`` (ignore, ``-1``; unmatched clusters) are drawn in ``ignore_color`` (black by
default), so no class colour is black.

* ``cocostuff27``: the PASCAL VOC label colormap (as STEGO draws COCO-Stuff), entries ``1..27`` — STEGO
  uses entries ``0..26``, whose entry 0 is black and would be confused with "ignore".
* ``cityscapes27``: the official Cityscapes colours (cityscapesScripts ``labels.py``) of label ids
  7–33 in the order of the 27 classes (road, sidewalk, parking, rail track, building, wall, fence,
  guard rail, bridge, tunnel, pole, polegroup, traffic light, traffic sign, vegetation, terrain, sky,
  person, rider, car, truck, bus, caravan, trailer, train, motorcycle, bicycle). As in the official
  table, pole and polegroup share (153, 153, 153).
* ``potsdam3``: the ISPRS Potsdam colours of each merged class's main member: roads and cars → white
  (impervious surfaces), buildings and clutter → blue (building), vegetation and trees → green (tree).
* anything else (synthetic data, any n): :func:`generic_palette` — PASCAL entries ``1..n`` (distinct,
  never black) up to 255 classes, then evenly spaced hues.

Class names are not kept here: take them from the dataset (``dataset.class_names``) or the caller.
"""

from __future__ import annotations

import colorsys
import re

import numpy as np
from torch import Tensor

__all__ = ["pascal_colormap", "generic_palette", "get_palette", "colorize", "PALETTES", "IGNORE_COLOR"]

IGNORE_COLOR = (0, 0, 0)


def pascal_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC label colormap (bit-interleaved index → RGB), ``uint8 [n, 3]``; entry 0 is black."""
    if not 1 <= n <= 256:
        raise ValueError(f"the PASCAL colormap has 256 entries, asked for {n}")
    cmap = np.zeros((256, 3), dtype=np.int64)
    ind = np.arange(256, dtype=np.int64)
    for shift in reversed(range(8)):
        for channel in range(3):
            cmap[:, channel] |= ((ind >> channel) & 1) << shift
        ind >>= 3
    return cmap[:n].astype(np.uint8)


def generic_palette(n: int) -> np.ndarray:
    """``n`` distinct non-black colours, ``uint8 [n, 3]`` (PASCAL entries 1..n, then golden-ratio hues)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n <= 255:
        return pascal_colormap(n + 1)[1:].copy()
    base = pascal_colormap()[1:]
    extra = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95) for i in range(n - 255)]
    return np.concatenate([base, (np.asarray(extra) * 255).round().astype(np.uint8)])


_CITYSCAPES_27 = [
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100),
    (0, 0, 230), (119, 11, 32),
]  # fmt: skip

_POTSDAM_3 = [(255, 255, 255), (0, 0, 255), (0, 255, 0)]

PALETTES: dict[str, np.ndarray] = {
    "cocostuff27": pascal_colormap(28)[1:].copy(),
    "cityscapes27": np.asarray(_CITYSCAPES_27, dtype=np.uint8),
    "potsdam3": np.asarray(_POTSDAM_3, dtype=np.uint8),
}

# Spellings accepted by get_palette (after lower-casing and dropping everything but letters and digits).
_ALIASES = {
    "cocostuff": "cocostuff27",
    "coco": "cocostuff27",
    "coco27": "cocostuff27",
    "cityscapes": "cityscapes27",
    "potsdam": "potsdam3",
}


def get_palette(dataset: str | None = None, n_classes: int | None = None) -> np.ndarray:
    """Palette ``uint8 [n_classes, 3]`` of ``dataset`` (``"cocostuff27"``, ``"COCO-Stuff-27"``,
    ``"cityscapes"``, ``"potsdam3"``, ...), or :func:`generic_palette` for any other name / ``None``.

    Raises:
        ValueError: ``n_classes`` disagrees with a known dataset's palette, or neither is given.
    """
    key = re.sub(r"[^a-z0-9]", "", dataset.lower()) if dataset else ""
    key = _ALIASES.get(key, key)
    if key in PALETTES:
        pal = PALETTES[key]
        if n_classes is not None and n_classes != len(pal):
            raise ValueError(f"dataset {dataset!r} has {len(pal)} classes, got n_classes={n_classes}")
        return pal.copy()
    if n_classes is None:
        raise ValueError(
            f"unknown dataset {dataset!r}: give n_classes for a generic palette (known: {sorted(PALETTES)})"
        )
    return generic_palette(n_classes)


def colorize(label: Tensor | np.ndarray, palette: np.ndarray, ignore_color=IGNORE_COLOR) -> np.ndarray:
    """Label map ``[H, W]`` (or any shape) of class ids → ``uint8 [..., 3]`` RGB; ids outside
    ``[0, len(palette))`` get ``ignore_color``."""
    if isinstance(label, Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        raise TypeError(f"label must hold integers, got dtype {label.dtype}")
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must be [n, 3], got shape {palette.shape}")
    table = np.concatenate([palette, np.asarray([ignore_color], dtype=np.uint8)])
    idx = np.where((label >= 0) & (label < len(palette)), label, len(palette))
    return table[idx]

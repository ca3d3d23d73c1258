"""Picture grid: image | ground truth | cluster prediction | linear prediction, with a legend.

The grid is composed pixel-exactly with Pillow (no resampling of the label maps; panels are enlarged by
an integer ``scale`` with nearest-neighbour repetition), so a pixel of a panel is exactly its palette
colour. Layout, in pixels, for ``N`` images of ``H×W``, ``n_cols`` panels (3 without the linear
prediction) and ``L`` legend entries (the classes + "ignore")::

    width  = n_cols · (W·scale) + (n_cols + 1) · PAD + LEGEND_WIDTH
    height = max(HEADER + N · (H·scale + PAD),  HEADER + L · LEGEND_ROW + PAD)

with ``PAD = 4``, ``HEADER = 28``, ``LEGEND_WIDTH = 200``, ``LEGEND_ROW = 18``. Panel ``c`` of image
``i`` has its top-left corner at ``(PAD + c·(W·scale + PAD), HEADER + i·(H·scale + PAD))``.
Predictions must already be class ids (map cluster ids with
:meth:`equss.evaluate.SegmentationMetrics.map_predictions`); ids outside ``[0, n_classes)`` (ignore,
unmatched clusters) are black.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from equss.normalization import IMAGENET_MEAN, IMAGENET_STD, unnormalize_image
from equss.palettes import IGNORE_COLOR, colorize

__all__ = ["save_prediction_grid", "PAD", "HEADER", "LEGEND_WIDTH", "LEGEND_ROW"]

PAD = 4
HEADER = 28
LEGEND_WIDTH = 200
LEGEND_ROW = 18
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable bundled font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def _as_numpy_maps(x: Tensor | np.ndarray, name: str, n: int) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[0] < n:
        raise ValueError(f"{name} must be [N, H, W] with N >= {n}, got shape {x.shape}")
    return x[:n]


def _as_uint8_images(images: Tensor | np.ndarray, n: int, mean, std) -> np.ndarray:
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"image tensor must be [N, 3, H, W] (normalised), got shape {tuple(images.shape)}"
            )
        return unnormalize_image(images[:n], mean=mean, std=std, channel_order="rgb")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise TypeError(f"image array must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return images[:n]


def save_prediction_grid(
    path: str | os.PathLike,
    images: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    cluster_pred: Tensor | np.ndarray,
    linear_pred: Tensor | np.ndarray | None = None,
    *,
    palette: np.ndarray,
    class_names: Sequence[str],
    n_images: int | None = None,
    scale: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Path:
    """Save a PNG grid, one row per image (layout in the module docstring).

    Args:
        path: output ``.png``.
        images: ImageNet-normalised ``[N, 3, H, W]`` tensor (un-normalised with ``mean``/``std``) or
            ``uint8 [N, H, W, 3]`` RGB array.
        labels, cluster_pred, linear_pred: ``[N, H, W]`` class ids (``linear_pred`` optional).
        palette: ``uint8 [n_classes, 3]`` (:func:`equss.palettes.get_palette`).
        class_names: ``n_classes`` names for the legend.
        n_images: how many rows (default: all ``N``).
        scale: integer enlargement of every panel (nearest), e.g. 2 for 224-px crops.

    Returns:
        the path written.
    """
    palette = np.asarray(palette, dtype=np.uint8)
    names = list(class_names)
    if len(names) != len(palette):
        raise ValueError(f"{len(names)} class names for a palette of {len(palette)} colours")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    scale = int(scale)
    n = n_images if n_images is not None else len(images)
    imgs = _as_uint8_images(images, n, mean, std)
    columns = [
        ("image", None),
        ("ground truth", _as_numpy_maps(labels, "labels", n)),
        ("cluster probe", _as_numpy_maps(cluster_pred, "cluster_pred", n)),
    ]
    if linear_pred is not None:
        columns.append(("linear probe", _as_numpy_maps(linear_pred, "linear_pred", n)))
    H, W = imgs.shape[1:3]
    for title, maps in columns[1:]:
        if maps.shape[1:] != (H, W):
            raise ValueError(f"{title} maps are {maps.shape[1:]}, images are {(H, W)}")

    cell_w, cell_h = W * scale, H * scale
    n_cols = len(columns)
    n_legend = len(names) + 1
    width = n_cols * cell_w + (n_cols + 1) * PAD + LEGEND_WIDTH
    height = max(HEADER + n * (cell_h + PAD), HEADER + n_legend * LEGEND_ROW + PAD)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(12)

    for c, (title, maps) in enumerate(columns):
        x0 = PAD + c * (cell_w + PAD)
        draw.text((x0, PAD), title, fill=_TEXT, font=font)
        for i in range(n):
            rgb = imgs[i] if maps is None else colorize(maps[i], palette)
            if scale > 1:
                rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
            canvas.paste(Image.fromarray(np.ascontiguousarray(rgb)), (x0, HEADER + i * (cell_h + PAD)))

    lx = n_cols * (cell_w + PAD) + PAD
    draw.text((lx, PAD), "legend", fill=_TEXT, font=font)
    entries = [(name, tuple(int(v) for v in palette[k])) for k, name in enumerate(names)]
    entries.append(("ignore / unmatched", IGNORE_COLOR))
    for k, (name, color) in enumerate(entries):
        y = HEADER + k * LEGEND_ROW
        draw.rectangle([lx, y, lx + 12, y + 12], fill=color, outline=(128, 128, 128))
        draw.text((lx + 18, y), name, fill=_TEXT, font=font)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path

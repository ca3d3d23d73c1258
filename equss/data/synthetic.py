"""``SyntheticScenes``: a procedurally generated segmentation dataset that needs no download.

Why it exists
-------------
EQUSS needs *some* dataset to train, test and demonstrate on in an environment with no datasets and no
pretrained weights. A useful stand-in must not be solvable by colour alone (then clustering raw pixel
means already segments it and the method has nothing to show) and must not be hopeless for the frozen
featurizer either. The measured facts that shaped the design (112×112 Voronoi scenes, 5 classes, 8×8
patches, k-means + Hungarian): colour-defined classes give 87 % from raw pixel means (chance 23 %);
texture-only classes with random colours give only 32 % from a *random* ViT-S/8 (chance 25 %).

Design
------
* A scene is a Voronoi partition of the image into ``regions`` cells (random sites). Each scene draws 2 or
  3 of the ``num_classes`` classes and gives every cell one of them, so scenes differ in class content
  (which makes image-level kNN positives meaningful, as for real photographs).
* A class is a **texture type** (orientation, spatial frequency, pattern: gratings at several angles and
  periods, dot lattices, checkerboards, fine noise, smooth blobs, rings). Within a class the period,
  orientation, phase, contrast and sharpness jitter per region.
* **Colour carries no class information**: each region paints its pattern ``t in [0, 1]`` between two
  random RGB colours ``c0 + t (c1 - c0)`` drawn independently of the class, plus pixel noise. Colour
  statistics are therefore a nuisance that any clustering of colour-aware features must learn to ignore.
* Every image is a pure function of ``(seed, split, index)`` (numpy ``default_rng``), generated lazily
  in ``__getitem__`` (~1 ms for 112×112), optionally cached as ``.npz`` under ``cache_dir``.

* Difficulty knobs (defaults in :func:`generate_scene`, tuned so the frozen featurizer is informative
  but far from solving it): 5-12 Voronoi cells, per-region viewing scale ×[1/2, 2] (periods overlap
  across the frequency-defined classes), colour contrast ≥ 0.1 (RGB distance, so some regions are faint),
  pixel noise σ = 0.08, orientation ±10° and period ±15 % jitter.

Measured (``python scripts/synthetic_baselines.py``: 600 train / 100 val images, 112×112, 5 classes, 8×8
patches, k-means K = 5 best of 5 k-means++ inits + Hungarian, pixel accuracy on val; seed 0 / seed 10):

=====================================================  =============  =============
chance: majority class / uniform random (1/5)          22.2 / 20.0 %  23.4 / 20.0 %
k-means on raw 8×8 pixel colour means                  24.0 %         23.3 %
k-means on DemoBackbone features (l2-normalised)       54.3 %         58.7 %
k-means on DemoBackbone features (raw)                 57.8 %         48.4 %
linear probe on DemoBackbone features (upper ref.)     87.6 %         87.7 %
=====================================================  =============  =============

Whole measurement (generate 700 scenes, featurize, k-means, linear probe): 20-40 s of CPU time
(17 s wall on an idle 2-core machine).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from equss.data.base import SegmentationDataset
from equss.io import atomic_write

# --------------------------------------------------------------------------------------------------
# Texture catalogue. Each texture maps (rng, X, Y) -> t in [0, 1] with the shape of X; X, Y are the
# (scaled) pixel coordinates of one region's pixels, so only the pixels that are painted are computed. Order matters: ``num_classes = n`` uses the first n entries, so the first five are the
# ones the measured defaults were tuned on.
# --------------------------------------------------------------------------------------------------

TextureFn = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _grating(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray, theta_deg: float, period: float) -> np.ndarray:
    """Sinusoidal grating with jittered orientation (±10°) and period (±15 %), random phase, then a
    random sharpening (sine → near square wave) so the waveform is not identical across regions."""
    theta = math.radians(theta_deg + rng.uniform(-10.0, 10.0))
    lam = period * rng.uniform(0.85, 1.15)
    u = X * math.cos(theta) + Y * math.sin(theta)
    s = np.sin(2.0 * math.pi * u / lam + rng.uniform(0.0, 2.0 * math.pi))
    sharp = rng.uniform(1.0, 4.0)
    return 0.5 + 0.5 * np.tanh(sharp * s) / math.tanh(sharp)


def _stripes(theta_deg: float, period: float) -> TextureFn:
    return lambda rng, X, Y: _grating(rng, X, Y, theta_deg, period)


def _dots(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Square lattice of round dots (period 7 px ± 15 %, lattice rotated at random)."""
    theta = rng.uniform(0.0, math.pi / 2)
    lam = 7.0 * rng.uniform(0.85, 1.15)
    u = X * math.cos(theta) + Y * math.sin(theta) + rng.uniform(0, lam)
    v = -X * math.sin(theta) + Y * math.cos(theta) + rng.uniform(0, lam)
    du = (u % lam) / lam - 0.5
    dv = (v % lam) / lam - 0.5
    r = np.sqrt(du * du + dv * dv)
    radius = rng.uniform(0.18, 0.32)
    return (r < radius).astype(np.float64)


def _checker(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Axis-aligned (±10°) checkerboard with 5 px squares (± 15 %)."""
    theta = math.radians(rng.uniform(-10.0, 10.0))
    lam = 10.0 * rng.uniform(0.85, 1.15)
    u = X * math.cos(theta) + Y * math.sin(theta) + rng.uniform(0, lam)
    v = -X * math.sin(theta) + Y * math.cos(theta) + rng.uniform(0, lam)
    return ((np.floor(2 * u / lam) + np.floor(2 * v / lam)) % 2).astype(np.float64)


def _noise(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Fine isotropic grain: i.i.d. uniform noise per pixel."""
    return rng.uniform(0.0, 1.0, size=X.shape)


def _blobs(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Smooth low-frequency blobs: a sum of 8 random plane waves with periods 16-28 px."""
    acc = np.zeros(X.shape)
    for _ in range(8):
        theta = rng.uniform(0.0, 2 * math.pi)
        lam = rng.uniform(16.0, 28.0)
        acc += np.sin(2 * math.pi * (X * math.cos(theta) + Y * math.sin(theta)) / lam + rng.uniform(0, 2 * math.pi))
    return 0.5 + 0.5 * np.tanh(acc / 2.0)


def _rings(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Concentric rings (period 6 px ± 15 %) around a random centre in the region's bounding box: every
    orientation at one frequency."""
    cx, cy = rng.uniform(X.min(), X.max()), rng.uniform(Y.min(), Y.max())
    lam = 6.0 * rng.uniform(0.85, 1.15)
    r = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
    return 0.5 + 0.5 * np.sin(2 * math.pi * r / lam + rng.uniform(0, 2 * math.pi))


TEXTURES: tuple[tuple[str, TextureFn], ...] = (
    ("stripes 0deg", _stripes(0.0, 6.0)),
    ("stripes 60deg", _stripes(60.0, 6.0)),
    ("stripes 120deg", _stripes(120.0, 6.0)),
    ("dots", _dots),
    ("noise", _noise),
    ("coarse stripes 0deg", _stripes(0.0, 14.0)),
    ("checkerboard", _checker),
    ("blobs", _blobs),
    ("rings", _rings),
    ("fine stripes 90deg", _stripes(90.0, 3.5)),
)
MAX_CLASSES = len(TEXTURES)

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Bump when generate_scene draws other scenes for the same (seed, split, index): caches key on it.
SCENE_VERSION = 1


def synthetic_class_names(num_classes: int) -> list[str]:
    """Names of the first ``num_classes`` texture classes (index = class id)."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")
    return [name for name, _ in TEXTURES[:num_classes]]


def generate_scene(
    seed: int,
    split: str,
    index: int,
    res: int = 112,
    num_classes: int = 5,
    regions: tuple[int, int] = (5, 12),
    classes_per_image: tuple[int, int] = (2, 3),
    noise_std: float = 0.08,
    min_contrast: float = 0.1,
    scale_range: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one scene, a pure function of ``(seed, split, index)`` and the shape arguments.

    Returns ``img uint8 [res, res, 3]`` and ``label int64 [res, res]`` with values in ``[0, num_classes)``
    (every pixel is labelled; there is no ignore region).
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    names = synthetic_class_names(num_classes)  # validates num_classes
    rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])
    H = W = int(res)
    Y, X = np.mgrid[0:H, 0:W].astype(np.float64)

    n_cls = int(rng.integers(classes_per_image[0], classes_per_image[1] + 1))
    n_cls = min(n_cls, len(names))
    scene_classes = rng.choice(len(names), size=n_cls, replace=False)
    n_reg = int(rng.integers(regions[0], regions[1] + 1))
    sites = rng.uniform(0, [W, H], size=(n_reg, 2))
    d2 = (X[None] - sites[:, 0, None, None]) ** 2 + (Y[None] - sites[:, 1, None, None]) ** 2
    cell = d2.argmin(axis=0)
    # Every scene class owns at least one cell (cells beyond the first n_cls pick a scene class at random).
    cell_class = np.concatenate([scene_classes, rng.choice(scene_classes, size=max(n_reg - n_cls, 0))])[:n_reg]
    rng.shuffle(cell_class)

    img = np.zeros((H, W, 3))
    label = np.zeros((H, W), dtype=np.int64)
    for r in range(n_reg):
        mask = cell == r
        if not mask.any():
            continue
        c = int(cell_class[r])
        # per-region viewing scale (distance): periods vary by up to ×scale_range either way
        s = math.exp(rng.uniform(-math.log(scale_range), math.log(scale_range)))
        t = TEXTURES[c][1](rng, X[mask] / s, Y[mask] / s)
        # Two colours drawn independently of the class, at least 0.35 apart so the texture is visible.
        while True:
            c0, c1 = rng.uniform(0.0, 1.0, size=(2, 3))
            if np.linalg.norm(c1 - c0) > min_contrast:
                break
        img[mask] = c0 + t[:, None] * (c1 - c0)
        label[mask] = c
    img += rng.normal(0.0, noise_std, size=img.shape)
    img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return img, label


class SyntheticScenes(SegmentationDataset):
    """Procedural texture scenes with exact labels (see the module docstring for the design).

    Args:
        split: "train", "val" or "test" (independent streams of the same distribution).
        num_images: dataset length (default 600 for train, 100 otherwise).
        res: generated image size (square); the standard pipeline is applied at the same ``res`` so the
            resize/crop are no-ops and only normalisation happens.
        num_classes: 2..10 texture classes (default 5).
        seed: generator seed; same seed, split and index give the identical image.
        cache_dir: when set, generated scenes are stored there as ``.npz`` and re-read afterwards.
        photometric_aug / geometric_aug: as for every dataset in :mod:`equss.data`.

    Items: ``{"img": float32 [3,res,res] (ImageNet-normalised), "label": int64 [res,res], "index": int}``.
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int | None = None,
        res: int = 112,
        num_classes: int = 5,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        photometric_aug: bool = False,
        geometric_aug: bool = False,
    ):
        if split not in _SPLIT_IDS:
            raise ValueError(f"SyntheticScenes: split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if num_images is None:
            num_images = 600 if split == "train" else 100
        if num_images < 1:
            raise ValueError(f"SyntheticScenes: num_images must be >= 1, got {num_images}")
        if res < 16:
            raise ValueError(f"SyntheticScenes: res must be >= 16, got {res}")
        super().__init__(res=res, photometric_aug=photometric_aug, geometric_aug=geometric_aug)
        self.split = split
        self.num_images = int(num_images)
        self.class_names = synthetic_class_names(int(num_classes))
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir = self.cache_dir / f"synthetic_s{self.seed}_c{self.num_classes}_r{res}" / split
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return self.num_images

    def source_files(self) -> list[Path]:
        return []  # generated: a pure function of the fields below

    def fingerprint_fields(self) -> dict:
        return {**super().fingerprint_fields(), "split": self.split, "num_images": self.num_images,
                "seed": self.seed, "generator": SCENE_VERSION}

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(img uint8 [res,res,3], label int64 [res,res])`` of scene ``index``, from the cache if present."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"SyntheticScenes: index {index} out of range for {self.num_images} images")
        if self.cache_dir is None:
            return generate_scene(self.seed, self.split, index, self.res, self.num_classes)
        path = self.cache_dir / f"{index}.npz"
        if path.is_file():
            with np.load(path) as f:
                return f["img"], f["label"].astype(np.int64)
        img, label = generate_scene(self.seed, self.split, index, self.res, self.num_classes)
        # Atomic: a killed run never leaves a truncated cache entry.
        atomic_write(path, lambda fh: np.savez_compressed(fh, img=img, label=label.astype(np.uint8)))
        return img, label

    def load_raw(self, index: int) -> tuple[Image.Image, np.ndarray]:
        img, label = self.scene(index)
        return Image.fromarray(img), label


# --------------------------------------------------------------------------------------------------
# Baselines: chance levels, k-means + Hungarian on pixel colour means and on demo-featurizer features.
# --------------------------------------------------------------------------------------------------

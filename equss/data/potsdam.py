"""Potsdam-3 (IIC's preprocessed ISPRS Potsdam tiles, as used by STEGO and EQUSS).

Layout (``root``)::

    imgs/<id>.mat     key "img": [H, W, 4] (R, G, B, IR); only RGB is used
    gt/<id>.mat       key "gt":  [H, W] with the six ISPRS classes 0-5, 255 = unlabelled
    labelled_train.txt  unlabelled_train.txt  labelled_test.txt  all.txt   (one id per line)

Splits: "train" → ``labelled_train.txt``, "unlabelled_train" → ``unlabelled_train.txt``, "val" →
``labelled_test.txt`` (the evaluation split), "train+val" → both labelled lists, "all" → ``all.txt``.

Six classes → 3 (:data:`POTSDAM_FINE_TO_COARSE`): roads (0) and cars (4) → 0; buildings (1) and clutter
(5) → 1; low vegetation (2) and trees (3) → 2; anything else (255) → -1. STEGO's code maps unknown values
to 0 and fills a missing ``gt`` file with ones (class 1); here labelled splits require the ``gt`` file
and unlabelled splits give -1 where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from equss.data.base import SegmentationDataset, check_listed_files, read_id_list, require_dir

POTSDAM3_CLASSES = ["roads and cars", "buildings and clutter", "trees and vegetation"]
POTSDAM_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}

SPLIT_FILES = {
    "train": ["labelled_train.txt"],
    "unlabelled_train": ["unlabelled_train.txt"],
    "val": ["labelled_test.txt"],
    "train+val": ["labelled_train.txt", "labelled_test.txt"],
    "all": ["all.txt"],
}
_LABELLED = {"train", "val", "train+val"}

LAYOUT = """  <root>/imgs/<id>.mat   (key 'img', [H, W, 4] RGB+IR)
  <root>/gt/<id>.mat     (key 'gt', [H, W], classes 0-5, 255 = unlabelled)
  <root>/{labelled_train,unlabelled_train,labelled_test,all}.txt"""


def _to_uint8_rgb(img: np.ndarray, path: Path) -> np.ndarray:
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"Potsdam image {path} must be [H, W, >=3], got {img.shape}")
    rgb = img[:, :, :3]
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if np.issubdtype(rgb.dtype, np.floating) and float(rgb.max(initial=0.0)) <= 1.0:
        # float images in [0, 1], as torchvision's to_pil_image (STEGO's loader) interprets them
        return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.clip(rgb, 0, 255).astype(np.uint8)


class Potsdam3(SegmentationDataset):
    """Potsdam with 3 classes (see the module docstring).

    Args:
        root: directory containing ``imgs/``, ``gt/`` and the split files.
        split: one of :data:`SPLIT_FILES`.
        res: output size of the standard pipeline.
        photometric_aug / geometric_aug: see :class:`equss.data.transforms.SegmentationTransform`.
    """

    class_names = POTSDAM3_CLASSES

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        res: int = 224,
        photometric_aug: bool = False,
        geometric_aug: bool = False,
    ):
        super().__init__(res, photometric_aug=photometric_aug, geometric_aug=geometric_aug)
        if split not in SPLIT_FILES:
            raise ValueError(f"Potsdam3: split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
        self.root = require_dir(Path(root), "Potsdam root", LAYOUT)
        self.split = split
        self.ids: list[str] = []
        for name in SPLIT_FILES[split]:
            self.ids += read_id_list(self.root / name, "Potsdam split file", LAYOUT)
        self.img_dir = require_dir(self.root / "imgs", "Potsdam image directory", LAYOUT)
        check_listed_files(self.img_dir, [f"{i}.mat" for i in self.ids], "Potsdam images", LAYOUT)
        self.gt_dir = self.root / "gt"
        self.labelled = split in _LABELLED
        if self.labelled:
            require_dir(self.gt_dir, "Potsdam gt directory", LAYOUT)
            check_listed_files(self.gt_dir, [f"{i}.mat" for i in self.ids], "Potsdam gt files", LAYOUT)
        self.lut = np.full(256, -1, dtype=np.int64)
        for fine, coarse in POTSDAM_FINE_TO_COARSE.items():
            self.lut[fine] = coarse

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_labels(self) -> bool:
        return self.labelled

    def source_files(self) -> list[Path]:
        gt = [self.gt_dir / f"{i}.mat" for i in self.ids]
        return [self.img_dir / f"{i}.mat" for i in self.ids] + [p for p in gt if self.labelled or p.is_file()]

    def load_raw(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        from scipy.io import loadmat

        img_path = self.img_dir / f"{self.ids[index]}.mat"
        img = Image.fromarray(_to_uint8_rgb(loadmat(img_path)["img"], img_path))
        gt_path = self.gt_dir / f"{self.ids[index]}.mat"
        if not gt_path.is_file():
            if self.labelled:
                raise FileNotFoundError(f"Potsdam gt file vanished: {gt_path}")
            return img, None
        gt = np.asarray(loadmat(gt_path)["gt"])
        if gt.ndim == 3 and gt.shape[2] == 1:
            gt = gt[:, :, 0]
        gt = gt.astype(np.int64)
        # values outside 0..255 cannot index the LUT; they are not classes either
        return img, np.where((gt >= 0) & (gt < 256), self.lut[np.clip(gt, 0, 255)], -1)

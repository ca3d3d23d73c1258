"""Cityscapes-27 (fine annotations, torchvision's ``Cityscapes`` layout).

Layout (``root``)::

    leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png

Labels: ``labelIds − 7`` (ids 7-33 → classes 0-26); negative values (the void ids 0-6) → -1. Values above
33 do not occur in ``labelIds`` images; should one appear it is ignored as well. Files are sorted by
city and name (torchvision lists directories in file-system order, which is not reproducible).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from equss.data.base import SegmentationDataset, one_line_layout, read_label_png, require_dir

CITYSCAPES27_CLASSES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
]
FIRST_NONVOID_ID = 7

LAYOUT = """  <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
  <root>/gtFine/<split>/<city>/<name>_gtFine_labelIds.png"""

_IMG_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


def label_ids_to_train27(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes ``labelIds`` ``[H, W]`` → int64 classes 0-26, -1 = ignore."""
    out = label_ids.astype(np.int64) - FIRST_NONVOID_ID
    out[(out < 0) | (out >= len(CITYSCAPES27_CLASSES))] = -1
    return out


class Cityscapes27(SegmentationDataset):
    """Cityscapes with 27 classes (see the module docstring).

    Args:
        root: dataset root containing ``leftImg8bit/`` and ``gtFine/``.
        split: "train" (2,975 images), "val" (500) or "test".
        res: output size of the standard pipeline.
        photometric_aug / geometric_aug: see :class:`equss.data.transforms.SegmentationTransform`.
    """

    class_names = CITYSCAPES27_CLASSES

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        res: int = 224,
        photometric_aug: bool = False,
        geometric_aug: bool = False,
    ):
        super().__init__(res, photometric_aug=photometric_aug, geometric_aug=geometric_aug)
        if split not in ("train", "val", "test"):
            raise ValueError(f"Cityscapes27: split must be 'train', 'val' or 'test', got {split!r}")
        self.root = require_dir(Path(root), "Cityscapes root", LAYOUT)
        self.split = split
        img_root = require_dir(self.root / "leftImg8bit" / split, "Cityscapes image directory", LAYOUT)
        label_root = require_dir(self.root / "gtFine" / split, "Cityscapes gtFine directory", LAYOUT)
        self.images = sorted(img_root.glob(f"*/*{_IMG_SUFFIX}"))
        if not self.images:
            raise FileNotFoundError(f"no '*{_IMG_SUFFIX}' images under {img_root}/<city>/; expected layout: {one_line_layout(LAYOUT)}")
        self.labels = []
        for img in self.images:
            lab = label_root / img.parent.name / (img.name[: -len(_IMG_SUFFIX)] + _LABEL_SUFFIX)
            if not lab.is_file():
                raise FileNotFoundError(f"Cityscapes label for {img} not found: {lab}; expected layout: {one_line_layout(LAYOUT)}")
            self.labels.append(lab)

    def __len__(self) -> int:
        return len(self.images)

    def source_files(self) -> list[Path]:
        return list(self.images) + list(self.labels)

    def load_raw(self, index: int) -> tuple[Image.Image, np.ndarray]:
        with Image.open(self.images[index]) as im:
            img = im.convert("RGB")
        return img, label_ids_to_train27(read_label_png(self.labels[index]))

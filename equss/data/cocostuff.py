"""COCO-Stuff-27 / -15 / -3 (the curated IIC image lists, as used by STEGO and EQUSS).

Layout (``root``)::

    images/{train2017,val2017}/<id>.jpg
    annotations/{train2017,val2017}/<id>.png      stuffthingmaps: fine ids 0-181, 255 = unlabelled
    curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt   (27 and 15 classes)
    curated/{train2017,val2017}/Coco164kFew_Stuff_6.txt           (3 classes)

List files: STEGO builds ``cocostuff27`` and ``cocostuff15`` with ``subset=7``, i.e. the list
``Coco164kFull_Stuff_Coarse_7.txt`` in *both* ``train2017`` (49,629 ids) and ``val2017`` (2,175 ids),
and ``cocostuff3`` with ``subset=6`` (``Coco164kFew_Stuff_6.txt``). Those are the defaults here; any
other list (e.g. ``Coco164kFull_Stuff_Coarse.txt``, STEGO's ``subset=None``) can be passed as
``list_file``.

Labels: fine → 27 coarse classes with :data:`FINE_TO_COARSE27` (255 → -1); ``cocostuff15`` keeps the
stuff classes only (coarse − 12, things → -1); ``cocostuff3`` maps sky (23) → 0, plant (22) → 1,
ground (21) → 2 and everything else to -1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from equss.data.base import (
    SegmentationDataset,
    check_listed_files,
    read_id_list,
    read_label_png,
    require_dir,
)


def _fine_to_coarse27() -> dict[int, int]:
    m: dict[int, int] = {0: 9}
    ranges = [((1, 8), 11), ((9, 14), 8), ((15, 24), 7), ((25, 32), 6), ((33, 42), 10), ((43, 50), 5),
              ((51, 60), 2), ((61, 70), 3), ((71, 76), 0), ((77, 82), 1), ((83, 90), 4),
              ((113, 117), 13), ((170, 176), 18)]
    for (lo, hi), c in ranges:
        m.update({f: c for f in range(lo, hi + 1)})
    m.update({
        91: 17, 92: 17, 93: 22, 94: 20, 95: 20, 96: 22, 97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 102: 12,
        103: 17, 104: 17, 105: 23, 106: 15, 107: 15, 108: 17, 109: 15, 110: 21, 111: 15, 112: 25, 118: 22,
        119: 26, 120: 14, 121: 14, 122: 15, 123: 22, 124: 21, 125: 21, 126: 24, 127: 20, 128: 22, 129: 15,
        130: 17, 131: 16, 132: 15, 133: 22, 134: 24, 135: 21, 136: 17, 137: 25, 138: 16, 139: 21, 140: 17,
        141: 22, 142: 16, 143: 21, 144: 21, 145: 25, 146: 21, 147: 26, 148: 21, 149: 24, 150: 20, 151: 17,
        152: 14, 153: 21, 154: 26, 155: 15, 156: 23, 157: 20, 158: 21, 159: 24, 160: 15, 161: 24, 162: 22,
        163: 25, 164: 15, 165: 20, 166: 17, 167: 17, 168: 22, 169: 14, 177: 26, 178: 26, 179: 19, 180: 19,
        181: 24,
    })
    if sorted(m) != list(range(182)):
        raise RuntimeError("FINE_TO_COARSE27 must cover the fine ids 0-181 exactly")
    return m


#: COCO-Stuff fine id (0-181) → coarse class (0-26); ids not in the table (255) are ignored (-1).
FINE_TO_COARSE27: dict[int, int] = _fine_to_coarse27()

COCOSTUFF27_CLASSES = [
    "electronic", "appliance", "food (things)", "furniture (things)", "indoor", "kitchen", "accessory",
    "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor", "food (stuff)",
    "furniture (stuff)", "raw material", "textile", "wall", "window", "building", "ground", "plant",
    "sky", "solid", "structural", "water",
]
COCOSTUFF15_CLASSES = COCOSTUFF27_CLASSES[12:]
COCOSTUFF3_CLASSES = ["sky", "plant", "ground"]

#: variant → (number of classes, class names, default list file)
VARIANTS = {
    27: (COCOSTUFF27_CLASSES, "Coco164kFull_Stuff_Coarse_7.txt"),
    15: (COCOSTUFF15_CLASSES, "Coco164kFull_Stuff_Coarse_7.txt"),
    3: (COCOSTUFF3_CLASSES, "Coco164kFew_Stuff_6.txt"),
}

_SPLIT_DIRS = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}

LAYOUT = """  <root>/images/{train2017,val2017}/<id>.jpg
  <root>/annotations/{train2017,val2017}/<id>.png   (stuffthingmaps, fine ids 0-181, 255 = unlabelled)
  <root>/curated/{train2017,val2017}/<list file>    (one image id per line)"""


def coarse_lut(num_classes: int) -> np.ndarray:
    """Lookup table ``int64 [256]``: fine id (uint8 pixel value) → label of the 27/15/3-class variant."""
    if num_classes not in VARIANTS:
        raise ValueError(f"COCO-Stuff variant must be one of {sorted(VARIANTS)}, got {num_classes}")
    lut = np.full(256, -1, dtype=np.int64)
    for fine, coarse in FINE_TO_COARSE27.items():
        lut[fine] = coarse
    if num_classes == 15:
        lut = np.where(lut >= 12, lut - 12, -1)
    elif num_classes == 3:
        out = np.full(256, -1, dtype=np.int64)
        for new, coarse in enumerate((23, 22, 21)):  # sky, plant, ground
            out[lut == coarse] = new
        lut = out
    return lut


class CocoStuff(SegmentationDataset):
    """COCO-Stuff with the curated lists (see the module docstring for layout and label mapping).

    Args:
        root: dataset root (contains ``images/``, ``annotations/``, ``curated/``).
        split: "train" or "val" (or "train2017"/"val2017").
        res: output size of the standard pipeline (train 224, eval 320).
        num_classes: 27, 15 or 3.
        list_file: name of the id list in ``curated/<split dir>/`` (default: the variant's list).
        photometric_aug / geometric_aug: see :class:`equss.data.transforms.SegmentationTransform`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        res: int = 224,
        num_classes: int = 27,
        list_file: str | None = None,
        photometric_aug: bool = False,
        geometric_aug: bool = False,
    ):
        super().__init__(res, photometric_aug=photometric_aug, geometric_aug=geometric_aug)
        if split not in _SPLIT_DIRS:
            raise ValueError(f"CocoStuff: split must be one of {sorted(_SPLIT_DIRS)}, got {split!r}")
        if num_classes not in VARIANTS:
            raise ValueError(f"CocoStuff: num_classes must be 27, 15 or 3, got {num_classes}")
        self.root = require_dir(Path(root), "COCO-Stuff root", LAYOUT)
        self.split = split
        split_dir = _SPLIT_DIRS[split]
        self.class_names = list(VARIANTS[num_classes][0])
        self.list_file = list_file or VARIANTS[num_classes][1]
        self.ids = read_id_list(self.root / "curated" / split_dir / self.list_file, "COCO-Stuff image list", LAYOUT)
        self.img_dir = require_dir(self.root / "images" / split_dir, "COCO-Stuff image directory", LAYOUT)
        self.label_dir = require_dir(self.root / "annotations" / split_dir, "COCO-Stuff annotation directory", LAYOUT)
        check_listed_files(self.img_dir, [f"{i}.jpg" for i in self.ids], "COCO-Stuff images", LAYOUT)
        check_listed_files(self.label_dir, [f"{i}.png" for i in self.ids], "COCO-Stuff annotations", LAYOUT)
        self.lut = coarse_lut(num_classes)

    def __len__(self) -> int:
        return len(self.ids)

    def source_files(self) -> list[Path]:
        return [self.img_dir / f"{i}.jpg" for i in self.ids] + [self.label_dir / f"{i}.png" for i in self.ids]

    def fingerprint_fields(self) -> dict:
        return {**super().fingerprint_fields(), "list_file": self.list_file}

    def load_raw(self, index: int) -> tuple[Image.Image, np.ndarray]:
        img_id = self.ids[index]
        with Image.open(self.img_dir / f"{img_id}.jpg") as im:
            img = im.convert("RGB")
        fine = read_label_png(self.label_dir / f"{img_id}.png")
        if fine.dtype != np.uint8:
            raise ValueError(f"COCO-Stuff label {self.label_dir / f'{img_id}.png'} must be 8-bit, got {fine.dtype}")
        return img, self.lut[fine]

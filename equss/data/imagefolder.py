"""Plain image folders: unlabelled training images, optionally with label PNGs.

Layout (STEGO's "directory" dataset)::

    <root>/imgs/<split>/**/<name>.{jpg,jpeg,png,bmp,tif,tiff,webp}
    <root>/labels/<split>/**/<name>.png        optional, same relative path and stem as the image

With ``split=None`` the images are read from ``<root>`` itself (recursively) and labels from
``label_root`` if given. Label PNGs hold class ids directly; ``ignore_value`` (default 255) becomes -1,
and ``label_offset`` is subtracted first (use 1 for "class + 1, 0 = ignore" files). Without labels every
pixel is -1 (``has_labels`` is False): such a folder trains EQUSS with ``num_clusters`` clusters and gives
predictions and pictures, no metrics.

Classes of a labelled folder: ``class_names``, else ``num_classes`` (named ``class_0`` ...), else inferred
from the label PNGs (the largest class id + 1, with a logged notice).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from equss.data.base import SegmentationDataset, one_line_layout, read_label_png, require_dir

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

LAYOUT = """  <root>/imgs/<split>/**/<name>.<jpg|png|...>
  <root>/labels/<split>/**/<name>.png    (optional; class ids, 255 = ignore)"""


def decode_label(raw: np.ndarray, label_offset: int = 0, ignore_value: int | None = 255) -> np.ndarray:
    """Stored label values → int64 classes with -1 = ignore: ``ignore_value`` → -1, then ``− label_offset``;
    anything negative after the offset is ignore too."""
    raw = raw.astype(np.int64)
    out = raw - label_offset
    if ignore_value is not None:
        out[raw == ignore_value] = -1
    out[out < 0] = -1
    return out


class ImageFolder(SegmentationDataset):
    """Images (and optional label PNGs) from a folder; see the module docstring for the layout.

    Args:
        root: folder root.
        split: sub-folder name under ``imgs/`` and ``labels/``; ``None`` reads ``root`` directly.
        res: output size of the standard pipeline.
        label_root: explicit label folder (overrides ``<root>/labels/<split>``); labels are optional
            unless this is given, then every image needs one.
        class_names: names of the classes of a labelled folder (sets ``num_classes``).
        num_classes: class count of a labelled folder when no names are given.
        num_clusters: clusters to find in an unlabelled folder (required for one: it sets ``num_classes``,
            the probes' output size, with names ``cluster_0`` ...).
        label_offset, ignore_value: see :func:`decode_label`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "train",
        res: int = 224,
        label_root: str | Path | None = None,
        class_names: list[str] | None = None,
        num_classes: int | None = None,
        num_clusters: int | None = None,
        label_offset: int = 0,
        ignore_value: int | None = 255,
        photometric_aug: bool = False,
        geometric_aug: bool = False,
    ):
        super().__init__(res, photometric_aug=photometric_aug, geometric_aug=geometric_aug)
        self.root = require_dir(Path(root), "image folder root", LAYOUT)
        self.split = split
        self.img_dir = require_dir(self.root / "imgs" / split if split else self.root, "image directory", LAYOUT)
        self.images = sorted(
            p for p in self.img_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.images:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.img_dir}; expected layout: {one_line_layout(LAYOUT)}"
            )
        self.label_offset = label_offset
        self.ignore_value = ignore_value
        if label_root is not None:
            self.label_dir: Path | None = require_dir(Path(label_root), "label directory", LAYOUT)
        elif split and (self.root / "labels" / split).is_dir():
            self.label_dir = self.root / "labels" / split
        else:
            self.label_dir = None
        self.labels: list[Path] | None = None
        if self.label_dir is not None:
            self.labels = [self.label_dir / p.relative_to(self.img_dir).with_suffix(".png") for p in self.images]
            missing = [p for p in self.labels if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} label PNGs missing in {self.label_dir}, first: {missing[0]}; expected layout: {one_line_layout(LAYOUT)}"
                )
        self.class_names = self._resolve_classes(class_names, num_classes, num_clusters)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def _resolve_classes(self, class_names, num_classes, num_clusters) -> list[str]:
        if self.labels is None:
            if class_names or num_classes:
                raise ValueError(
                    f"data.num_classes/data.class_names: {self.img_dir} has no labels (no {self.root / 'labels'}"
                    f"/{self.split}); for an unlabelled folder set data.num_clusters instead"
                )
            if not num_clusters or num_clusters < 2:
                raise ValueError(
                    f"data.num_clusters: {self.img_dir} has no labels, so the number of clusters to find must be "
                    f"given (data.num_clusters=K, K >= 2), got {num_clusters!r}"
                )
            return [f"cluster_{i}" for i in range(int(num_clusters))]
        if num_clusters:
            raise ValueError(f"data.num_clusters is for unlabelled folders; {self.label_dir} holds labels "
                             f"(set data.num_classes or data.class_names)")
        if class_names:
            if num_classes and len(class_names) != num_classes:
                raise ValueError(f"data.class_names has {len(class_names)} names but data.num_classes={num_classes}")
            return list(class_names)
        if not num_classes:
            num_classes = self._infer_num_classes()
            log.info("image folder %s: %d classes inferred from the label PNGs (set data.num_classes or "
                     "data.class_names to fix them)", self.root, num_classes)
        return [f"class_{i}" for i in range(int(num_classes))]

    def _infer_num_classes(self) -> int:
        top = -1
        for path in self.labels or []:
            top = max(top, int(decode_label(read_label_png(path), self.label_offset, self.ignore_value).max(initial=-1)))
        if top < 0:
            raise ValueError(f"data.num_classes: the label PNGs in {self.label_dir} hold no class id (all ignore)")
        return top + 1

    def __len__(self) -> int:
        return len(self.images)

    def source_files(self) -> list[Path]:
        return list(self.images) + list(self.labels or [])

    def fingerprint_fields(self) -> dict:
        return {**super().fingerprint_fields(), "label_offset": self.label_offset, "ignore_value": self.ignore_value}

    def load_raw(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        with Image.open(self.images[index]) as im:
            img = im.convert("RGB")
        if self.labels is None:
            return img, None
        return img, decode_label(read_label_png(self.labels[index]), self.label_offset, self.ignore_value)

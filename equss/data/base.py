"""Base class of every segmentation dataset in :mod:`equss.data`, and the path checks they share."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from equss.data.transforms import SegmentationTransform


class SegmentationDataset(torch.utils.data.Dataset):
    """A dataset of (image, label map) pairs run through :class:`SegmentationTransform`.

    Subclasses set ``class_names`` (index = class id; ``num_classes = len(class_names)``) and implement
    ``__len__`` and :meth:`load_raw`, which returns the full-resolution RGB image and an int64 label map
    with ``-1`` = ignore (or ``None`` for unlabelled images, which become all ``-1``).

    Items: ``{"img": float32 [3,res,res], "label": int64 [res,res], "index": int}`` (+ ``"img_aug"``
    with ``photometric_aug``).
    """

    class_names: list[str] = []

    def __init__(self, res: int, photometric_aug: bool = False, geometric_aug: bool = False):
        self.res = res
        self.transform = SegmentationTransform(res, photometric_aug=photometric_aug, geometric_aug=geometric_aug)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        """Whether items carry label maps (unlabelled sets give all ``-1`` and no metrics)."""
        return True

    def load_raw(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        raise NotImplementedError

    def source_files(self) -> list[Path]:
        """Every file the items are read from (images, then labels, in item order)."""
        raise NotImplementedError

    def fingerprint_fields(self) -> dict:
        """Settings that change the items without changing any file (class, resolution, augmentation)."""
        t = self.transform
        return {"class": type(self).__name__, "res": self.res, "classes": list(self.class_names),
                "photometric_aug": t.photometric_aug, "geometric_aug": t.geometric_aug}

    def fingerprint(self) -> str:
        """SHA-256 of what determines the items: :meth:`fingerprint_fields` and every source file's path
        (relative to its dataset), size and modification time. Caches and kNN files key on it, so replacing
        one image under the same name invalidates them. One ``stat`` per file (~0.5 s for 100k files)."""
        h = hashlib.sha256(json.dumps(self.fingerprint_fields(), sort_keys=True, default=str).encode())
        root = getattr(self, "root", None)
        for path in self.source_files():
            st = Path(path).stat()
            rel = Path(path).relative_to(root) if root is not None and Path(path).is_relative_to(root) else Path(path)
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {len(self)} items")
        img, label = self.load_raw(index)
        out = self.transform(img, label)
        out["index"] = index
        return out


def one_line_layout(layout: str) -> str:
    """A multi-line layout description as one line (error messages are one line)."""
    return "; ".join(" ".join(line.split()) for line in layout.strip().splitlines())


def require_dir(path: Path, what: str, layout: str) -> Path:
    """Return ``path`` if it is a directory, else raise ``FileNotFoundError`` naming it and the layout."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} (no such directory); expected layout: {one_line_layout(layout)}")
    return path


def require_file(path: Path, what: str, layout: str) -> Path:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` naming it and the layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} (no such file); expected layout: {one_line_layout(layout)}")
    return path


def read_id_list(path: Path, what: str, layout: str) -> list[str]:
    """Non-empty, stripped lines of an id list file; raises if missing or empty."""
    require_file(path, what, layout)
    ids = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{what} is empty: {path}")
    return ids


def check_listed_files(directory: Path, names: list[str], what: str, layout: str) -> None:
    """Raise ``FileNotFoundError`` naming the first missing ``directory/name`` (one ``listdir``, so a list
    of 50k ids is checked in milliseconds instead of 50k ``stat`` calls)."""
    present = {p.name for p in Path(directory).iterdir()}
    missing = [n for n in names if n not in present]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} {what} listed but missing, first: {Path(directory) / missing[0]}; expected layout: "
            f"{one_line_layout(layout)}"
        )


def read_label_png(path: Path) -> np.ndarray:
    """Single-channel label PNG as a uint8/uint16 array ``[H, W]`` (palette PNGs give their indices)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label PNG {path} has mode {im.mode}; expected a single-channel (L/P/I) image")
        return np.array(im)

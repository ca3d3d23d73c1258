"""Five-crop training sets: write once, then read as a dataset.

Each source image (full resolution, before the input pipeline) gives the four corner crops and the
centre crop, each ``crop_ratio`` (0.5) × its height and width (``torchvision.transforms.functional.five_crop``,
order: top-left, top-right, bottom-left, bottom-right, centre). Crop ``j`` of image ``i`` is file number
``5·i + j``::

    <root>/cropped/{dataset}_five_crop_{ratio}/img/{split}/{n}.jpg
    <root>/cropped/{dataset}_five_crop_{ratio}/label/{split}/{n}.png     (class + 1, 0 = ignore)

Writing is idempotent (existing files are skipped) and atomic per file (temporary name + rename), so an
interrupted run can simply be restarted. A ``done.json`` with the number of crops is written at the end;
:class:`FiveCropDataset` checks it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from equss.data.base import SegmentationDataset, one_line_layout, read_label_png, require_dir
from equss.data.imagefolder import decode_label
from equss.io import atomic_write

NUM_CROPS = 5


def five_crop_dir(root: str | Path, dataset: str, crop_ratio: float = 0.5) -> Path:
    """``<root>/cropped/{dataset}_five_crop_{crop_ratio}``."""
    return Path(root) / "cropped" / f"{dataset}_five_crop_{crop_ratio}"


def _layout(root: Path, dataset: str, split: str, crop_ratio: float) -> str:
    d = five_crop_dir(root, dataset, crop_ratio)
    return (f"  {d}/img/{split}/<n>.jpg\n  {d}/label/{split}/<n>.png   (class + 1, 0 = ignore)\n"
            f"  created by: python scripts/five_crop.py --dataset {dataset} --root {root} --split {split}")


def five_crop_arrays(img: Image.Image, label: np.ndarray | None, crop_ratio: float = 0.5):
    """The five crops of one image: list of ``(PIL image, int64 label [h, w] or None)``."""
    import torchvision.transforms.functional as TF

    W, H = img.size
    size = [int(H * crop_ratio), int(W * crop_ratio)]
    img_crops = TF.five_crop(img, size)
    if label is None:
        return [(c, None) for c in img_crops]
    lab_crops = TF.five_crop(torch.from_numpy(np.asarray(label, dtype=np.int64)), size)
    return [(c, lc.numpy()) for c, lc in zip(img_crops, lab_crops)]


class _CropWriter(torch.utils.data.Dataset):
    """Item ``i`` writes the crops of source image ``i`` (DataLoader workers parallelise the writing)."""

    def __init__(self, source: SegmentationDataset, img_dir: Path, label_dir: Path, crop_ratio: float, quality: int):
        self.source, self.img_dir, self.label_dir = source, img_dir, label_dir
        self.crop_ratio, self.quality = crop_ratio, quality

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> int:
        paths = [(self.img_dir / f"{NUM_CROPS * i + j}.jpg", self.label_dir / f"{NUM_CROPS * i + j}.png")
                 for j in range(NUM_CROPS)]
        if all(p.is_file() and q.is_file() for p, q in paths):
            return 0
        img, label = self.source.load_raw(i)
        written = 0
        for (img_path, lab_path), (ci, cl) in zip(paths, five_crop_arrays(img, label, self.crop_ratio)):
            if cl is None:
                cl = np.full((ci.size[1], ci.size[0]), -1, dtype=np.int64)
            if cl.max(initial=-1) >= 255:
                raise ValueError(f"label value {int(cl.max())} of image {i} does not fit 'class + 1' in uint8")
            if not img_path.is_file():
                atomic_write(img_path, lambda fh, ci=ci: ci.save(fh, format="JPEG", quality=self.quality))
            if not lab_path.is_file():
                enc = Image.fromarray((cl + 1).astype(np.uint8))
                atomic_write(lab_path, lambda fh, enc=enc: enc.save(fh, format="PNG"))
            written += 1
        return written


def make_five_crop(
    source: SegmentationDataset,
    root: str | Path,
    dataset: str,
    split: str,
    crop_ratio: float = 0.5,
    num_workers: int = 0,
    jpeg_quality: int = 75,
    progress: bool = True,
) -> Path:
    """Write the five-crop version of ``source`` (which must implement ``load_raw``); returns the crop dir.

    ``jpeg_quality`` 75 is PIL's default, which STEGO's crop script used. Already written crops are
    skipped, so calling it twice is cheap and a crashed run resumes.
    """
    from equss.progress import Progress

    out = five_crop_dir(root, dataset, crop_ratio)
    img_dir, label_dir = out / "img" / split, out / "label" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    writer = _CropWriter(source, img_dir, label_dir, crop_ratio, jpeg_quality)
    loader = torch.utils.data.DataLoader(writer, batch_size=None, num_workers=num_workers, shuffle=False)
    for _ in Progress(loader, total=len(writer), desc=f"five-crop {dataset}/{split}", unit="img", enabled=progress):
        pass
    (out / f"done_{split}.json").write_text(json.dumps({"num_crops": NUM_CROPS * len(source), "crop_ratio": crop_ratio}))
    return out


class FiveCropDataset(SegmentationDataset):
    """Reads the files written by :func:`make_five_crop` (labels decoded ``stored − 1``, 0 → -1).

    Args:
        root: dataset root (the crops live in ``<root>/cropped/...``).
        dataset: dataset name used when cropping, e.g. "cocostuff27" or "cityscapes".
        split: split name used when cropping.
        res: output size of the standard pipeline.
        class_names: names of the classes (index = class id).
        crop_ratio: 0.5 (part of the directory name).
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split: str = "train",
        res: int = 224,
        class_names: list[str] | None = None,
        crop_ratio: float = 0.5,
        photometric_aug: bool = False,
        geometric_aug: bool = False,
    ):
        super().__init__(res, photometric_aug=photometric_aug, geometric_aug=geometric_aug)
        root = Path(root)
        layout = _layout(root, dataset, split, crop_ratio)
        out = five_crop_dir(root, dataset, crop_ratio)
        self.img_dir = require_dir(out / "img" / split, "five-crop image directory", layout)
        self.label_dir = require_dir(out / "label" / split, "five-crop label directory", layout)
        self.class_names = list(class_names) if class_names else []
        done = out / f"done_{split}.json"
        if not done.is_file():
            raise FileNotFoundError(
                f"five-crop set incomplete: {done} is missing (cropping did not finish, or the crops were made "
                f"by another tool; re-running the script below skips the files already there and writes it). "
                f"expected layout: {one_line_layout(layout)}"
            )
        self.num_crops = int(json.loads(done.read_text())["num_crops"])
        names = {p.name for p in self.img_dir.iterdir()}
        labels = {p.name for p in self.label_dir.iterdir()}
        for n in range(self.num_crops):
            if f"{n}.jpg" not in names or f"{n}.png" not in labels:
                raise FileNotFoundError(
                    f"five-crop file missing: {self.img_dir / f'{n}.jpg'} or {self.label_dir / f'{n}.png'} "
                    f"({self.num_crops} crops expected); expected layout: {one_line_layout(layout)}"
                )

    def __len__(self) -> int:
        return self.num_crops

    def source_files(self) -> list[Path]:
        n = range(self.num_crops)
        return [self.img_dir / f"{i}.jpg" for i in n] + [self.label_dir / f"{i}.png" for i in n]

    def load_raw(self, index: int) -> tuple[Image.Image, np.ndarray]:
        with Image.open(self.img_dir / f"{index}.jpg") as im:
            img = im.convert("RGB")
        return img, decode_label(read_label_png(self.label_dir / f"{index}.png"), label_offset=1, ignore_value=None)

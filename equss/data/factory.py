"""``build_dataset``: one entry point from a dataset name (as in the configs) to a dataset object."""

from __future__ import annotations

from pathlib import Path

from equss.data.base import SegmentationDataset
from equss.data.cityscapes import CITYSCAPES27_CLASSES, Cityscapes27
from equss.data.cocostuff import VARIANTS as COCO_VARIANTS
from equss.data.cocostuff import CocoStuff
from equss.data.five_crop import FiveCropDataset
from equss.data.imagefolder import ImageFolder
from equss.data.potsdam import POTSDAM3_CLASSES, Potsdam3
from equss.data.synthetic import SyntheticScenes, synthetic_class_names

_ALIASES = {"cityscapes27": "cityscapes", "potsdam3": "potsdam", "directory": "imagefolder"}
DATASET_NAMES = ("cocostuff27", "cocostuff15", "cocostuff3", "cityscapes", "potsdam", "imagefolder", "synthetic")
CROPS = (None, "none", "None", "five", "five_crop")


def canonical_name(name: str) -> str:
    """Lower-case name with aliases resolved; raises ``ValueError`` for unknown names."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)} (aliases: {', '.join(_ALIASES)})")
    return key


def class_names(name: str, num_classes: int | None = None) -> list[str]:
    """Class names of a named dataset (``num_classes`` only for "synthetic", default 5; "imagefolder"
    has none)."""
    key = canonical_name(name)
    if key.startswith("cocostuff"):
        return list(COCO_VARIANTS[int(key[len("cocostuff"):])][0])
    if key == "cityscapes":
        return list(CITYSCAPES27_CLASSES)
    if key == "potsdam":
        return list(POTSDAM3_CLASSES)
    if key == "synthetic":
        return synthetic_class_names(num_classes or 5)
    return []


def build_dataset(
    name: str,
    root: str | Path | None,
    split: str = "train",
    res: int = 224,
    *,
    crop: str | None = None,
    photometric_aug: bool = False,
    geometric_aug: bool = False,
    **kwargs,
) -> SegmentationDataset:
    """Build a dataset by name.

    Args:
        name: "cocostuff27", "cocostuff15", "cocostuff3", "cityscapes", "potsdam", "imagefolder" or
            "synthetic" (aliases "cityscapes27", "potsdam3", "directory").
        root: dataset root (for "synthetic": an optional cache directory, may be None).
        split: "train"/"val" (Potsdam also "unlabelled_train", "train+val", "all"; image folders any
            sub-folder name or None).
        res: output size of the standard pipeline (train 224, eval 320; synthetic default scenes 112).
        crop: None/"none" (the full images) or "five_crop"/"five" (the files written by
            ``scripts/five_crop.py`` under ``<root>/cropped/{name}_five_crop_0.5``).
        photometric_aug, geometric_aug: pipeline options, off by default.
        **kwargs: passed to the dataset class (e.g. ``list_file`` for COCO-Stuff, ``label_root`` and
            ``class_names`` for image folders, ``num_images``/``num_classes``/``seed`` for synthetic;
            synthetic also takes ``num_train``/``num_val``, the length used for the "train" or the other
            splits, so one kwargs dict serves both).
    """
    key = canonical_name(name)
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    aug = dict(photometric_aug=photometric_aug, geometric_aug=geometric_aug)
    if key != "synthetic" and root is None:
        raise ValueError(f"dataset {name!r} needs a root directory, got None")
    if crop in ("five", "five_crop"):
        if key == "synthetic":
            raise ValueError("five_crop is not defined for the synthetic dataset (scenes are generated at res)")
        for key_ in ("num_classes", "num_clusters"):  # image-folder class settings: the crops keep the names
            kwargs.pop(key_, None)
        return FiveCropDataset(root, key, split, res, class_names=kwargs.pop("class_names", None) or class_names(key),
                               crop_ratio=kwargs.pop("crop_ratio", 0.5), **aug, **kwargs)
    if key.startswith("cocostuff"):
        return CocoStuff(root, split, res, num_classes=int(key[len("cocostuff"):]), **aug, **kwargs)
    if key == "cityscapes":
        return Cityscapes27(root, split, res, **aug, **kwargs)
    if key == "potsdam":
        return Potsdam3(root, split, res, **aug, **kwargs)
    if key == "imagefolder":
        return ImageFolder(root, split, res, **aug, **kwargs)
    num_train, num_val = kwargs.pop("num_train", None), kwargs.pop("num_val", None)
    if "num_images" not in kwargs:
        kwargs["num_images"] = num_train if split == "train" else num_val
    return SyntheticScenes(split, res=res, cache_dir=root, **aug, **kwargs)

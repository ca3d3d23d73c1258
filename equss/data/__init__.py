"""Datasets, input pipeline, five-crop, kNN precompute, the feature cache and the resumable sampler.

Never imports :mod:`equss.models` (the feature cache takes any frozen ``nn.Module``).

Every dataset returns ``{"img": float32 [3,res,res] (ImageNet-normalised), "label": int64 [res,res]
(-1 = ignore), "index": int}``; see :mod:`equss.data.transforms` for the pipeline and
:func:`build_dataset` for the names.
"""

from equss.data.base import SegmentationDataset
from equss.data.cityscapes import CITYSCAPES27_CLASSES, Cityscapes27
from equss.data.cocostuff import (
    COCOSTUFF3_CLASSES,
    COCOSTUFF15_CLASSES,
    COCOSTUFF27_CLASSES,
    FINE_TO_COARSE27,
    CocoStuff,
)
from equss.data.factory import DATASET_NAMES, build_dataset, class_names
from equss.data.five_crop import FiveCropDataset, make_five_crop
from equss.data.imagefolder import ImageFolder
from equss.data.knn import compute_knn, global_features, knn_from_features, knn_path, load_knn, save_knn
from equss.data.pairs import PairDataset
from equss.data.potsdam import POTSDAM3_CLASSES, Potsdam3
from equss.data.synthetic import SyntheticScenes
from equss.data.transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, SegmentationTransform

__all__ = [
    "SegmentationDataset", "SegmentationTransform", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD",
    "CocoStuff", "Cityscapes27", "Potsdam3", "ImageFolder", "FiveCropDataset", "SyntheticScenes",
    "PairDataset", "build_dataset", "class_names", "DATASET_NAMES", "make_five_crop",
    "global_features", "knn_from_features", "compute_knn", "knn_path", "save_knn", "load_knn",
    "FINE_TO_COARSE27", "COCOSTUFF27_CLASSES", "COCOSTUFF15_CLASSES",
    "COCOSTUFF3_CLASSES", "CITYSCAPES27_CLASSES", "POTSDAM3_CLASSES",
]

"""EQUSS models: the frozen backbone (timm DINO ViTs, local DINO checkpoints) and its on-disk feature cache.

timm is imported lazily by :func:`build_backbone`, so importing this package stays cheap.
"""

from equss.models.backbone import BACKBONES, FrozenBackbone, build_backbone, load_dino_state_dict
from equss.models.feature_cache import CachedFeatureDataset, FeatureCache, backbone_fingerprint

__all__ = [
    "BACKBONES",
    "FrozenBackbone",
    "build_backbone",
    "load_dino_state_dict",
    "FeatureCache",
    "CachedFeatureDataset",
    "backbone_fingerprint",
]

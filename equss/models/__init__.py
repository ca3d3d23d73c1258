"""EQUSS models: the frozen backbone (timm DINO ViTs, local DINO checkpoints), the demo backbone and
:class:`EQUSSModel` (expansion head → product quantizer → probes).

timm is imported lazily by :func:`build_backbone`, so importing this package stays cheap.
"""

from equss.models.backbone import BACKBONES, FrozenBackbone, build_backbone, load_dino_state_dict
from equss.models.equss_model import EQUSSModel

__all__ = ["BACKBONES", "EQUSSModel", "FrozenBackbone", "build_backbone", "load_dino_state_dict"]

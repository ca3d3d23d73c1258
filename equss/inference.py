"""Load a trained EQUSS checkpoint with its data for evaluation and analysis (``scripts/eval.py``,
``scripts/analyze.py``).

The checkpoint carries its resolved configuration, so ``load_run(ckpt)`` rebuilds exactly the backbone,
the validation dataset (at the protocol resolution) and the model that were trained; ``overrides``
(``key=value``) may change non-structural settings, e.g. ``data.root`` when the data moved.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from equss.checkpoint import check_compatible, load_checkpoint
from equss.config import config_to_dict

__all__ = ["LoadedRun", "load_run"]


@dataclass
class LoadedRun:
    cfg: DictConfig
    model: torch.nn.Module  # EQUSSModel in eval mode
    backbone: torch.nn.Module
    val_dataset: torch.utils.data.Dataset  # items with "img", "label", "index" (+ "feat" when cached)
    val_loader: torch.utils.data.DataLoader
    n_classes: int
    class_names: list[str]
    device: torch.device
    checkpoint: dict[str, Any]

    def featurize(self, batch: dict[str, Any], flip: bool = False) -> torch.Tensor:
        if flip:
            return self.backbone(batch["img"].flip(-1).to(self.device))
        if "feat" in batch:
            return batch["feat"].to(self.device).float()
        return self.backbone(batch["img"].to(self.device))


def load_run(
    checkpoint_path: str,
    overrides: Sequence[str] = (),
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    cache_features: bool | None = None,
    progress: bool = True,
) -> LoadedRun:
    """Rebuild model, backbone and validation data of the run that wrote ``checkpoint_path``."""
    from equss.data import build_dataset
    from equss.models.backbone import build_backbone
    from equss.models.equss_model import EQUSSModel
    from equss.train import cached_features, dataset_kwargs

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    ckpt = load_checkpoint(checkpoint_path, map_location=dev)
    saved = OmegaConf.create(ckpt["config"])
    cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(list(overrides)))
    check_compatible(ckpt["config"], config_to_dict(cfg), checkpoint_path)
    if cache_features is not None:
        cfg.backbone.cache_features = cache_features

    backbone = build_backbone(str(cfg.backbone.name), weights=cfg.backbone.weights, device=dev)
    d = cfg.data
    images = build_dataset(str(d.dataset), split=str(d.val_split), res=int(d.val_res), **dataset_kwargs(cfg))
    if bool(cfg.backbone.cache_features):
        val_dataset = cached_features(backbone, images, cfg, str(d.val_split), int(d.val_res), dev, progress,
                                      with_image=True)
    else:
        val_dataset = images
    loader = torch.utils.data.DataLoader(
        val_dataset,
        batch_size=batch_size or int(d.val_batch_size),
        shuffle=False,
        num_workers=int(d.num_workers) if num_workers is None else num_workers,
    )
    model = EQUSSModel.from_config(cfg.model, int(ckpt["in_dim"]), int(ckpt["n_classes"])).to(dev)
    model.load_state_dict(ckpt["model"])
    model.eval()
    if backbone.embed_dim != int(ckpt["in_dim"]):
        raise RuntimeError(
            f"backbone {cfg.backbone.name} gives {backbone.embed_dim} channels but the checkpoint "
            f"{os.path.basename(checkpoint_path)} was trained on {ckpt['in_dim']}"
        )
    return LoadedRun(
        cfg=cfg, model=model, backbone=backbone, val_dataset=val_dataset, val_loader=loader,
        n_classes=int(ckpt["n_classes"]), class_names=list(ckpt["class_names"]), device=dev, checkpoint=ckpt,
    )

"""From a configuration to what a run works on: runtime, backbone, datasets, feature caches, kNN pairs.

Training (:mod:`equss.train`), evaluation (``scripts/eval.py``), prediction (:mod:`equss.predict`) and
analysis (``scripts/analyze.py``) all start here, so they build data and features by one rule:

* :func:`setup_runtime` — process group under ``torchrun``, device, global seeds;
* :func:`build_backbone_for` — the frozen backbone of ``cfg.backbone``;
* :class:`Featurizer` — backbone features of a batch: the cached ``feat`` entries when present, else the
  backbone on the images (and always the backbone for flipped images);
* :func:`build_train_data` / :func:`build_val_data` — datasets, feature caches, kNN pairs, sampler,
  loaders;
* :func:`load_trained` / :func:`load_run` — a trained checkpoint with its configuration, backbone and
  model (and, for :func:`load_run`, its validation data).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from equss.checkpoint import CheckpointError, load_checkpoint
from equss.config import ConfigError, TrainConfig, check_compatible, config_from_dict, config_to_dict
from equss.data import build_dataset
from equss.data.feature_cache import FeatureCache
from equss.data.knn import load_or_compute_knn
from equss.data.pairs import PairDataset
from equss.data.sampler import ResumableSampler
from equss.models.backbone import build_backbone
from equss.models.equss_model import EQUSSModel
from equss.runtime import DistInfo, init_distributed, rank0_first, resolve_device, seed_everything

__all__ = [
    "Featurizer",
    "LoadedRun",
    "TrainData",
    "ValData",
    "build_backbone_for",
    "build_train_data",
    "build_val_data",
    "cached_features",
    "dataset_id",
    "dataset_kwargs",
    "feature_cache_dir",
    "load_run",
    "load_trained",
    "measure_correlations",
    "setup_runtime",
]

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- runtime
def setup_runtime(cfg: TrainConfig) -> tuple[DistInfo, torch.device]:
    """Initialise the process group (under ``torchrun``), pick the device, seed every global RNG."""
    wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    info = init_distributed("cuda" if wants_cuda else "cpu")
    device = resolve_device(cfg.device, info)
    seed_everything(cfg.seed)
    return info, device


def build_backbone_for(cfg: TrainConfig, device: torch.device) -> nn.Module:
    return build_backbone(cfg.backbone.name, weights=cfg.backbone.weights, device=device)


class Featurizer:
    """Backbone features ``[B, C, h, w]`` of a batch, by one rule for training and evaluation.

    ``featurize(batch, key="img")``: the cached entry (``"feat"`` for ``"img"``, ``"feat_pos"`` for
    ``"img_pos"``) when the batch has it, else the frozen backbone on ``batch[key]``. With ``flip=True``
    the backbone always runs, on the horizontally flipped images (caches hold unflipped features only).
    """

    def __init__(self, backbone: nn.Module, device: torch.device) -> None:
        self.backbone = backbone
        self.device = device

    def __call__(self, batch: dict[str, Any], key: str = "img", flip: bool = False) -> Tensor:
        if flip:
            return self.backbone(batch[key].flip(-1).to(self.device))
        cached = key.replace("img", "feat", 1)
        if cached in batch:
            return batch[cached].to(self.device, non_blocking=True).float()
        return self.backbone(batch[key].to(self.device, non_blocking=True))


# ----------------------------------------------------------------------------------------------- data
def dataset_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`equss.data.build_dataset` from ``cfg.data`` (besides name/split/res)."""
    d = cfg.data
    kwargs: dict[str, Any] = {"root": d.root, "crop": d.crop}
    if d.dataset == "synthetic":
        s = d.synthetic
        kwargs.update(num_train=s.num_train, num_val=s.num_val, num_classes=s.num_classes, seed=cfg.seed)
    elif d.dataset == "imagefolder":
        kwargs.update(class_names=d.class_names, num_classes=d.num_classes, num_clusters=d.num_clusters)
    return kwargs


def dataset_id(cfg: TrainConfig, split: str) -> str:
    """Identity of a (dataset, variant, split) for caches and kNN files."""
    d = cfg.data
    ident = f"{d.dataset}_{split}_{d.crop}"
    if d.dataset == "synthetic":
        s = d.synthetic
        ident += f"_n{s.num_train if split == d.train_split else s.num_val}_c{s.num_classes}_s{cfg.seed}"
    return ident


def feature_cache_dir(cfg: TrainConfig) -> str:
    """``backbone.cache_dir``, else ``<data.root>/equss_cache``, else ``~/.cache/equss``."""
    if cfg.backbone.cache_dir:
        return cfg.backbone.cache_dir
    if cfg.data.root:
        return os.path.join(cfg.data.root, "equss_cache")
    return os.path.join(os.path.expanduser("~"), ".cache", "equss")


def cached_features(backbone, images, cfg: TrainConfig, split: str, res: int, device, progress: bool,
                    with_image: bool) -> torch.utils.data.Dataset:
    """The backbone features of ``images`` from the on-disk cache (computed on first use).

    Items are ``{"feat", "label", "index"}`` (+ ``"img"`` from ``images`` when ``with_image``). The cache
    key covers the backbone weights, dataset, split, resolution and crop (:mod:`equss.data.feature_cache`).
    """
    cache = FeatureCache(
        backbone, images, os.path.join(feature_cache_dir(cfg), "features"),
        dataset_name=dataset_id(cfg, split), split=split, res=res, crop=cfg.data.crop,
        batch_size=cfg.data.val_batch_size, device=device, progress=progress,
    )
    return cache.dataset(return_img=with_image)


@dataclass
class ValData:
    """The evaluation split at the protocol resolution."""

    images: torch.utils.data.Dataset  # items {"img", "label", "index"}
    base: torch.utils.data.Dataset  # what the loader reads: the images, or their cached features (+ "img")
    loader: torch.utils.data.DataLoader
    n_classes: int
    class_names: list[str]


@dataclass
class TrainData:
    """Everything the training loop reads: anchors with kNN positives, the sampler, the loaders."""

    images: torch.utils.data.Dataset
    base: torch.utils.data.Dataset  # images or cached features (no "img")
    knn_path: str
    pairs: PairDataset
    sampler: ResumableSampler
    loader: torch.utils.data.DataLoader
    holdout_loader: torch.utils.data.DataLoader | None  # eval.select_on=holdout only
    val: ValData

    @property
    def n_classes(self) -> int:
        return self.val.n_classes


def _val_loader(cfg: TrainConfig, dataset, batch_size: int | None = None, num_workers: int | None = None):
    d = cfg.data
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size or d.val_batch_size, shuffle=False,
        num_workers=d.num_workers if num_workers is None else num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_train_data(cfg: TrainConfig, backbone: nn.Module, device: torch.device, dist: DistInfo,
                     progress: bool) -> TrainData:
    """Training and validation datasets, feature caches and the kNN table (rank 0 computes, then the others
    read), the anchor/positive pairs, the resumable sampler and the loaders."""
    d = cfg.data
    kwargs = dataset_kwargs(cfg)
    train_images = build_dataset(d.dataset, split=d.train_split, res=d.train_res, **kwargs)
    val_images = build_dataset(d.dataset, split=d.val_split, res=d.val_res, **kwargs)
    n_classes = int(train_images.num_classes)
    if n_classes == 0:  # only an unlabelled image folder without data.num_clusters has no classes
        raise ConfigError(f"data.num_clusters: {d.root} has no labels, so training needs the number of clusters "
                          f"to find (data.num_clusters=K, K >= 2)")
    class_names = list(getattr(train_images, "class_names", [str(i) for i in range(n_classes)]))

    if cfg.backbone.cache_features:
        def caches():
            train = cached_features(backbone, train_images, cfg, d.train_split, d.train_res, device, progress,
                                    with_image=False)
            val = cached_features(backbone, val_images, cfg, d.val_split, d.val_res, device, progress,
                                  with_image=True)
            return train, val

        train_base, val_base = rank0_first(dist, caches)
    else:
        train_base, val_base = train_images, val_images

    knn_k, num_neighbors = _knn_sizes(cfg, len(train_images))
    nns, knn_path = rank0_first(
        dist,
        lambda: load_or_compute_knn(
            backbone, train_images, dataset_id(cfg, d.train_split), feature_cache_dir(cfg),
            k=knn_k, device=device, progress=progress,
            features=train_base if cfg.backbone.cache_features else None,  # cached: no second backbone pass
        ),
    )
    pairs = PairDataset(train_base, nns, num_neighbors, cfg.seed)
    anchors, holdout_loader = _holdout_split(cfg, len(train_base), kwargs)
    sampler = ResumableSampler(anchors, d.batch_size, cfg.seed, dist.rank, dist.world_size)
    loader = torch.utils.data.DataLoader(
        pairs,
        batch_size=sampler.local_batch,
        sampler=sampler,
        num_workers=d.num_workers,
        drop_last=True,
        # Own generators: creating a loader iterator must not draw from the global RNG, or a resumed
        # run (which creates its iterator at another point) would see different dropout/sampling draws.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    val = ValData(val_images, val_base, _val_loader(cfg, val_base), n_classes, class_names)
    return TrainData(train_images, train_base, str(knn_path), pairs, sampler, loader, holdout_loader, val)


def _knn_sizes(cfg: TrainConfig, n: int) -> tuple[int, int]:
    """``data.knn_k`` and ``data.num_neighbors`` capped to a training set of ``n`` images (with a notice):
    a table holds at most ``n`` neighbours (the image itself first), and a positive is one of the others."""
    d = cfg.data
    if n < 2:
        raise ConfigError(f"data.dataset: the training split has {n} image(s); kNN positives need at least 2")
    k, nb = d.knn_k, d.num_neighbors
    if k > n:
        log.warning("data.knn_k=%d is more than the %d training images: using knn_k=%d", k, n, n)
        k = n
    if nb >= k:
        log.warning("data.num_neighbors=%d needs knn_k > num_neighbors: using num_neighbors=%d", nb, k - 1)
        nb = k - 1
    return k, nb


def _holdout_split(cfg: TrainConfig, n: int, kwargs: dict[str, Any]):
    """Anchor indices, and for ``eval.select_on=holdout`` a loader over the held-out training images.

    A seeded ``holdout_fraction`` of the training images is never an anchor, so its labels never train
    the linear probe; the checkpoint is then selected on it instead of on the reported split. Held-out
    images may still be drawn as kNN positives (their pixels, never their labels, are used). They are
    evaluated at the protocol resolution by running the backbone (no feature cache).
    """
    d = cfg.data
    if cfg.eval.select_on != "holdout":
        return list(range(n)), None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    h = max(1, round(cfg.eval.holdout_fraction * n))
    held, anchors = sorted(perm[:h]), sorted(perm[h:])
    images = build_dataset(d.dataset, split=d.train_split, res=d.val_res, **kwargs)
    return anchors, _val_loader(cfg, torch.utils.data.Subset(images, held))


def build_val_data(cfg: TrainConfig, backbone: nn.Module, device: torch.device, progress: bool = True,
                   batch_size: int | None = None, num_workers: int | None = None) -> ValData:
    """The validation split (cached features when ``backbone.cache_features``, items always carry ``img``)."""
    d = cfg.data
    images = build_dataset(d.dataset, split=d.val_split, res=d.val_res, **dataset_kwargs(cfg))
    if cfg.backbone.cache_features:
        base = cached_features(backbone, images, cfg, d.val_split, d.val_res, device, progress, with_image=True)
    else:
        base = images
    n_classes = int(images.num_classes)
    class_names = list(getattr(images, "class_names", [str(i) for i in range(n_classes)]))
    return ValData(images, base, _val_loader(cfg, base, batch_size, num_workers), n_classes, class_names)


# -------------------------------------------------------------------------------------- STEGO shifts
@torch.no_grad()
def measure_correlations(cfg: TrainConfig, data: TrainData, featurize: Featurizer, batches: int = 8) -> dict[str, Tensor]:
    """Feature correlations of ``batches`` random batches of training pairs, as each pairing of the STEGO
    loss sees them (``loss.preset=auto`` sets its shifts from them). Draws only from its own generators."""
    from equss.losses import StegoCorrespondenceLoss

    probe = StegoCorrespondenceLoss(feature_samples=cfg.loss.feature_samples, neg_samples=cfg.loss.neg_samples,
                                    pointwise=cfg.loss.pointwise)
    loader = torch.utils.data.DataLoader(
        data.pairs, batch_size=min(cfg.data.batch_size, len(data.pairs)), shuffle=True, drop_last=True,
        num_workers=0, generator=torch.Generator().manual_seed(cfg.seed),
    )
    g = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, list[Tensor]] = {"pos_intra": [], "pos_inter": [], "neg_inter": []}
    for i, batch in enumerate(loader):
        if i == batches:
            break
        for key, v in probe.correlation_samples(featurize(batch, "img"), featurize(batch, "img_pos"), g).items():
            out[key].append(v.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------- trained runs
@dataclass
class LoadedRun:
    """A trained checkpoint with what it needs: configuration, backbone, model (eval mode), validation data."""

    cfg: TrainConfig
    model: EQUSSModel
    backbone: nn.Module
    val: ValData
    n_classes: int
    class_names: list[str]
    device: torch.device
    checkpoint: dict[str, Any]
    featurize: Featurizer


def load_trained(
    checkpoint_path: str, overrides: Sequence[str] = (), device: str = "auto"
) -> tuple[TrainConfig, EQUSSModel, nn.Module, dict[str, Any], torch.device]:
    """``(cfg, model in eval mode, backbone, checkpoint, device)`` of the run that wrote ``checkpoint_path``.

    The checkpoint carries its configuration; ``overrides`` (``key=value``) may change non-structural
    settings, e.g. ``data.root`` when the data moved (structural keys must match).
    """
    dev = resolve_device(device, DistInfo())
    ckpt = load_checkpoint(checkpoint_path, map_location=dev)
    cfg = config_from_dict(ckpt["config"], overrides)
    check_compatible(ckpt["config"], config_to_dict(cfg), checkpoint_path)
    backbone = build_backbone_for(cfg, dev)
    if backbone.embed_dim != int(ckpt["in_dim"]):
        raise CheckpointError(
            f"backbone {cfg.backbone.name} gives {backbone.embed_dim} channels but the checkpoint "
            f"{checkpoint_path} was trained on {ckpt['in_dim']}"
        )
    model = EQUSSModel.from_config(cfg.model, int(ckpt["in_dim"]), int(ckpt["n_classes"])).to(dev)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return cfg, model, backbone, ckpt, dev


def load_run(
    checkpoint_path: str,
    overrides: Sequence[str] = (),
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    cache_features: bool | None = None,
    progress: bool = True,
) -> LoadedRun:
    """Rebuild model, backbone and validation data of the run that wrote ``checkpoint_path``.

    The checkpoint carries its configuration; ``overrides`` (``key=value``) may change non-structural
    settings, e.g. ``data.root`` when the data moved (structural keys must match: checkpoint.py).
    """
    cfg, model, backbone, ckpt, dev = load_trained(checkpoint_path, overrides, device)
    if cache_features is not None:
        cfg.backbone.cache_features = cache_features
    val = build_val_data(cfg, backbone, dev, progress, batch_size, num_workers)
    return LoadedRun(
        cfg=cfg, model=model, backbone=backbone, val=val, n_classes=int(ckpt["n_classes"]),
        class_names=list(ckpt["class_names"]), device=dev, checkpoint=ckpt, featurize=Featurizer(backbone, dev),
    )

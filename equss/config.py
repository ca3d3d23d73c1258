"""The run configuration: typed sections whose keys are the constructors' argument names.

One :class:`TrainConfig` describes a run completely (a run is a pure function of it). Its defaults are
the paper's settings and live here only; the YAML files in ``configs/`` override a few keys per
dataset and backbone, and ``key=value`` overrides (OmegaConf dotlist syntax) come last::

    cfg = load_config("configs/cocostuff27_vits8.yaml", ["optim.lr=1e-4", "data.root=/data/coco"])

Sections and who consumes them (every key is that constructor's argument of the same name):

================  =====================================================================================
``data``          :func:`equss.data.build_dataset` and the loaders (``data.synthetic``: the embedded scenes)
``backbone``      :func:`equss.models.backbone.build_backbone` (+ the feature cache)
``model``         :class:`equss.models.EQUSSModel` (``model.quantizer``: :class:`equss.nn.ProductQuantizer`)
``loss``          :class:`equss.losses.StegoCorrespondenceLoss` (``preset`` fills the weights and shifts
                  that are left ``null``) and the loss weights of :meth:`EQUSSModel.forward`
``optim``         the optimisers, clipping, precision and length of the run
``eval``          validation, checkpoint selection and the final evaluation
``log``           TensorBoard, CSV and progress output
================  =====================================================================================

Unknown keys and values of the wrong type are errors when the configuration is loaded
(:class:`ConfigError`, one line naming the key), before any data is built; :func:`validate` checks
ranges and choices. ``docs/configuration.md`` describes every key.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "ConfigError",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "check_compatible",
    "migrate_config_dict",
    "validate",
]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "synthetic.yaml")


class ConfigError(ValueError):
    """A user error in the configuration; the message is one line naming the key (or file) and the fix."""


# ------------------------------------------------------------------------------------------ sections
@dataclass
class SyntheticConfig:
    """The embedded procedurally generated scenes (:class:`equss.data.SyntheticScenes`)."""

    num_train: int = 600
    num_val: int = 100
    num_classes: int = 5


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    root: str | None = None
    crop: str = "none"
    train_split: str = "train"
    val_split: str = "val"
    train_res: int = 224
    val_res: int = 320
    batch_size: int = 16
    val_batch_size: int = 16
    num_workers: int = 2
    num_neighbors: int = 7
    knn_k: int = 30
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Image folders only (data.dataset=imagefolder): the classes of a labelled folder (names, or a count;
    # inferred from the label PNGs when neither is given), or the clusters to find in an unlabelled one.
    class_names: list[str] | None = None
    num_classes: int | None = None
    num_clusters: int | None = None


@dataclass
class BackboneConfig:
    name: str = "vit_small_patch8"
    weights: str = "default"
    cache_features: bool = True
    cache_dir: str | None = None


@dataclass
class QuantizerConfig:
    """Keyword arguments of :class:`equss.nn.ProductQuantizer` (the paper's head by default)."""

    normalize: str = "l2"
    output: str = "raw"
    learning: str = "param"
    beta: float = 0.25
    codebook_weight: float = 1.0
    decay: float = 0.99
    eps: float = 1e-5
    ema_sums: str = "raw"
    init: str = "xavier"
    kmeans_iters: int = 10
    dead_code_steps: int = 0
    dead_code_seed: str = "random"
    on_invalid: str = "skip"


@dataclass
class ModelConfig:
    """Arguments of :class:`equss.models.EQUSSModel` (``in_dim`` and ``n_classes`` come from the data)."""

    dim: int = 1024
    num_subspaces: int = 32
    codebook_size: int = 256
    dropout: float = 0.1
    extra_clusters: int = 0
    cluster_init: str = "randn"
    cluster_loss_at: str = "label"
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)


@dataclass
class LossConfig:
    """:class:`equss.losses.StegoCorrespondenceLoss` (weights/shifts ``null`` = the preset's) and loss weights."""

    preset: str = "cocostuff27/vit_small_patch8"
    pos_intra_weight: float | None = None
    pos_intra_shift: float | None = None
    pos_inter_weight: float | None = None
    pos_inter_shift: float | None = None
    neg_inter_weight: float | None = None
    neg_inter_shift: float | None = None
    feature_samples: int = 11
    neg_samples: int = 5
    zero_clamp: bool = True
    pointwise: bool = True
    stabilize: bool = False
    stego_weight: float = 1.0
    pq_weight: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 3e-4
    probe_lr: float = 3e-3
    grad_clip: float = 10.0
    epochs: int = 3
    max_steps: int | None = None
    amp: str = "auto"


@dataclass
class EvalConfig:
    every: int = 75
    select_on: str = "val"
    holdout_fraction: float = 0.1
    crf: bool = True
    crf_processes: int = 2
    flip: bool = False
    kmeans_baseline: bool = True


@dataclass
class LogConfig:
    tensorboard: bool = True
    csv: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    seed: int = 10
    output_dir: str = "runs/${data.dataset}_${backbone.name}"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Where the configuration was read from (set by load_config; informational, not a setting).
    config_path: str | None = None


# ------------------------------------------------------------------------------------------ loading
def _one_line(exc: Exception) -> str:
    """OmegaConf's multi-line messages (message, full_key, object_type) as one line."""
    msg = (getattr(exc, "msg", None) or str(exc) or type(exc).__name__).splitlines()[0]
    key = getattr(exc, "full_key", None)
    return msg if not key or msg.startswith(f"{key}:") else f"{key}: {msg}"


def _load_yaml(path: str):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path} (configs live in {CONFIG_DIR})")
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(exc)}") from exc


def _resolve_path(path: str | None) -> str:
    if path is None:
        return DEFAULT_CONFIG
    if not os.path.isfile(path) and os.path.isfile(os.path.join(CONFIG_DIR, path)):
        return os.path.join(CONFIG_DIR, path)
    return path


def _structured(layers: Sequence[Any], where: str) -> TrainConfig:
    """Merge ``layers`` over the typed defaults, resolve interpolations, return the dataclass."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration ({where}): {_one_line(exc)}") from exc
    assert isinstance(cfg, TrainConfig)
    return cfg


def _dotlist(overrides: Sequence[str]):
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid override in {list(overrides)}: {_one_line(exc)}") from exc


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The typed defaults ← the YAML file at ``path`` (default: the embedded synthetic demo) ← overrides.

    Args:
        path: a YAML file (absolute, relative, or a bare name of a file in ``configs/``).
        overrides: ``["optim.epochs=1", "data.root=/data/coco"]`` (OmegaConf dotlist syntax).

    Raises:
        ConfigError: missing file, unknown key, wrong type, or a value :func:`validate` rejects.
    """
    path = _resolve_path(path)
    cfg = _structured([_load_yaml(path), _dotlist(overrides)], f"{path}, overrides {list(overrides)}")
    cfg.config_path = os.path.abspath(path)
    validate(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (for checkpoints and logs)."""
    return asdict(cfg)


# Keys renamed when the configuration vocabulary became the constructors' (checkpoint format 1 → 2).
_RENAMED_V1 = {
    ("model", "vq_type"): ("model", "quantizer", "learning"),
    ("model", "normalize"): ("model", "quantizer", "normalize"),
    ("model", "beta"): ("model", "quantizer", "beta"),
    ("model", "book_weight"): ("model", "quantizer", "codebook_weight"),
    ("model", "init"): ("model", "quantizer", "init"),
    ("model", "output"): ("model", "quantizer", "output"),
    ("model", "ema_decay"): ("model", "quantizer", "decay"),
    ("model", "ema_eps"): ("model", "quantizer", "eps"),
    ("model", "dead_code_steps"): ("model", "quantizer", "dead_code_steps"),
}
_VALUE_ALIASES_V1 = {("model", "quantizer", "init"): {"uni": "xavier", "rand": "random"}}
_DROPPED_V1 = (("data", "synthetic", "res"),)  # was read nowhere


def migrate_config_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A configuration dict of checkpoint format 1 (the authors' key names) in today's vocabulary.

    Idempotent: a dict already in today's vocabulary comes back unchanged (as a copy).
    """
    d = copy.deepcopy(d)
    for old, new in _RENAMED_V1.items():
        node = d
        for part in old[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict) or old[-1] not in node:
            continue
        value = node.pop(old[-1])
        target = d
        for part in new[:-1]:
            target = target.setdefault(part, {})
        target[new[-1]] = _VALUE_ALIASES_V1.get(new, {}).get(value, value)
    for dropped in _DROPPED_V1:
        node = d
        for part in dropped[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(dropped[-1], None)
    return d


# Keys that change the shape or meaning of saved tensors: a checkpoint written with other values cannot be
# resumed or evaluated with this configuration.
STRUCTURAL_KEYS = (
    "backbone.name",
    "data.dataset",
    "model.dim",
    "model.num_subspaces",
    "model.codebook_size",
    "model.quantizer.learning",
    "model.quantizer.normalize",
    "model.extra_clusters",
)


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_compatible(saved_cfg: dict, cfg: dict, path: str) -> None:
    """Raise :class:`equss.checkpoint.CheckpointMismatchError` listing every structural key that differs.

    ``saved_cfg`` may be in the vocabulary of an older checkpoint format (it is migrated first).
    """
    from equss.checkpoint import CheckpointMismatchError

    saved_cfg = migrate_config_dict(saved_cfg)
    diffs = [
        f"{key}: checkpoint {_get(saved_cfg, key)!r} vs now {_get(cfg, key)!r}"
        for key in STRUCTURAL_KEYS
        if _get(saved_cfg, key) != _get(cfg, key)
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by another configuration:\n  " + "\n  ".join(diffs)
        )


def config_from_dict(d: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """Rebuild the :class:`TrainConfig` a checkpoint stored (any format), then apply ``overrides``."""
    d = migrate_config_dict(d)
    where = f"stored configuration, overrides {list(overrides)}"
    cfg = _structured([OmegaConf.create(d), _dotlist(overrides)], where)
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------ checks
DATASETS = ("synthetic", "cocostuff27", "cocostuff15", "cocostuff3", "cityscapes", "potsdam", "imagefolder")
CROPS = ("none", "five")
AMP = ("auto", "bf16", "fp16", "off")
SELECT_ON = ("val", "holdout", "last")
CLUSTER_INITS = ("randn", "kmeans")


def _need(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value: Any, allowed: Sequence[str], key: str) -> None:
    _need(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def validate(cfg: TrainConfig) -> None:
    """Check ranges and choices of every key; raises :class:`ConfigError` naming the first bad key.

    Runs when the configuration is loaded, before any data or model is built. Model options are checked
    by the constructor that takes them (building a ProductQuantizer of the configured shape is cheap).
    """
    from equss.losses import STEGO_PRESETS  # lazily: importing the config stays cheap
    from equss.nn import ProductQuantizer

    d, m, o, e = cfg.data, cfg.model, cfg.optim, cfg.eval
    _choice(d.dataset, DATASETS, "data.dataset")
    _choice(d.crop, CROPS, "data.crop")
    for key in ("train_res", "val_res", "batch_size", "val_batch_size", "knn_k", "num_neighbors"):
        _need(getattr(d, key) >= 1, f"data.{key}", f"must be >= 1, got {getattr(d, key)}")
    _need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _need(d.num_neighbors < d.knn_k, "data.num_neighbors",
          f"must be smaller than data.knn_k={d.knn_k} (column 0 of the kNN table is the image itself), got {d.num_neighbors}")
    if d.dataset == "synthetic":
        s = d.synthetic
        for key in ("num_train", "num_val", "num_classes"):
            _need(getattr(s, key) >= 1, f"data.synthetic.{key}", f"must be >= 1, got {getattr(s, key)}")
    elif d.root is None:
        raise ConfigError(f"data.root: dataset {d.dataset!r} needs its root directory (data.root=/path/to/{d.dataset})")
    if d.dataset != "imagefolder":
        for key in ("class_names", "num_classes", "num_clusters"):
            _need(getattr(d, key) is None, f"data.{key}",
                  f"is for data.dataset=imagefolder only ({d.dataset!r} defines its own classes)")
    from equss.models.backbone import BACKBONES, DEMO_NAME  # lazily: no timm import

    _need(cfg.backbone.name in BACKBONES or cfg.backbone.name == DEMO_NAME, "backbone.name",
          f"{cfg.backbone.name!r} is not one of {', '.join(sorted(BACKBONES) + [DEMO_NAME])}")
    patch = BACKBONES[cfg.backbone.name].patch_size if cfg.backbone.name in BACKBONES else 8
    for key in ("train_res", "val_res"):
        value = getattr(d, key)
        _need(value % patch == 0, f"data.{key}",
              f"{value} is not a multiple of the patch size {patch} of {cfg.backbone.name} (e.g. {value - value % patch or patch})")
    _need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
          f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")

    for key in ("dim", "num_subspaces", "codebook_size"):
        _need(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    _need(m.dim % m.num_subspaces == 0, "model.num_subspaces",
          f"must divide model.dim={m.dim} (each subspace has dim/num_subspaces channels), got {m.num_subspaces}")
    _need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _need(m.extra_clusters >= 0, "model.extra_clusters", f"must be >= 0, got {m.extra_clusters}")
    _choice(m.cluster_init, CLUSTER_INITS, "model.cluster_init")
    _choice(m.cluster_loss_at, ("label", "feature"), "model.cluster_loss_at")
    try:
        ProductQuantizer(m.dim, m.num_subspaces, m.codebook_size, channel_dim=1, **asdict(m.quantizer))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.quantizer: {exc}") from exc

    _need(cfg.loss.preset in STEGO_PRESETS or cfg.loss.preset == "auto", "loss.preset",
          f"{cfg.loss.preset!r} is not 'auto' or one of {', '.join(sorted(STEGO_PRESETS))}")
    _need(cfg.loss.feature_samples >= 1, "loss.feature_samples", f"must be >= 1, got {cfg.loss.feature_samples}")
    _need(cfg.loss.neg_samples >= 0, "loss.neg_samples", f"must be >= 0, got {cfg.loss.neg_samples}")

    _need(o.lr > 0 and o.probe_lr > 0, "optim.lr", f"learning rates must be > 0, got lr={o.lr}, probe_lr={o.probe_lr}")
    _need(o.grad_clip > 0, "optim.grad_clip", f"must be > 0, got {o.grad_clip}")
    _need(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
    _need(o.max_steps is None or o.max_steps >= 1, "optim.max_steps", f"must be >= 1 or null, got {o.max_steps}")
    _choice(o.amp, AMP, "optim.amp")

    _need(e.every >= 1, "eval.every", f"must be >= 1 (validate every this many steps), got {e.every}")
    _choice(e.select_on, SELECT_ON, "eval.select_on")
    _need(0.0 < e.holdout_fraction < 1.0, "eval.holdout_fraction", f"must be in (0, 1), got {e.holdout_fraction}")
    _need(e.crf_processes >= 1, "eval.crf_processes", f"must be >= 1, got {e.crf_processes}")

"""Training configuration: ``configs/base.yaml`` ← a dataset/backbone YAML ← ``key=value`` overrides.

Every key must exist in ``configs/base.yaml``: a typo on the command line (``optim.lrr=1``) is an error,
not a silently ignored value.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "load_config", "config_to_dict"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
BASE_CONFIG = os.path.join(CONFIG_DIR, "base.yaml")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "synthetic.yaml")


def _load_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path} (configs live in {CONFIG_DIR})")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"config {path} must be a mapping, got {type(cfg).__name__}")
    return cfg


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge the base config, the file at ``path`` (default: the embedded synthetic demo) and overrides.

    Args:
        path: a YAML file (absolute, relative, or a bare name of a file in ``configs/``).
        overrides: ``["optim.epochs=1", "data.root=/data/coco"]`` (OmegaConf dotlist syntax).

    Raises:
        FileNotFoundError: the config file does not exist.
        KeyError: a key in the file or the overrides is not in ``configs/base.yaml``.
    """
    if path is None:
        path = DEFAULT_CONFIG
    elif not os.path.isfile(path) and os.path.isfile(os.path.join(CONFIG_DIR, path)):
        path = os.path.join(CONFIG_DIR, path)
    base = _load_yaml(BASE_CONFIG)
    OmegaConf.set_struct(base, True)  # unknown keys raise instead of being added
    try:
        cfg = OmegaConf.merge(base, _load_yaml(path), OmegaConf.from_dotlist(list(overrides)))
    except Exception as exc:  # omegaconf raises ConfigKeyError and friends
        raise KeyError(f"invalid configuration ({path}, overrides {list(overrides)}): {exc}") from exc
    OmegaConf.set_struct(cfg, False)
    cfg.config_path = os.path.abspath(path)
    return cfg


def config_to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain resolved dict (for checkpoints and logs)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]

"""Atomic, resumable training checkpoints.

A checkpoint is one ``torch.save`` file holding the model (expansion head, quantizer buffers, probes),
the optimisers and grad scaler, the step/epoch counters, every RNG state (python, numpy, torch CPU and
CUDA) and the resolved configuration. It is written atomically (:func:`equss.io.atomic_write`), so a
crash or Ctrl-C mid-write never corrupts the last good checkpoint.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from equss.io import atomic_write

__all__ = [
    "CheckpointMismatchError",
    "atomic_torch_save",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
]

FORMAT_VERSION = 2  # 2: config keys = constructor arguments, codebook state under quantizer.codebook

class CheckpointMismatchError(RuntimeError):
    """The checkpoint was written by a configuration that is structurally different from this one."""


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (:func:`equss.io.atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def capture_rng_state() -> dict[str, Any]:
    """Every RNG state a training step consumes, so a resumed run draws the same numbers."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_torch_save`, with clear errors for missing/foreign files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != "equss-checkpoint":
        raise RuntimeError(f"{path} is not an equss training checkpoint (no 'format: equss-checkpoint' entry)")
    if ckpt.get("version", 0) > FORMAT_VERSION:
        raise RuntimeError(f"{path} has checkpoint format {ckpt.get('version')}, newer than this equss ({FORMAT_VERSION})")
    return ckpt

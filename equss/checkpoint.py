"""Atomic, resumable training checkpoints.

A checkpoint is one ``torch.save`` file holding the model (expansion head, quantizer buffers, probes),
the optimisers and grad scaler, the step/epoch counters, every RNG state (python, numpy, torch CPU and
CUDA) and the resolved configuration. It is written to a temporary file in the same directory, flushed
and fsync'ed, then renamed over the target with :func:`os.replace` — atomic on POSIX — so a crash or
Ctrl-C mid-write never corrupts the last good checkpoint.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointMismatchError",
    "atomic_torch_save",
    "capture_rng_state",
    "check_compatible",
    "load_checkpoint",
    "restore_rng_state",
]

FORMAT_VERSION = 1

# Configuration keys that change the shape or meaning of saved tensors: a checkpoint written with other
# values cannot be resumed or evaluated with this configuration.
STRUCTURAL_KEYS = (
    "backbone.name",
    "data.dataset",
    "model.dim",
    "model.num_subspaces",
    "model.codebook_size",
    "model.vq_type",
    "model.normalize",
    "model.extra_clusters",
)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint was written by a configuration that is structurally different from this one."""


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (temp file in the same directory + fsync + ``os.replace``)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temp file behind
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


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


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_compatible(saved_cfg: dict, cfg: dict, path: str) -> None:
    """Raise :class:`CheckpointMismatchError` listing every structural key that differs."""
    diffs = [
        f"{key}: checkpoint {_get(saved_cfg, key)!r} vs now {_get(cfg, key)!r}"
        for key in STRUCTURAL_KEYS
        if _get(saved_cfg, key) != _get(cfg, key)
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by another configuration:\n  " + "\n  ".join(diffs)
        )


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

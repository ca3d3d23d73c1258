"""Atomic, verified, resumable training checkpoints.

A checkpoint is one ``torch.save`` file holding the model (expansion head, quantizer buffers, probes),
the optimisers and grad scaler, the step/epoch counters, every RNG state (python, numpy, torch CPU and
CUDA) and the resolved configuration. It is written atomically (:func:`equss.io.atomic_write`), so a
crash or Ctrl-C mid-write never corrupts the last good checkpoint, and it carries a SHA-256 of every
entry (of every tensor of the model, one for each other entry, the configuration included):
:func:`load_checkpoint` recomputes them and names the first entry that differs, so a flipped byte, a
NaN written into a codebook or an edited configuration is an error, never a silently different result.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import numpy as np
import torch

from equss.io import atomic_write

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "atomic_torch_save",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "verify_checksums",
]

# 2: config keys = constructor arguments, codebook state under quantizer.codebook, SHA-256 checksums.
FORMAT_VERSION = 2
_HEADER = ("format", "version", "checksums")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, foreign, corrupt or written by another configuration)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a configuration that is structurally different from this one."""


class CheckpointCorruptError(CheckpointError):
    """An entry of the checkpoint does not match the checksum it was written with."""


def _update(h, obj: Any) -> None:
    """Feed ``obj`` (nested dicts/lists/tuples of tensors, arrays, numbers, strings) to the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=str):
            h.update(f"K{k!s}".encode())
            _update(h, obj[k])
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _update(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def _digest(obj: Any) -> str:
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def _checksums(payload: dict[str, Any]) -> dict[str, str]:
    """One SHA-256 per entry; the model's state dict gets one per tensor so a mismatch names it."""
    out = {}
    for key, value in payload.items():
        if key == "model" and isinstance(value, dict):
            out.update({f"model/{name}": _digest(t) for name, t in value.items()})
        else:
            out[key] = _digest(value)
    return out


def atomic_torch_save(obj: dict[str, Any], path: str) -> None:
    """``torch.save`` a checkpoint to ``path`` atomically (:func:`equss.io.atomic_write`), with the
    SHA-256 checksums of its entries (``obj`` holds ``format``, ``version`` and the payload entries)."""
    payload = {k: v for k, v in obj.items() if k not in _HEADER}
    atomic_write(path, lambda fh: torch.save({**obj, "checksums": _checksums(payload)}, fh))


def verify_checksums(ckpt: dict[str, Any], path: str) -> None:
    """Raise :class:`CheckpointCorruptError` naming the first entry whose checksum differs."""
    stored = ckpt.get("checksums")
    if not isinstance(stored, dict):
        raise CheckpointCorruptError(f"checkpoint {path} has no checksums (format {ckpt.get('version')} needs them)")
    actual = _checksums({k: v for k, v in ckpt.items() if k not in _HEADER})
    for key in sorted(set(stored) | set(actual)):
        if stored.get(key) != actual.get(key):
            what = "is missing" if key not in actual else "was not in the file when it was written" if key not in stored \
                else "does not match the checksum it was written with"
            raise CheckpointCorruptError(
                f"checkpoint {path} is corrupt: entry {key!r} {what}; restore it from a backup or retrain"
            )


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
    """Load and verify a checkpoint written by :func:`atomic_torch_save`.

    Raises :class:`CheckpointError` (one line naming the file) for a missing, unreadable, foreign or
    newer-format file, and :class:`CheckpointCorruptError` when an entry does not match its checksum.
    Format-1 checkpoints (written before checksums existed) load unverified; their configuration and
    state dicts are migrated by :func:`equss.config.config_from_dict` and the quantizer's load hook.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file): {type(exc).__name__}: {first}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != "equss-checkpoint":
        raise CheckpointError(f"{path} is not an equss training checkpoint (no 'format: equss-checkpoint' entry)")
    version = ckpt.get("version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}, newer than this equss ({FORMAT_VERSION})")
    if version >= 2:
        verify_checksums(ckpt, path)
    return ckpt

"""Files: standard JSON from numpy/torch values, and atomic writes (a crash never leaves a torn file).

Every file the package writes that a later run reads (checkpoints, kNN tables, five-crop images,
generated scenes, results) goes through :func:`atomic_write`: the content is written to a temporary file
in the destination's directory, flushed and fsync'ed, and renamed over the destination with
:func:`os.replace` (atomic on POSIX); the rename is made durable by an fsync of the directory. Temporary
files are named ``.tmp-<name>-<random>`` so :func:`remove_stale_temporaries` can clean up after a
process that was killed mid-write.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = ["atomic_write", "jsonable", "remove_stale_temporaries", "save_json"]

TMP_PREFIX = ".tmp-"


def jsonable(obj: Any) -> Any:
    """numpy / torch / Path / NaN → plain JSON values. NaN and ±inf become ``null`` (JSON has no NaN)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()] if obj.ndim else jsonable(obj.item())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], suffix: str = "") -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary binary file that replaces ``path``.

    ``suffix`` is appended to the temporary name for writers that insist on an extension (numpy's
    ``savez`` adds ``.npz`` to names without it, PIL picks the format from it). Creates parent folders.
    On any exception (KeyboardInterrupt included) the temporary file is removed and the old ``path``
    is left untouched.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left in ``directory`` when a process was killed
    mid-write (all of them, or only those for the file ``name``); returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = f"{TMP_PREFIX}{name}-*" if name else f"{TMP_PREFIX}*"
    removed = []
    for p in directory.glob(pattern):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as standard JSON (numpy arrays → lists, NaN/inf → ``null``), atomically."""
    text = json.dumps(jsonable(obj), indent=2) + "\n"
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))

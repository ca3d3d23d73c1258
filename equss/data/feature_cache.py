"""On-disk cache of frozen-backbone features, keyed by everything that determines them.

The backbone is frozen and the EQUSS pipeline applies no augmentation before it, so the features of a
dataset split at a given resolution are a pure function of (backbone weights, images). They can be
computed once and memory-mapped afterwards, which takes the ViT (most of the compute of a training step
on small heads) and the JPEG decoding out of every epoch.

Layout of one cache entry, a directory ``<cache_dir>/<readable name>-<key>/``::

    features.npy   [N, C, h, w]  float16 or float32   (h, w = H/p, W/p)
    labels.npy     [N, H, W]     int16               (only when the items carry a "label")
    indices.npy    [N]           int64               (the items' "index")
    meta.json      the key fields, shapes, dtypes, file sizes and CRC-32s, written last

The key is a SHA-256 over: the cache format version, the backbone name and a SHA-256 of its weights
(the tensors themselves, so any checkpoint — or random init — is identified exactly) and configuration
(``feature_config()``, e.g. the position-embedding interpolation), the dataset name,
split, resolution and crop, the number of images, the dataset's fingerprint (:func:`source_fingerprint`:
every source file's path, size and modification time, so replacing one image under the same name
invalidates the entry), the storage dtype and any ``extra`` fields the caller adds.

Writes are atomic: everything goes into a hidden temporary directory that is renamed onto the final name
(``os.replace``) only after all files are complete and fsync'ed; an exception removes the temporary
directory. A reader accepts an entry only if its ``meta.json`` matches the expected key and the files
match their recorded shapes, sizes and (with ``verify="full"``, the default) CRC-32s; anything else is
logged and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CACHE_FORMAT_VERSION",
    "FeatureCache",
    "CachedFeatures",
    "CachedFeatureDataset",
    "backbone_fingerprint",
    "source_fingerprint",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2  # 2: the key covers every source file (source_sha256)
_STORAGE_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
_LABEL_DTYPE = np.int16  # class ids (COCO fine ids ≤ 182, 255 → −1 after mapping) fit with room to spare
_META = "meta.json"
_FEATURES = "features.npy"
_LABELS = "labels.npy"
_INDICES = "indices.npy"
_CRC_CHUNK = 64 << 20


def _sha256_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # Reinterpret as bytes (works for bf16, which numpy lacks).
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 (hex) of what determines the backbone's output: its tensors and its configuration.

    Hashes every parameter and buffer (persistent or not: names, dtypes, shapes, values), so the weights
    are identified exactly whatever file (or random seed) they came from; the module's class; and, when
    the module has one, its ``feature_config()`` (settings that change the output without changing any
    tensor, e.g. :class:`~equss.models.backbone.FrozenBackbone`'s position-embedding interpolation or the
    demo backbone's filter bank). Costs one pass over the weights (about 0.5 s for ViT-B on a CPU).
    """
    h = hashlib.sha256()
    tensors = dict(backbone.named_parameters())
    tensors.update(backbone.named_buffers())
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        _sha256_tensor(h, t)
    config = backbone.feature_config() if callable(getattr(backbone, "feature_config", None)) else None
    cls = f"{type(backbone).__module__}.{type(backbone).__qualname__}"
    h.update(json.dumps([cls, config], sort_keys=True, default=str).encode())
    return h.hexdigest()


def source_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of what determines every item of ``dataset``.

    Datasets of :mod:`equss.data` provide ``fingerprint()`` (their settings and every source file's
    path, size and modification time, or the generator's parameters). Any other dataset is hashed item
    by item (image and label of every item: exact, but it decodes the whole dataset once per check).
    """
    if callable(getattr(dataset, "fingerprint", None)):
        return str(dataset.fingerprint())
    h = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        for field in ("img", "label"):
            if field in item:
                _sha256_tensor(h, torch.as_tensor(item[field]))
    return h.hexdigest()


def _file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _safe(s: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(s))[:40]


@dataclass
class CachedFeatures:
    """A validated cache entry: read-only memory maps of its arrays.

    Attributes:
        path: the entry's directory.
        meta: its parsed ``meta.json``.
        features: ``[N, C, h, w]`` memory map (float16/float32).
        labels: ``[N, H, W]`` int16 memory map, or None when the items had no labels.
        indices: ``[N]`` int64 array of the items' ``"index"``.
    """

    path: Path
    meta: dict
    features: np.ndarray
    labels: np.ndarray | None
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[0])


class InvalidCache(Exception):
    """Internal: why an entry on disk cannot be used (logged, then the entry is recomputed)."""


def _open_entry(path: Path, expected_key: Mapping[str, Any], verify: str) -> CachedFeatures:
    """Validate ``path`` against ``expected_key`` and open its arrays; raise :class:`InvalidCache`."""
    meta_path = path / _META
    if not meta_path.is_file():
        raise InvalidCache(f"{meta_path} is missing (entry incomplete)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise InvalidCache(f"{meta_path} is unreadable: {err}") from err
    if not isinstance(meta, dict) or meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise InvalidCache(
            f"{meta_path}: format version {meta.get('format_version') if isinstance(meta, dict) else None} != {CACHE_FORMAT_VERSION}"
        )
    if meta.get("key") != dict(expected_key):
        got = meta.get("key") or {}
        diff = sorted(k for k in set(got) | set(expected_key) if got.get(k) != expected_key.get(k))
        raise InvalidCache(f"{meta_path}: key fields differ: {diff}")
    arrays: dict[str, np.ndarray | None] = {}
    try:
        for fname, info in meta["files"].items():
            fpath = path / fname
            if not fpath.is_file():
                raise InvalidCache(f"{fpath} is missing")
            size = fpath.stat().st_size
            if size != info["size"]:
                raise InvalidCache(f"{fpath} has {size} bytes, meta.json recorded {info['size']}")
            if verify == "full" and _file_crc32(fpath) != info["crc32"]:
                raise InvalidCache(f"{fpath}: CRC-32 mismatch (file corrupted)")
            arr = np.load(fpath, mmap_mode="r", allow_pickle=False)
            if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
                raise InvalidCache(
                    f"{fpath}: array {arr.dtype}{arr.shape} != recorded {info['dtype']}{info['shape']}"
                )
            arrays[fname] = arr
    except (KeyError, TypeError, ValueError, OSError) as err:
        raise InvalidCache(f"{path}: {type(err).__name__}: {err}") from err
    if _FEATURES not in arrays or _INDICES not in arrays:
        raise InvalidCache(f"{path}: meta.json lists no {_FEATURES}/{_INDICES}")
    n = meta["key"]["num_images"]
    if arrays[_FEATURES].shape[0] != n or arrays[_INDICES].shape[0] != n:
        raise InvalidCache(f"{path}: arrays hold {arrays[_FEATURES].shape[0]} rows, key says {n} images")
    return CachedFeatures(path, meta, arrays[_FEATURES], arrays.get(_LABELS), np.asarray(arrays[_INDICES]))


class FeatureCache:
    """Compute a frozen backbone's features for a whole dataset once and reload them from disk.

    Args:
        backbone: frozen module ``images [B, 3, H, W] -> [B, C, H/p, W/p]`` (e.g. from ``build_backbone``);
            its ``name`` attribute (else its class name) and :func:`backbone_fingerprint` enter the key.
        dataset: map-style dataset whose items are dicts with ``"img"`` ``[3, H, W]`` float (all the same
            size), optionally ``"label"`` ``[H, W]`` int, and ``"index"`` int. Must be deterministic (no
            random augmentation): its items are what the cache stands for.
        cache_dir: directory holding the cache entries (created if needed).
        dataset_name, split, res, crop: describe the dataset; all enter the key (e.g. ``"cocostuff27"``,
            ``"val"``, 320, ``"center"``).
        batch_size, num_workers: for the ``DataLoader`` that feeds the backbone.
        device: where the backbone runs; None = the device of its parameters. The backbone is moved there.
        storage_dtype: ``torch.float16`` (half the disk, ~1e-3 relative rounding) or ``torch.float32``.
        extra: further JSON-serialisable fields that affect the features (e.g. normalisation constants).
        verify: ``"full"`` re-checks the CRC-32 of every file on load (reads the files once, ~2 GB/s);
            ``"quick"`` checks only key, shapes and sizes (misses flipped bits).
        progress: show progress while computing (:class:`equss.progress.Progress`).

    Usage::

        cache = FeatureCache(backbone, val_set, "cache/", dataset_name="cocostuff27", split="val", res=320,
                             crop="center", device="cuda", storage_dtype=torch.float16)
        feats = cache.load_or_compute()          # CachedFeatures (memory-mapped)
        loader = DataLoader(cache.dataset(), batch_size=16)   # items {"feat", "label", "index"}
    """

    def __init__(
        self,
        backbone: nn.Module,
        dataset: Dataset,
        cache_dir: str | os.PathLike,
        *,
        dataset_name: str,
        split: str,
        res: int,
        crop: str,
        batch_size: int = 16,
        num_workers: int = 0,
        device: str | torch.device | None = None,
        storage_dtype: torch.dtype = torch.float32,
        extra: Mapping[str, Any] | None = None,
        verify: str = "full",
        progress: bool = True,
    ):
        if storage_dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be torch.float16 or torch.float32, got {storage_dtype}")
        if verify not in ("full", "quick"):
            raise ValueError(f"verify must be 'full' or 'quick', got {verify!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset is empty: nothing to cache")
        self.backbone = backbone
        self.source = dataset
        self.cache_dir = Path(cache_dir)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.device = torch.device(device) if device is not None else None
        self.storage_dtype = storage_dtype
        self.verify = verify
        self.progress = progress
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except TypeError as err:
            raise TypeError(f"extra must be JSON-serialisable, got {extra!r}") from err
        self.backbone_name = str(getattr(backbone, "name", type(backbone).__name__))
        fields = {
            "format_version": CACHE_FORMAT_VERSION,
            "backbone": self.backbone_name,
            "backbone_sha256": backbone_fingerprint(backbone),
            "dataset": str(dataset_name),
            "split": str(split),
            "res": int(res),
            "crop": str(crop),
            "num_images": n,
            "source_sha256": source_fingerprint(dataset),
            "storage_dtype": str(storage_dtype).removeprefix("torch."),
            "extra": extra,
        }
        # Round-trip through JSON so the fields compare equal to what meta.json gives back (tuples -> lists).
        self.key_fields: dict[str, Any] = json.loads(json.dumps(fields))
        digest = hashlib.sha256(json.dumps(self.key_fields, sort_keys=True).encode()).hexdigest()
        self.key = digest[:24]
        self.path = self.cache_dir / (
            f"{_safe(self.backbone_name)}-{_safe(dataset_name)}-{_safe(split)}-{_safe(crop)}-{int(res)}-{self.key}"
        )

    # ------------------------------------------------------------------ loading

    def load(self) -> CachedFeatures | None:
        """The valid entry for this key, or None (the reason is logged at INFO level)."""
        if not self.path.exists():
            logger.debug("feature cache: no entry at %s", self.path)
            return None
        try:
            return _open_entry(self.path, self.key_fields, self.verify)
        except InvalidCache as err:
            logger.warning("feature cache: recomputing %s: %s", self.path, err)
            return None

    def load_or_compute(self) -> CachedFeatures:
        """Load the entry for this key, computing (and storing) it first if absent or invalid."""
        entry = self.load()
        if entry is not None:
            logger.info("feature cache: loaded %s", self.path)
            return entry
        return self.compute()

    def dataset(
        self, return_img: bool = False, feat_dtype: torch.dtype = torch.float32
    ) -> CachedFeatureDataset:
        """A :class:`CachedFeatureDataset` over this entry (computed if needed)."""
        self.load_or_compute()
        return CachedFeatureDataset(
            self.path, source=self.source if return_img else None, feat_dtype=feat_dtype
        )

    # ------------------------------------------------------------------ computing

    def _stale_temporaries(self) -> list[Path]:
        return sorted(self.cache_dir.glob(f".tmp-{self.path.name}-*"))

    def compute(self) -> CachedFeatures:
        """Run the backbone over the whole dataset and store the entry atomically; return it opened."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        stale = self._stale_temporaries()
        if stale:
            logger.warning(
                "feature cache: leftover temporary directories from interrupted runs (delete them if no "
                "other process is writing): %s",
                [str(p) for p in stale],
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.path.name}-", dir=self.cache_dir))
        try:
            self._write(tmp)
            self._commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _open_entry(self.path, self.key_fields, "quick")

    def _commit(self, tmp: Path) -> None:
        if self.path.exists():
            # Only reached when load() rejected the entry (or it appeared meanwhile): replace it.
            if self.load() is not None:
                logger.info("feature cache: a valid entry appeared at %s meanwhile; keeping it", self.path)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.replace(tmp, self.path)
        except OSError:
            # Another process committed the same key between our check and the rename.
            if self.load() is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        dir_fd = os.open(self.cache_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def _write(self, tmp: Path) -> None:
        from equss.progress import Progress

        backbone = self.backbone
        device = self.device
        if device is None:
            # The demo backbone has buffers but no parameters.
            tensor = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
            device = tensor.device if tensor is not None else torch.device("cpu")
        backbone.to(device)
        was_training = backbone.training
        backbone.eval()

        n = len(self.source)
        loader = DataLoader(
            self.source,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            # Its own generator: iterating a loader draws a seed, which must not come from the global
            # RNG (a run would then depend on whether its caches existed).
            generator=torch.Generator().manual_seed(0),
        )
        np_dtype = _STORAGE_DTYPES[self.storage_dtype]
        feats = labels = None
        indices = np.empty(n, dtype=np.int64)
        has_labels = None
        img_shape = None
        row = 0
        t0 = time.perf_counter()
        bar = Progress(
            total=n,
            desc=f"features {self.backbone_name} {self.key_fields['dataset']}/{self.key_fields['split']}",
            unit="img",
            enabled=self.progress,
        )
        try:
            with torch.no_grad():
                for batch in loader:
                    if not isinstance(batch, Mapping) or "img" not in batch or "index" not in batch:
                        raise ValueError(
                            "dataset items must be dicts with 'img' [3, H, W], 'index' and optionally 'label'"
                        )
                    img = batch["img"]
                    if img_shape is None:
                        img_shape = tuple(img.shape[1:])
                        has_labels = "label" in batch
                    b = img.shape[0]
                    out = backbone(img.to(device, non_blocking=True))
                    if out.dim() != 4 or out.shape[0] != b:
                        raise ValueError(
                            f"backbone returned shape {tuple(out.shape)} for images {tuple(img.shape)}; expected [B, C, h, w]"
                        )
                    if feats is None:
                        feats = np.lib.format.open_memmap(
                            tmp / _FEATURES, mode="w+", dtype=np_dtype, shape=(n, *out.shape[1:])
                        )
                        if has_labels:
                            lshape = tuple(batch["label"].shape[1:])
                            labels = np.lib.format.open_memmap(
                                tmp / _LABELS, mode="w+", dtype=_LABEL_DTYPE, shape=(n, *lshape)
                            )
                    if tuple(out.shape[1:]) != feats.shape[1:]:
                        raise ValueError(
                            f"items {row}..{row + b - 1}: feature shape {tuple(out.shape[1:])} differs from the first "
                            f"items' {feats.shape[1:]} (images {tuple(img.shape)}): all images must have the same size"
                        )
                    feats[row : row + b] = out.to(self.storage_dtype).cpu().numpy()
                    if has_labels:
                        lab = batch["label"]
                        if tuple(lab.shape[1:]) != labels.shape[1:]:
                            raise ValueError(
                                f"items {row}..{row + b - 1}: label shape {tuple(lab.shape)} differs from {labels.shape[1:]}"
                            )
                        lo, hi = int(lab.min()), int(lab.max())
                        info = np.iinfo(_LABEL_DTYPE)
                        if lo < info.min or hi > info.max:
                            raise ValueError(
                                f"items {row}..{row + b - 1}: label values in [{lo}, {hi}] do not fit int16"
                            )
                        labels[row : row + b] = lab.numpy().astype(_LABEL_DTYPE)
                    indices[row : row + b] = torch.as_tensor(batch["index"]).numpy()
                    row += b
                    bar.update(b)
        finally:
            bar.close()
            backbone.train(was_training)
        if row != n:
            raise RuntimeError(f"the data loader yielded {row} items for a dataset of length {n}")
        # Close the memory maps before checksumming/renaming so every byte is on disk.
        feats.flush()
        del feats
        if labels is not None:
            labels.flush()
            del labels
        np.save(tmp / _INDICES, indices)
        files = {}
        for fname in (_FEATURES, _LABELS, _INDICES):
            fpath = tmp / fname
            if not fpath.exists():
                continue
            _fsync_file(fpath)
            arr = np.load(fpath, mmap_mode="r")
            files[fname] = {
                "shape": list(arr.shape),
                "dtype": str(arr.dtype),
                "size": fpath.stat().st_size,
                "crc32": _file_crc32(fpath),
            }
            del arr
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "key": self.key_fields,
            "files": files,
            "info": {
                "weights_id": str(getattr(self.backbone, "weights_id", "")),
                "image_shape": list(img_shape),
                "device": str(device),
                "torch": torch.__version__,
                "created_unix": time.time(),
                "compute_seconds": round(time.perf_counter() - t0, 3),
            },
        }
        meta_tmp = tmp / (_META + ".part")
        meta_tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        _fsync_file(meta_tmp)
        os.replace(meta_tmp, tmp / _META)
        logger.info(
            "feature cache: computed %d items in %.1f s -> %s", n, meta["info"]["compute_seconds"], self.path
        )


class CachedFeatureDataset(Dataset):
    """Items ``{"feat": [C, h, w], "label": [H, W] int64, "index": int}`` (+ ``"img"``) from a cache entry.

    The arrays are memory-mapped lazily in each process (DataLoader workers included), so the dataset
    pickles cheaply whatever the start method. ``"label"`` is present when the entry stored labels.

    Args:
        path: a cache entry directory (``FeatureCache.path``), already validated by the caller.
        source: the original dataset, needed only for ``"img"`` (its item ``i`` must be cache row ``i``).
        feat_dtype: dtype of the returned ``"feat"`` (float32 by default, whatever the storage dtype).
    """

    def __init__(
        self, path: str | os.PathLike, source: Dataset | None = None, feat_dtype: torch.dtype = torch.float32
    ):
        self.path = Path(path)
        meta = json.loads((self.path / _META).read_text())
        self.num_images = int(meta["key"]["num_images"])
        self.has_labels = _LABELS in meta["files"]
        if source is not None and len(source) != self.num_images:
            raise ValueError(
                f"source dataset has {len(source)} items but the cache at {self.path} holds {self.num_images}"
            )
        self.source = source
        self.feat_dtype = feat_dtype
        self._arrays: tuple[np.ndarray, np.ndarray | None, np.ndarray] | None = None

    def _open(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        if self._arrays is None:
            feats = np.load(self.path / _FEATURES, mmap_mode="r")
            labels = np.load(self.path / _LABELS, mmap_mode="r") if self.has_labels else None
            indices = np.load(self.path / _INDICES)
            self._arrays = (feats, labels, indices)
        return self._arrays

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None  # never pickle memory maps (that would copy the whole array)
        return state

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} cached items")
        feats, labels, indices = self._open()
        item: dict[str, Any] = {
            "feat": torch.from_numpy(np.array(feats[i])).to(self.feat_dtype),
            "index": int(indices[i]),
        }
        if labels is not None:
            item["label"] = torch.from_numpy(labels[i].astype(np.int64))
        if self.source is not None:
            item["img"] = self.source[i]["img"]
        return item

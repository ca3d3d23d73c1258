"""kNN positives (spec §6): image-level nearest neighbours under the frozen backbone.

Global feature of an image = spatial mean of the backbone's feature map, l2-normalised; neighbours =
cosine top-k (k = 30), the image itself first. Similarities are computed in ``chunk_size × chunk_size``
blocks with a running top-k merge, so memory stays ``O(chunk_size² + N·k)`` and the ``N × N`` matrix is
never formed (five-crop COCO has N ≈ 250k). faiss (``IndexFlatIP``, exact) is used instead when asked
for and installed.

Ties are broken towards the lower image index (stable sorts), so the chunked and unchunked results are
identical, and the image itself is forced into column 0 even when an exact duplicate exists.

Files: ``<root>/nns/nns_{model}_{dataset}_{split}_{crop}_{res}.npz`` with ``nns int64 [N, k]`` (STEGO's
key) plus metadata ``num_images``, ``model``, ``dataset``, ``split``, ``crop``, ``res`` checked on load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from equss.io import atomic_write

log = logging.getLogger(__name__)

DEFAULT_K = 30


def knn_path(root: str | Path, model: str, dataset: str, split: str, crop: str | None, res: int) -> Path:
    """``<root>/nns/nns_{model}_{dataset}_{split}_{crop}_{res}.npz`` (``crop=None`` is written "None",
    as in STEGO's file names)."""
    return Path(root) / "nns" / f"nns_{model}_{dataset}_{split}_{crop}_{res}.npz"


@torch.no_grad()
def global_features(
    featurizer: Callable[[Tensor], Tensor],
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Tensor:
    """``feats float32 [N, C]``: spatial mean of ``featurizer(images) [B, C, h, w]``, l2-normalised.

    ``dataset`` items are dicts with ``"img" [3, H, W]`` (the standard pipeline's output), or with
    ``"feat" [C, h, w]`` — the featurizer's output already computed (e.g. by the feature cache) — which is
    used as it is instead of running the featurizer again.
    """
    from equss.progress import Progress

    # Its own generator: iterating must not draw from the global RNG (a run would depend on whether the
    # kNN file existed).
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         generator=torch.Generator().manual_seed(0))
    out = []
    for batch in Progress(loader, desc="kNN features", unit="batch", enabled=progress):
        f = batch["feat"] if "feat" in batch else featurizer(batch["img"].to(device))
        if f.dim() != 4:
            raise ValueError(f"featurizer must return [B, C, h, w], got shape {tuple(f.shape)}")
        out.append(F.normalize(f.float().mean(dim=(2, 3)), dim=1).cpu())
    if not out:
        raise ValueError("global_features: the dataset is empty")
    return torch.cat(out)


def _topk_stable(sims: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along dim 1 with ties → lower index, for candidates whose ``idx`` increase along dim 1."""
    vals, order = torch.sort(sims, dim=1, descending=True, stable=True)
    return vals[:, :k], torch.gather(idx, 1, order[:, :k])


@torch.no_grad()
def knn_from_features(
    feats: Tensor,
    k: int = DEFAULT_K,
    chunk_size: int = 4096,
    backend: str = "torch",
    progress: bool = False,
) -> np.ndarray:
    """Cosine top-``k`` neighbours of every row of ``feats [N, C]`` (rows l2-normalised here).

    Returns ``nns int64 [N, k]``; ``nns[i, 0] == i``; ties → lower index. ``backend``: "torch"
    (blocked matmul, exact), "faiss" (``IndexFlatIP``, exact; needs faiss-cpu) or "auto".
    """
    if feats.dim() != 2:
        raise ValueError(f"knn_from_features: feats must be [N, C], got shape {tuple(feats.shape)}")
    N = feats.shape[0]
    if not 1 <= k <= N:
        raise ValueError(f"knn_from_features: need 1 <= k <= N, got k={k} for N={N} images")
    if chunk_size < 1:
        raise ValueError(f"knn_from_features: chunk_size must be >= 1, got {chunk_size}")
    feats = F.normalize(feats.float(), dim=1)
    if backend == "auto":
        try:
            import faiss  # noqa: F401

            backend = "faiss"
        except ImportError:
            backend = "torch"
    if backend == "faiss":
        return _knn_faiss(feats, k)
    if backend != "torch":
        raise ValueError(f"knn_from_features: backend must be 'torch', 'faiss' or 'auto', got {backend!r}")

    from equss.progress import Progress

    nns = torch.empty(N, k, dtype=torch.int64)
    for r0 in Progress(range(0, N, chunk_size), desc="kNN top-k", unit="chunk", enabled=progress):
        rows = feats[r0 : r0 + chunk_size]
        n = rows.shape[0]
        best_v = torch.empty(n, 0)
        best_i = torch.empty(n, 0, dtype=torch.int64)
        for c0 in range(0, N, chunk_size):
            sims = rows @ feats[c0 : c0 + chunk_size].T  # [n, c]
            c = sims.shape[1]
            # self gets +inf so it is first even against an exact duplicate
            r_ids = torch.arange(r0, r0 + n)
            inside = (r_ids >= c0) & (r_ids < c0 + c)
            sims[inside.nonzero()[:, 0], (r_ids[inside] - c0)] = float("inf")
            cand_i = torch.arange(c0, c0 + c).expand(n, c)
            # running candidates come first and have lower indices: a stable sort keeps ties → lower index
            best_v, best_i = _topk_stable(torch.cat([best_v, sims], 1), torch.cat([best_i, cand_i], 1), k)
        nns[r0 : r0 + n] = best_i
    return nns.numpy()


def _knn_faiss(feats: Tensor, k: int) -> np.ndarray:
    try:
        import faiss
    except ImportError as e:
        raise RuntimeError("knn backend 'faiss' needs faiss: pip install faiss-cpu (or equss[faiss])") from e
    x = np.ascontiguousarray(feats.numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, found = index.search(x, min(k + 1, x.shape[0]))  # one spare: self may be missing from the top k
    out = np.empty((x.shape[0], k), dtype=np.int64)
    for i, (s_row, f_row) in enumerate(zip(sims, found)):
        # same tie rule as the torch path (higher similarity, then lower index); self forced first
        order = np.lexsort((f_row, -s_row))
        rest = [int(j) for j in f_row[order] if j != i and j >= 0][: k - 1]
        out[i] = [i, *rest]
    return out


def compute_knn(
    featurizer: Callable[[Tensor], Tensor],
    dataset: torch.utils.data.Dataset,
    k: int = DEFAULT_K,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    chunk_size: int = 4096,
    backend: str = "torch",
    progress: bool = True,
) -> np.ndarray:
    """Global features of ``dataset`` under ``featurizer``, then :func:`knn_from_features`: ``nns [N, k]``."""
    feats = global_features(featurizer, dataset, batch_size, num_workers, device, progress)
    return knn_from_features(feats, k, chunk_size, backend, progress)


def save_knn(
    path: str | Path, nns: np.ndarray, *, model: str, dataset: str, split: str, crop: str | None, res: int,
    weights: str = "", source: str = "",
) -> Path:
    """Write ``nns [N, k]`` and its metadata to ``path`` (.npz, atomically), creating the folder.

    ``weights`` identifies the backbone weights (e.g. ``FrozenBackbone.weights_id``) where the model name
    alone does not (random vs. DINO weights); ``source`` is the dataset's fingerprint (its files)."""
    nns = np.asarray(nns)
    if nns.ndim != 2 or not np.issubdtype(nns.dtype, np.integer):
        raise ValueError(f"save_knn: nns must be an int array [N, k], got {nns.dtype} {nns.shape}")
    fields = dict(
        nns=nns.astype(np.int64), num_images=np.int64(nns.shape[0]), model=np.str_(model),
        dataset=np.str_(dataset), split=np.str_(split), crop=np.str_(str(crop)), res=np.int64(res),
        weights=np.str_(weights), source=np.str_(source),
    )
    return atomic_write(path, lambda fh: np.savez(fh, **fields))  # never a truncated file under the final name


def load_knn(
    path: str | Path,
    num_images: int | None = None,
    model: str | None = None,
    res: int | None = None,
    min_neighbors: int | None = None,
    weights: str | None = None,
    source: str | None = None,
) -> np.ndarray:
    """Read ``nns [N, k]`` and check it against what the caller expects.

    Raises ``FileNotFoundError`` (with the command that creates the file) if absent, ``ValueError`` if
    ``num_images``, ``model``, ``res``, ``weights`` differ from the stored metadata, or if ``k <= min_neighbors``
    (column 0 is the image itself), or if ``source`` (the dataset's fingerprint) differs or was not
    recorded. Files without metadata (STEGO's) are checked on their shape only unless ``source`` is given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"kNN file not found: {path}. Create it with: python scripts/precompute_knn.py --dataset <name> "
            f"--root <root> --backbone <model> --res <res> (see --help)"
        )
    with np.load(path) as f:
        nns = f["nns"]
        meta = {key: f[key].item() for key in ("num_images", "model", "res", "weights", "source") if key in f}
    if nns.ndim != 2:
        raise ValueError(f"{path}: nns must be [N, k], got shape {nns.shape}")
    problems = []
    if num_images is not None and nns.shape[0] != num_images:
        problems.append(f"it has {nns.shape[0]} rows but the dataset has {num_images} images")
    if model is not None and "model" in meta and meta["model"] != model:
        problems.append(f"it was computed with model {meta['model']!r}, not {model!r}")
    if res is not None and "res" in meta and int(meta["res"]) != int(res):
        problems.append(f"it was computed at res {meta['res']}, not {res}")
    if weights is not None and meta.get("weights") and meta["weights"] != weights:
        problems.append(f"it was computed with weights {meta['weights']!r}, not {weights!r}")
    if source is not None and meta.get("source") != source:
        problems.append("its images changed since it was computed (the dataset fingerprint differs)")
    if min_neighbors is not None and nns.shape[1] <= min_neighbors:
        problems.append(f"it has {nns.shape[1]} columns, need more than num_neighbors={min_neighbors}")
    if problems:
        raise ValueError(f"kNN file {path} does not match: " + "; ".join(problems) + ". Recompute it.")
    if nns.min(initial=0) < 0 or nns.max(initial=0) >= nns.shape[0]:
        raise ValueError(f"kNN file {path}: indices outside [0, {nns.shape[0]})")
    return nns.astype(np.int64)


def load_or_compute_knn(
    featurizer: Callable[[Tensor], Tensor],
    dataset: torch.utils.data.Dataset,
    dataset_id: str,
    cache_dir: str | Path,
    k: int = DEFAULT_K,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    chunk_size: int = 4096,
    backend: str = "torch",
    progress: bool = True,
    features: torch.utils.data.Dataset | None = None,
) -> tuple[np.ndarray, Path]:
    """The kNN table of ``dataset`` from ``<cache_dir>/nns/nns_{model}_{dataset_id}_{res}.npz``, computed
    and saved on first use. ``dataset_id`` is ``{dataset}_{split}_{crop}`` (or anything that identifies
    the image set); ``model`` is ``featurizer.name`` (else its class name), ``res`` is ``dataset.res``.

    ``features``: the same images' featurizer outputs as items with ``"feat"`` (e.g. the training feature
    cache); when given, the global features are computed from them instead of running ``featurizer``.

    The file records the dataset's fingerprint (:func:`equss.data.feature_cache.source_fingerprint`:
    every source file's path, size and modification time), the model, its weights and the resolution. A
    file that cannot be read (truncated, corrupt) or that disagrees with any of them, or holds fewer than
    ``k`` neighbours, is recomputed with a one-line warning naming it.

    Returns ``(nns int64 [N, k], path)``.
    """
    from equss.data.feature_cache import source_fingerprint

    model = str(getattr(featurizer, "name", type(featurizer).__name__))
    weights = str(getattr(featurizer, "weights_id", ""))
    res = int(getattr(dataset, "res", 0))
    source = source_fingerprint(dataset)
    path = Path(cache_dir) / "nns" / f"nns_{model}_{dataset_id}_{res}.npz"
    if path.is_file():
        try:
            nns = load_knn(path, num_images=len(dataset), model=model, res=res, weights=weights or None,
                           source=source)
            if nns.shape[1] < k:
                raise ValueError(f"it has {nns.shape[1]} neighbours, need k={k}")
            log.info("kNN: loaded %s", path)
            return nns[:, :k], path
        except Exception as exc:  # unreadable or stale: never used, always recomputed
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("kNN file %s cannot be used (%s): recomputing it", path, reason)
    if features is not None and len(features) != len(dataset):
        raise ValueError(f"features has {len(features)} items but the dataset has {len(dataset)} images")
    t0 = time.perf_counter()
    nns = compute_knn(featurizer, dataset if features is None else features, k=k, batch_size=batch_size, device=device, chunk_size=chunk_size,
                      backend=backend, progress=progress)
    log.info("kNN: %d neighbours of %d images in %.1f s -> %s", k, len(dataset), time.perf_counter() - t0, path)
    # dataset_id already encodes split and crop; they are stored separately only when known
    save_knn(path, nns, model=model, dataset=dataset_id, split=str(getattr(dataset, "split", "")),
             crop="", res=res, weights=weights, source=source)
    return nns, path

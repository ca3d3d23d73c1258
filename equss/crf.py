"""DenseCRF post-processing of per-pixel class probabilities (STEGO's ``dense_crf``, reused by EQUSS).

:func:`dense_crf` refines one image; :func:`batched_crf` runs a batch in worker processes
(:class:`CRFPool`, backed by pebble) with a per-image timeout, and falls back to the non-CRF
prediction for any image whose CRF fails, times out or returns non-finite values (those images are
counted in :attr:`CRFBatchResult.failed`). Needs ``pip install 'equss[crf]'`` (pydensecrf2, pebble).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from equss.normalization import unnormalize_image

__all__ = ["CRF_PARAMS", "CRFBatchResult", "CRFPool", "batched_crf", "crf_available", "dense_crf"]

log = logging.getLogger(__name__)


#: STEGO's / EQUSS's DenseCRF settings (``MAX_ITER``, ``POS_*``, ``Bi_*`` in STEGO's ``crf.py``).
CRF_PARAMS: dict[str, float] = {
    "iterations": 10,
    "gaussian_sxy": 1,
    "gaussian_compat": 3,
    "bilateral_sxy": 67,
    "bilateral_srgb": 3,
    "bilateral_compat": 4,
}

_CRF_INSTALL_HINT = "pip install 'equss[crf]'  (pydensecrf2 and pebble; pydensecrf2 imports as `pydensecrf`)"


def crf_available() -> tuple[bool, str]:
    """``(True, "")`` when pydensecrf and pebble import, else ``(False, reason)``."""
    try:
        import pebble  # noqa: F401
        import pydensecrf.densecrf  # noqa: F401
        import pydensecrf.utils  # noqa: F401
    except ImportError as exc:
        return False, f"{exc}; install with: {_CRF_INSTALL_HINT}"
    return True, ""


def _require_crf() -> None:
    ok, reason = crf_available()
    if not ok:
        raise RuntimeError(f"DenseCRF is not available: {reason}")


def _softmax_upsampled(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """``[C, h, w]`` logits → ``[C, H, W]`` float32 probabilities (bilinear, align_corners False)."""
    up = F.interpolate(logits.detach().float().unsqueeze(0), size=size, mode="bilinear", align_corners=False)
    return F.softmax(up[0], dim=0)


def _crf_from_probs(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int = 10,
    gaussian_sxy: float = 1,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 67,
    bilateral_srgb: float = 3,
    bilateral_compat: float = 4,
) -> np.ndarray:
    """The pydensecrf part of :func:`dense_crf` (numpy in, numpy out; what the workers run)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    C, H, W = probs.shape
    unary = np.ascontiguousarray(unary_from_softmax(probs))
    d = dcrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    d.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image), compat=bilateral_compat
    )
    q = d.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(C, H, W)


def _check_crf_inputs(image: np.ndarray, logits) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
        raise TypeError(f"image must be a uint8 numpy array [H, W, 3], got {desc}")
    if logits.ndim != 3:
        raise ValueError(f"logits must be [C, h, w], got shape {tuple(logits.shape)}")


def dense_crf(image: np.ndarray, logits: Tensor | np.ndarray, **params: float) -> np.ndarray:
    """Fully connected CRF on one image (STEGO's ``dense_crf``).

    Args:
        image: ``uint8 [H, W, 3]`` (see :func:`unnormalize_image`; the authors pass BGR).
        logits: ``[C, h, w]`` unnormalised scores or log-probabilities (softmax is applied, so
            log-softmax inputs give the same result); bilinearly upsampled to ``H, W``.
        **params: overrides of :data:`CRF_PARAMS` (10 iterations; Gaussian sxy 1, compat 3; bilateral
            sxy 67, srgb 3, compat 4).

    Returns:
        ``float32 [C, H, W]`` marginals (each pixel sums to 1).

    Raises:
        RuntimeError: pydensecrf is not installed (``pip install 'equss[crf]'``).
    """
    _require_crf()
    logits = torch.as_tensor(logits)
    _check_crf_inputs(image, logits)
    unknown = set(params) - set(CRF_PARAMS)
    if unknown:
        raise ValueError(f"unknown CRF parameters {sorted(unknown)}; known: {sorted(CRF_PARAMS)}")
    probs = _softmax_upsampled(logits, image.shape[:2]).numpy()
    return _crf_from_probs(image, probs, **{**CRF_PARAMS, **params})


@dataclass
class CRFBatchResult:
    """Output of :func:`batched_crf`.

    Attributes:
        probs: ``[B, C, H, W]`` float32 CPU tensor; CRF marginals, or for a failed image the plain
            softmax of its upsampled logits (the non-CRF prediction).
        failed: ``{image index in the batch: reason}`` for the images that fell back.
    """

    probs: Tensor
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return len(self.failed)


class CRFPool:
    """Worker processes for :func:`batched_crf`, to reuse across batches (a context manager).

    Backed by ``pebble.ProcessPool``: a task that runs longer than its timeout is cancelled **and its
    worker process is killed and replaced**, so a hung image (pydensecrf is C++ and cannot be
    interrupted from Python) costs one timeout, never the run. The timeout counts from when a worker
    starts the image, not from submission, so queueing behind other images does not count.

    Args:
        processes: number of workers (default: ``os.cpu_count()``).
        context: multiprocessing start method (``"fork"``, ``"spawn"``, ``"forkserver"``) or ``None`` for
            the platform default. Workers only run numpy + pydensecrf, so ``fork`` is safe even after
            CUDA is initialised in the parent.
    """

    def __init__(self, processes: int | None = None, context: str | None = None) -> None:
        _require_crf()
        import multiprocessing

        import pebble

        self.processes = processes or os.cpu_count() or 1
        ctx = multiprocessing.get_context(context) if context else None
        kwargs = {"context": ctx} if ctx is not None else {}
        self._pool = pebble.ProcessPool(max_workers=self.processes, **kwargs)

    def schedule(self, fn: Callable, args: tuple, timeout: float | None):
        return self._pool.schedule(fn, args=args, timeout=timeout)

    def close(self) -> None:
        self._pool.stop()
        self._pool.join()

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batched_crf(
    images: Tensor | np.ndarray | Sequence[np.ndarray],
    logits: Tensor,
    *,
    pool: CRFPool | None = None,
    processes: int | None = None,
    timeout: float | None = 60.0,
    channel_order: str = "bgr",
    crf_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    **params: float,
) -> CRFBatchResult:
    """DenseCRF on a batch, one image per worker process, with a per-image timeout and fallback.

    Args:
        images: ImageNet-normalised float ``[B, 3, H, W]`` tensor (un-normalised with
            :func:`unnormalize_image` in ``channel_order``), or ``uint8 [B, H, W, 3]`` array / list of
            ``[H, W, 3]`` arrays used as they are.
        logits: ``[B, C, h, w]`` scores or log-probabilities (e.g. :meth:`ClusterProbe.log_probs`).
        pool: a :class:`CRFPool` to reuse; if ``None`` a temporary one with ``processes`` workers is made.
        timeout: seconds per image (from when its worker starts it); ``None`` = no limit.
        channel_order: for float ``images`` (see :func:`unnormalize_image`).
        crf_fn: per-image function ``(image uint8 [H,W,3], probs float32 [C,H,W]) -> [C,H,W]`` run in the
            workers; default pydensecrf with :data:`CRF_PARAMS` updated by ``params``. Must be picklable.

    Returns:
        :class:`CRFBatchResult`; images whose CRF timed out, raised or returned non-finite values, and
        images with non-finite logits, keep their non-CRF probabilities (uniform where the logits were not
        finite) and are listed in ``failed`` (a warning is logged).
    """
    if isinstance(images, Tensor):
        images = unnormalize_image(images, channel_order=channel_order)
        if images.ndim == 3:
            images = images[None]
    images = [np.asarray(im) for im in images]
    if logits.dim() != 4 or logits.shape[0] != len(images):
        raise ValueError(
            f"logits must be [B, C, h, w] with B = {len(images)}, got shape {tuple(logits.shape)}"
        )
    for im in images:
        _check_crf_inputs(im, logits[0])
    unknown = set(params) - set(CRF_PARAMS)
    if unknown:
        raise ValueError(f"unknown CRF parameters {sorted(unknown)}; known: {sorted(CRF_PARAMS)}")
    if crf_fn is None:
        _require_crf()
        crf_fn = partial(_crf_from_probs, **{**CRF_PARAMS, **params})

    # Upsample + softmax once in the parent (on the logits' device; fast on a GPU); the workers get
    # numpy only, so they never touch torch/CUDA.
    fallback = [_softmax_upsampled(logits[i], im.shape[:2]).cpu() for i, im in enumerate(images)]
    failed: dict[int, str] = {}
    for i, probs in enumerate(fallback):
        if not torch.isfinite(probs).all():
            # Non-finite logits: the CRF would propagate NaN; the fallback is uniform where they are bad.
            failed[i] = "non-finite logits"
            fallback[i] = torch.where(torch.isfinite(probs), probs, 1.0 / probs.shape[0])
    own_pool = pool is None
    pool = CRFPool(processes) if own_pool else pool
    out: list[Tensor] = []
    try:
        futures = [None if i in failed else pool.schedule(crf_fn, (im, fallback[i].numpy()), timeout)
                   for i, im in enumerate(images)]
        for i, fut in enumerate(futures):
            if fut is None:
                out.append(fallback[i])
                continue
            try:
                q = np.asarray(fut.result(), dtype=np.float32)
                if q.shape != tuple(fallback[i].shape):
                    raise ValueError(f"CRF returned shape {q.shape}, expected {tuple(fallback[i].shape)}")
                if not np.isfinite(q).all():
                    raise ValueError("CRF returned non-finite probabilities")
                out.append(torch.from_numpy(q))
            except (TimeoutError, FutureTimeoutError):  # distinct classes before Python 3.11
                failed[i] = f"timed out after {timeout} s"
                out.append(fallback[i])
            except Exception as exc:  # a crashed worker or a pydensecrf error: fall back, keep going
                failed[i] = f"{type(exc).__name__}: {exc}"
                out.append(fallback[i])
    finally:
        if own_pool:
            pool.close()
    if failed:
        log.warning(
            "DenseCRF fell back to the non-CRF prediction for %d/%d images: %s",
            len(failed),
            len(images),
            failed,
        )
    return CRFBatchResult(probs=torch.stack(out), failed=failed)

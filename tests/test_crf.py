"""DenseCRF, its worker pool with timeouts and fallbacks, and the image un-normalisation it uses."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from equss.crf import batched_crf, crf_available, dense_crf
from equss.normalization import IMAGENET_MEAN, IMAGENET_STD, unnormalize_image

CRF_OK, CRF_REASON = crf_available()
needs_crf = pytest.mark.skipif(not CRF_OK, reason=f"DenseCRF not installed: {CRF_REASON}")


def test_unnormalize_image_round_trip_and_bgr():
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 5, 7), generator=g, dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    norm = (rgb.float() / 255.0 - mean) / std
    out = unnormalize_image(norm, channel_order="rgb")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, rgb.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(unnormalize_image(norm), out[..., ::-1])  # default BGR, as the authors
    assert unnormalize_image(norm[None]).shape == (1, 5, 7, 3)


# ---------------------------------------------------------------------------------------------- CRF


def _two_region_case(seed=0, H=24, W=32, noise=1.2):
    """Left half red, right half blue; logits favour the right class by 1 with N(0, noise²) noise."""
    img = np.zeros((H, W, 3), np.uint8)
    img[:, : W // 2] = (200, 40, 40)
    img[:, W // 2 :] = (40, 40, 200)
    truth = torch.zeros(H, W, dtype=torch.long)
    truth[:, W // 2 :] = 1
    g = torch.Generator().manual_seed(seed)
    logits = F.one_hot(truth, 2).permute(2, 0, 1).float() + noise * torch.randn(2, H, W, generator=g)
    return img, logits, truth


def test_crf_missing_raises_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # makes `import pydensecrf...` fail
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    img, logits, _ = _two_region_case()
    with pytest.raises(RuntimeError, match=r"pip install 'equss\[crf\]'"):
        dense_crf(img, logits)


@needs_crf
def test_dense_crf_follows_colour_regions():
    img, logits, truth = _two_region_case()
    raw = (logits.argmax(0) == truth).float().mean().item()
    q = dense_crf(img, logits)
    assert q.shape == (2, 24, 32) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    crf = (torch.from_numpy(q).argmax(0) == truth).float().mean().item()
    assert raw < 0.85  # the noise really corrupts the raw argmax
    assert crf > 0.98 and crf > raw


@needs_crf
def test_dense_crf_upsamples_logits_and_accepts_log_probs():
    img, logits, truth = _two_region_case()
    small = F.interpolate(logits[None], size=(12, 16), mode="bilinear", align_corners=False)[0]
    q = dense_crf(img, small)
    assert q.shape == (2, 24, 32)
    # softmax(log_softmax(x)) = softmax(x): log-probabilities give the same CRF result
    np.testing.assert_allclose(dense_crf(img, F.log_softmax(small, 0)), q, atol=1e-5)


@needs_crf
def test_batched_crf_matches_per_image():
    cases = [_two_region_case(seed=s) for s in range(3)]
    imgs = np.stack([c[0] for c in cases])
    logits = torch.stack([c[1] for c in cases])
    res = batched_crf(imgs, logits, processes=2, timeout=30)
    assert res.n_failed == 0 and res.probs.shape == (3, 2, 24, 32)
    for i, (img, lg, _) in enumerate(cases):
        np.testing.assert_allclose(res.probs[i].numpy(), dense_crf(img, lg), atol=1e-6)


def _hangs_on_white_corner(image, probs):
    """Stand-in CRF: never returns for an image whose corner is white, raises on a grey corner,
    otherwise returns the classes swapped (so its output is distinguishable from the fallback)."""
    if image[0, 0, 0] == 255:
        time.sleep(600)
    if image[0, 0, 0] == 128:
        raise FloatingPointError("bad image")
    return probs[::-1].copy()


@pytest.mark.slow
@needs_crf
def test_batched_crf_timeout_and_failure_fall_back():
    cases = [_two_region_case(seed=s) for s in range(4)]
    imgs = np.stack([c[0] for c in cases])
    imgs[1, 0, 0] = 255  # hangs
    imgs[2, 0, 0] = 128  # raises
    logits = torch.stack([c[1] for c in cases])
    start = time.monotonic()
    res = batched_crf(imgs, logits, processes=2, timeout=1.0, crf_fn=_hangs_on_white_corner)
    assert time.monotonic() - start < 60  # the hung worker was abandoned, not waited for (600 s)
    assert sorted(res.failed) == [1, 2]
    assert "timed out" in res.failed[1] and "bad image" in res.failed[2]
    fallback = F.softmax(logits, dim=1)
    for i in (1, 2):
        torch.testing.assert_close(res.probs[i], fallback[i])
    for i in (0, 3):
        torch.testing.assert_close(res.probs[i], fallback[i].flip(0))


@needs_crf
def test_batched_crf_from_normalised_tensor():
    img, logits, truth = _two_region_case()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    norm = ((torch.from_numpy(img).permute(2, 0, 1).float() / 255.0 - mean) / std)[None]
    res = batched_crf(norm, logits[None], processes=1, timeout=30)
    np.testing.assert_allclose(res.probs[0].numpy(), dense_crf(img[:, :, ::-1].copy(), logits), atol=1e-6)

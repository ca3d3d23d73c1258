"""Metrics against hand-computed confusion matrices, the probes, DenseCRF and its worker pool."""

from __future__ import annotations

import csv
import json
import math
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from equss.evaluate import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClusterProbe,
    ConfusionMatrix,
    LinearProbe,
    batched_crf,
    crf_available,
    dense_crf,
    unnormalize_image,
    upsample_to,
)

CRF_OK, CRF_REASON = crf_available()
needs_crf = pytest.mark.skipif(not CRF_OK, reason=f"DenseCRF not installed: {CRF_REASON}")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    spin-waiting made the probe-training test ~40× slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def t(values):
    return torch.tensor(values, dtype=torch.long)


# ------------------------------------------------------------------------------------------ metrics


def test_identity_metrics_hand_computed():
    # valid (pred, label): (0,0) (0,0) (1,0) (1,1) (1,1) (2,2) (0,2) (2,2); then label -1 and 3 ignored.
    # confusion rows = pred, cols = label: [[2,0,1],[1,2,0],[0,0,2]]
    # TP = 2,2,2; FP = row - TP = 1,1,0; FN = col - TP = 1,0,1
    # IoU = 2/4, 2/3, 2/3; mIoU = (50 + 66.67 + 66.67)/3 = 61.11; acc = 6/8; per-class acc = 2/3, 1, 2/3
    pred = t([0, 0, 1, 1, 1, 2, 0, 2, 2, 1])
    label = t([0, 0, 0, 1, 1, 2, 2, 2, -1, 3])
    cm = ConfusionMatrix(3)
    cm.update(pred, label)
    assert cm.matrix.tolist() == [[2, 0, 1], [1, 2, 0], [0, 0, 2]]
    for mapping in ("identity", "hungarian"):  # the identity is also the best matching here
        r = cm.compute(mapping)
        assert r.n_pixels == 8
        assert r.accuracy == pytest.approx(75.0)
        np.testing.assert_allclose(r.iou, [50.0, 200.0 / 3, 200.0 / 3])
        assert r.miou == pytest.approx(550.0 / 9)
        np.testing.assert_allclose(r.class_accuracy, [200.0 / 3, 100.0, 200.0 / 3])
        assert r.assignment.tolist() == [0, 1, 2]
        np.testing.assert_allclose(r.class_frequency, [3 / 8, 2 / 8, 3 / 8])


def test_hungarian_recovers_permuted_clusters():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 16, 16), generator=g)
    label[0, :2] = -1  # ignored pixels stay ignored
    perm = t([2, 0, 1])  # class c is predicted as cluster perm[c]
    pred = perm[label.clamp_min(0)]
    cm = ConfusionMatrix(3)
    cm.update(pred[:1], label[:1])  # accumulation over batches
    cm.update(pred[1:], label[1:])
    r = cm.compute("hungarian")
    assert r.accuracy == pytest.approx(100.0)
    assert r.miou == pytest.approx(100.0)
    assert r.assignment.tolist() == [1, 2, 0]  # cluster 0 ← class 1, cluster 1 ← class 2, cluster 2 ← class 0
    assert torch.equal(r.map_predictions(pred)[label >= 0], label[label >= 0])
    assert r.n_pixels == 2 * 256 - 32
    assert cm.compute("identity").accuracy == pytest.approx(0.0)  # no cluster id equals its class


def test_empty_class_is_excluded_from_miou_but_false_positive_class_counts():
    # n_classes 4. label [0,0,1,1], pred [0,2,1,1], identity:
    # TP = 1,2,0,0; FP = 0,0,1,0; FN = 1,0,0,0 → IoU 50, 100, 0 (predicted only), NaN (absent from both)
    cm = ConfusionMatrix(4)
    cm.update(t([0, 2, 1, 1]), t([0, 0, 1, 1]))
    r = cm.compute("identity")
    np.testing.assert_allclose(r.iou[:3], [50.0, 100.0, 0.0])
    assert math.isnan(r.iou[3])
    assert r.miou == pytest.approx(50.0)
    assert r.accuracy == pytest.approx(75.0)
    np.testing.assert_allclose(r.class_accuracy[:2], [50.0, 100.0])
    assert np.isnan(r.class_accuracy[2:]).all()


def test_more_clusters_than_classes_unmatched_pixels_are_errors():
    # counts [cluster, class]: c0 [3,0], c1 [0,3], c2 [1,1]; best matching 0→0, 1→1 (6 px), c2 unmatched.
    # acc = 6/8; TP = 3,3; FP = 0,0; FN = 1,1 → IoU = 3/4 each.
    cm = ConfusionMatrix(2, n_clusters=3)
    cm.update(t([0, 0, 0, 2, 1, 1, 1, 2]), t([0, 0, 0, 0, 1, 1, 1, 1]))
    r = cm.compute("hungarian")
    assert r.assignment.tolist() == [0, 1, -1]
    assert r.accuracy == pytest.approx(75.0)
    np.testing.assert_allclose(r.iou, [75.0, 75.0])
    assert r.map_predictions(t([2, 0, 1])).tolist() == [-1, 0, 1]


def test_fewer_clusters_than_classes():
    # counts [cluster, class]: c0 [2,1,0], c1 [0,0,3]; matching c0→0, c1→2; class 1 gets no cluster.
    cm = ConfusionMatrix(3, n_clusters=2)
    cm.update(t([0, 0, 0, 1, 1, 1]), t([0, 0, 1, 2, 2, 2]))
    r = cm.compute("hungarian")
    assert r.assignment.tolist() == [0, 2]
    assert r.accuracy == pytest.approx(500.0 / 6)
    np.testing.assert_allclose(r.iou, [200.0 / 3, 0.0, 100.0])  # c0: TP 2, FP 1; class 1: FN 1


def test_bad_predictions_and_shapes_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(t([0, 3]), t([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        cm.update(t([0, 1]), t([0]))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(2), t([0, 1]))
    with pytest.raises(ValueError, match="mapping"):
        cm.compute("greedy")


def test_reports_json_csv_table(tmp_path):
    cm = ConfusionMatrix(3, class_names=["sky", "road", "tree"])
    cm.update(t([0, 2, 1, 1]), t([0, 0, 1, 1]))
    r = cm.compute("identity")  # tree: TP 0, FP 1 → IoU 0; sky 50; road 100
    data = json.loads(r.save_json(tmp_path / "m.json").read_text())
    assert data["accuracy"] == pytest.approx(75.0) and data["miou"] == pytest.approx(50.0)
    assert data["class_accuracy"][2] is None  # NaN is written as null, not as invalid JSON
    rows = list(csv.DictReader(r.save_csv(tmp_path / "m.csv").open()))
    assert [row["name"] for row in rows] == ["sky", "road", "tree"]
    assert float(rows[0]["iou"]) == pytest.approx(50.0) and rows[2]["accuracy"] == ""
    table = r.table()
    assert "road" in table and "100.00" in table and "mIoU 50.00" in table


# ------------------------------------------------------------------------------------------- probes


def _separable_features(g, n_classes=3, D=8, noise=0.3):
    label = torch.randint(0, n_classes, (4, 8, 8), generator=g)
    centers = torch.eye(D)[:n_classes] * 3.0
    x = centers[label].permute(0, 3, 1, 2) + noise * torch.randn(4, D, 8, 8, generator=g)
    return x, label


def test_cluster_probe_learns_separable_clusters():
    # Hard assignment gives no gradient to a centroid that wins no pixel, so an init where one centroid
    # is nearest to two classes never recovers (about half of random 3-centroid inits here; STEGO's
    # probe behaves the same, see the next test). Seed 2 is an init where each centroid wins a class.
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    x, label = _separable_features(g)
    probe = ClusterProbe(8, 3)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    first = probe.loss(x).item()
    for _ in range(150):
        opt.zero_grad()
        loss = probe.loss(x)
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3
    assert loss.item() < -0.9  # mean best cosine close to 1
    cm = ConfusionMatrix(3)
    cm.update(probe.predict(x), label)
    assert cm.compute("hungarian").accuracy > 99.0
    lp = probe.log_probs(x, alpha=2.0)
    sim = probe(x)
    torch.testing.assert_close(lp, F.log_softmax(2.0 * sim, dim=1))
    assert torch.equal(lp.argmax(1), probe.predict(x))


def test_cluster_probe_gradient_reaches_only_winning_centroids():
    probe = ClusterProbe(2, 3)
    with torch.no_grad():
        probe.clusters.copy_(torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t().reshape(1, 2, 1, 2)  # pixels along e1 and e2
    loss = probe.loss(x)
    loss.backward()
    # hand-computed: best cosines are cos(e1, (1, .1)) = cos(e2, (.1, 1)) = 1/sqrt(1.01)
    assert loss.item() == pytest.approx(-1.0 / math.sqrt(1.01), rel=1e-6)
    grad = probe.clusters.grad
    assert grad[:2].abs().sum() > 0 and torch.equal(grad[2], torch.zeros(2))
    assert probe.predict(x).tolist() == [[[0, 1]]]


def test_cluster_probe_extra_clusters_and_shapes():
    probe = ClusterProbe(4, 3, extra_clusters=2)
    assert probe(torch.randn(2, 4, 3, 5)).shape == (2, 5, 3, 5)
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        probe(torch.randn(2, 5, 3, 3))


def test_linear_probe_ignores_invalid_labels():
    torch.manual_seed(0)
    probe = LinearProbe(6, 3)
    x = torch.randn(2, 6, 4, 4)
    label = torch.randint(0, 3, (2, 4, 4))
    label[0, 0] = -1
    label[1, 2, :2] = 255  # >= n_classes: ignored as well
    valid = (label >= 0) & (label < 3)
    logits = probe(x).permute(0, 2, 3, 1)[valid]
    expected = F.cross_entropy(logits, label[valid])
    torch.testing.assert_close(probe.loss(x, label), expected)
    # the features of ignored pixels do not matter
    x2 = x.clone()
    x2[0, :, 0] = 100.0
    torch.testing.assert_close(probe.loss(x2, label), expected)
    # nothing valid: zero loss, still differentiable (cross_entropy alone would give NaN)
    empty = probe.loss(x, torch.full((2, 4, 4), -1))
    empty.backward()
    assert empty.item() == 0.0 and probe.conv.weight.grad is not None


def test_linear_probe_upsamples_logits_to_label_size():
    torch.manual_seed(0)
    probe = LinearProbe(5, 2)
    x = torch.randn(1, 5, 4, 4)
    label = torch.randint(0, 2, (1, 8, 8))
    logits = F.interpolate(probe(x), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(probe.loss(x, label), F.cross_entropy(logits, label))


def test_upsample_to():
    x = torch.full((1, 3, 4, 4), 2.0)
    y = upsample_to(x, (8, 12))
    assert y.shape == (1, 3, 8, 12) and torch.allclose(y, torch.full_like(y, 2.0))
    ramp = torch.arange(2.0).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    # align_corners=False: output pixel centres at (j + 0.5)/2 − 0.5 of the input grid → 0, 0.25, 0.75, 1
    assert upsample_to(ramp, (2, 4))[0, 0, 0].tolist() == [0.0, 0.25, 0.75, 1.0]


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

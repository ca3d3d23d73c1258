"""SyntheticScenes (the embedded default dataset) and the DemoBackbone featurizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from equss.data import SyntheticScenes, build_dataset
from equss.data.synthetic import MAX_CLASSES, generate_scene, synthetic_class_names
from equss.models.demo_backbone import DemoBackbone


def test_same_seed_same_scene_and_streams_differ():
    a_img, a_lab = generate_scene(seed=3, split="train", index=7, res=48)
    b_img, b_lab = generate_scene(seed=3, split="train", index=7, res=48)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_img.dtype == np.uint8 and a_img.shape == (48, 48, 3)
    assert a_lab.dtype == np.int64 and a_lab.shape == (48, 48)
    for other in (dict(seed=4, split="train", index=7), dict(seed=3, split="val", index=7),
                  dict(seed=3, split="train", index=8)):
        img, _ = generate_scene(res=48, **other)
        assert not np.array_equal(img, a_img), other


def test_dataset_items_deterministic_in_any_order():
    ds = SyntheticScenes("val", num_images=6, res=32, num_classes=4, seed=1)
    forward = [ds[i] for i in range(6)]
    backward = [SyntheticScenes("val", 6, 32, 4, 1)[i] for i in reversed(range(6))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["img"], y["img"]) and torch.equal(x["label"], y["label"])
    item = forward[2]
    assert item["img"].shape == (3, 32, 32) and item["img"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["index"] == 2


def test_labels_and_class_coverage():
    n_cls = 6
    ds = SyntheticScenes("train", num_images=40, res=48, num_classes=n_cls, seed=0)
    assert ds.num_classes == n_cls and ds.class_names == synthetic_class_names(n_cls)
    seen = np.zeros(n_cls, dtype=np.int64)
    for i in range(len(ds)):
        _, lab = ds.scene(i)
        present = np.unique(lab)
        assert present.min() >= 0 and present.max() < n_cls  # every pixel labelled, no ignore
        assert 1 <= len(present) <= 3  # 2-3 classes drawn per scene (a tiny cell can vanish at low res)
        seen += np.bincount(lab.ravel(), minlength=n_cls)
    assert (seen > 0).all()
    # classes are drawn uniformly: none takes more than twice its fair share of the pixels
    assert seen.max() / seen.sum() < 2.0 / n_cls


def test_class_names_and_argument_checks():
    assert len(synthetic_class_names(MAX_CLASSES)) == MAX_CLASSES
    assert len(set(synthetic_class_names(MAX_CLASSES))) == MAX_CLASSES
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticScenes("train", 4, 32, num_classes=MAX_CLASSES + 1)
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes("holdout", 4, 32)
    with pytest.raises(IndexError):
        SyntheticScenes("train", 4, 32).scene(4)


def test_cache_dir_round_trip(tmp_path):
    cached = SyntheticScenes("train", 3, 32, 5, seed=2, cache_dir=tmp_path)
    plain = SyntheticScenes("train", 3, 32, 5, seed=2)
    for i in range(3):
        first = cached[i]  # generates and writes
        assert torch.equal(first["label"], plain[i]["label"])
    files = sorted(p.name for p in tmp_path.rglob("*.npz"))
    assert files == ["0.npz", "1.npz", "2.npz"]
    again = SyntheticScenes("train", 3, 32, 5, seed=2, cache_dir=tmp_path)
    for i in range(3):
        assert torch.equal(again[i]["img"], plain[i]["img"]) and torch.equal(again[i]["label"], plain[i]["label"])


def test_build_dataset_synthetic():
    train = build_dataset("synthetic", None, "train", 32, num_train=7, num_val=3, num_classes=3, seed=5)
    val = build_dataset("synthetic", None, "val", 32, num_train=7, num_val=3, num_classes=3, seed=5)
    assert len(train) == 7 and len(val) == 3 and train.num_classes == 3
    assert len(build_dataset("synthetic", None, "train", 32)) == 600


def _baselines_script():
    """``scripts/synthetic_baselines.py`` as a module (scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "synthetic_baselines.py"
    spec = importlib.util.spec_from_file_location("synthetic_baselines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chance_levels_and_hungarian_by_hand():
    sb = _baselines_script()
    labels = torch.tensor([0, 0, 0, 1, 2, 2, -1, -1])
    ch = sb.chance_levels(labels, 4)
    assert ch == {"majority": 0.5, "uniform": 0.25}
    # clusters are a relabelling of the classes: perfect after matching; ignore pixels do not count
    assert sb.hungarian_accuracy(torch.tensor([2, 2, 2, 0, 1, 1, 0, 3]), labels, 4) == 1.0
    # one pixel of class 0 in cluster 1 (matched to class 2): 5 of 6 correct
    assert sb.hungarian_accuracy(torch.tensor([2, 2, 1, 0, 1, 1, 3, 3]), labels, 4) == pytest.approx(5 / 6)


# ------------------------------------------------------------------------------------- demo backbone


def test_demo_backbone_contract_and_determinism():
    m = DemoBackbone()
    assert m.patch_size == 8 and list(m.parameters()) == []
    x = torch.randn(2, 3, 48, 64)
    f = m(x)
    assert f.shape == (2, m.embed_dim, 6, 8) and f.dtype == torch.float32
    assert torch.isfinite(f).all()
    assert torch.equal(f, DemoBackbone()(x))
    # per image: a batch of one gives the same features as inside a batch
    torch.testing.assert_close(m(x[1:]), f[1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        m(torch.randn(1, 3, 50, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.randn(3, 48, 48))


def test_demo_backbone_sees_orientation_not_colour():
    """A grating and the same grating rotated by 90° differ in the oriented-energy channels; the same
    grating in two different colour pairs does not (only the colour channels change)."""
    m = DemoBackbone()
    yy, xx = np.mgrid[0:64, 0:64]
    t = 0.5 + 0.5 * np.sin(2 * np.pi * xx / 6.0)

    def paint(t, c0, c1):
        img = np.asarray(c0)[None, None] + t[..., None] * (np.asarray(c1) - np.asarray(c0))[None, None]
        x = torch.from_numpy(img.transpose(2, 0, 1)).float()[None]
        return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    tex = slice(0, 2 * m.num_filters)
    a = m(paint(t, (0.1, 0.1, 0.8), (0.9, 0.8, 0.1)))[0, tex, 2:6, 2:6].mean((1, 2))
    b = m(paint(t, (0.8, 0.2, 0.2), (0.2, 0.7, 0.7)))[0, tex, 2:6, 2:6].mean((1, 2))  # other colours
    c = m(paint(t.T, (0.1, 0.1, 0.8), (0.9, 0.8, 0.1)))[0, tex, 2:6, 2:6].mean((1, 2))  # rotated
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b, dim=0) > 0.99
    assert cos(a - a.mean(), c - c.mean(), dim=0) < 0.5


# --------------------------------------------------------------------------------------- baselines


@pytest.mark.slow
def test_kmeans_baselines_colour_near_chance_demo_above():
    """Small version of ``python scripts/synthetic_baselines.py`` (40 val images): colour alone is near
    chance, the frozen demo features are clearly above it (the full-size numbers are in equss/data/synthetic.py)."""
    r = _baselines_script().kmeans_baselines(num_val=40, res=112, num_classes=5, seed=0, linear_probe=False)
    chance = max(r["chance_majority"], r["chance_uniform"])
    assert chance < 0.3
    assert r["kmeans_pixel_mean"] < chance + 0.08, r
    assert r["kmeans_demo"] > chance + 0.2, r
    assert r["kmeans_demo"] < 0.85, r  # not trivially solved by the frozen features

"""Analyses (entropy, codeword usage, entropy vs accuracy, inter-class distance), k-means, palettes, grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from equss.analysis import (
    DISTANCE_METRICS,
    CodeHistogram,
    class_distance,
    class_entropy,
    codebook_usage,
    codeword_frequency,
    entropy_vs_accuracy,
    fit_product_kmeans,
    joint_code_entropy,
    quantize,
    run_analyses,
)
from equss.evaluate import ConfusionMatrix
from equss.palettes import colorize, generic_palette, get_palette, pascal_colormap
from equss.visualize import save_prediction_grid

pytestmark = pytest.mark.usefixtures("one_thread")
def _hist(codes, labels, n_classes, K):
    h = CodeHistogram(n_classes, codes.shape[1], K)
    h.update(torch.as_tensor(codes), torch.as_tensor(labels))
    return h


# ------------------------------------------------------------------------------------------ entropy


def test_entropy_constant_uniform_and_hand_computed():
    M, K = 3, 4
    # class 0: constant code in every subspace → 0 bits.
    # class 1: every subspace uniform over the K = 4 values (a different order per subspace)
    #          → log2(4) = 2 bits per subspace, 3 · 2 = 6 bits in total.
    # class 2: subspace 0 takes values 0, 0, 1, 2 (p = 1/2, 1/4, 1/4) → 1/2·1 + 2·1/4·2 = 1.5 bits;
    #          subspaces 1 and 2 constant → 1.5 bits in total.
    # label −1 rows: unlabelled, must not change any class.
    c0 = np.full((8, M), 2)
    c1 = np.stack([np.arange(8) % 4, (np.arange(8) + 1) % 4, (3 * np.arange(8)) % 4], axis=1)
    c2 = np.array([[0, 1, 1], [0, 1, 1], [1, 1, 1], [2, 1, 1]])
    cu = np.full((5, M), 3)
    codes = np.concatenate([c0, c1, c2, cu])
    labels = np.array([0] * 8 + [1] * 8 + [2] * 4 + [-1] * 5)
    h = _hist(codes, labels, 4, K)  # class 3 has no pixel
    total, per_sub = class_entropy(h.class_counts)
    np.testing.assert_allclose(total[:3], [0.0, 6.0, 1.5], atol=1e-12)
    np.testing.assert_allclose(per_sub[1], [2.0, 2.0, 2.0])
    assert math.isnan(total[3])
    assert h.class_pixels.tolist() == [8, 8, 4, 0]
    # unlabelled pixels are counted in codeword usage: subspace 0 codes over all 25 pixels:
    # code 0: 2 (c1) + 2 (c2) = 4; 1: 2 + 1 = 3; 2: 8 + 2 + 1 = 11; 3: 2 + 5 = 7
    freq = codeword_frequency(h.all_counts)
    np.testing.assert_allclose(freq[0], np.array([4, 3, 11, 7]) / 25)
    np.testing.assert_allclose(freq.sum(1), 1.0)


def test_entropy_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (300, 4), generator=g, dtype=torch.int32)
    labels = torch.randint(-1, 5, (300,), generator=g)
    one = _hist(codes, labels, 5, 16)
    streamed = CodeHistogram(5, 4, 16)
    for s in range(0, 300, 70):
        streamed.update(codes[s : s + 70], labels[s : s + 70])
    assert torch.equal(one.counts, streamed.counts)
    assert int(one.counts.sum()) == 300 * 4


def test_joint_entropy_of_dependent_subspaces():
    # class 0: both subspaces carry the same code, uniform over 4 values (16 pixels):
    # marginal sum = 2 + 2 = 4 bits, joint entropy of the pair = log2(4) = 2 bits (subadditivity).
    # class 1: constant → joint 0 bits.
    a = torch.arange(16) % 4
    codes = torch.cat([torch.stack([a, a], 1), torch.full((6, 2), 1)]).to(torch.int32)
    labels = torch.tensor([0] * 16 + [1] * 6)
    j = joint_code_entropy(codes, labels, 3, min_samples_per_tuple=4)
    np.testing.assert_allclose(j["entropy"][:2], [2.0, 0.0], atol=1e-12)
    assert j["distinct_tuples"][:2].tolist() == [4, 1]
    assert j["reliable"][:2].tolist() == [True, True]  # 16 >= 4·4 and 6 >= 4·1
    assert math.isnan(j["entropy"][2]) and not j["reliable"][2]
    # Miller–Madow: + (S − 1)/(2 n ln 2) = 3/(32 ln 2)
    assert j["entropy_miller_madow"][0] == pytest.approx(2.0 + 3 / (32 * math.log(2)))
    total, _ = class_entropy(_hist(codes, labels, 3, 4).class_counts)
    assert total[0] == pytest.approx(4.0)


def test_codebook_usage():
    freq = np.array([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]])
    u = codebook_usage(freq)
    np.testing.assert_allclose(u["used_fraction"], [0.25, 1.0, 0.5])
    np.testing.assert_allclose(u["perplexity"], [1.0, 4.0, 2.0])  # 2^H: 2^0, 2^2, 2^1


def test_entropy_vs_accuracy_rank_correlation():
    out = entropy_vs_accuracy(
        np.array([1.0, 2.0, 3.0, np.nan]), np.array([90.0, 50.0, 10.0, 5.0]), np.array([0.5, 0.3, 0.2, 0.0])
    )
    assert out["spearman_rho"] == pytest.approx(-1.0)  # NaN class skipped; perfectly decreasing
    with pytest.raises(ValueError, match="same shape"):
        entropy_vs_accuracy(np.zeros(3), np.zeros(4))


# ------------------------------------------------------------------------------------------ distance


def _three_pure_classes():
    # M = 1, K = 3: class c always uses codeword c; codewords (0,0), (3,0), (0,4):
    # centroid distances d01 = 3, d02 = 4, d12 = 5 → normalised by 5: 0.6, 0.8, 1.
    codes = torch.tensor([[0], [0], [1], [1], [1], [2]], dtype=torch.int32)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    cb = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]])
    return _hist(codes, labels, 4, 3), cb  # class 3 empty


def test_class_distance_hand_computed():
    h, cb = _three_pure_classes()
    expected = np.array([[0, 0.6, 0.8], [0.6, 0, 1.0], [0.8, 1.0, 0]])
    d = class_distance(h.class_counts, cb, "centroid")
    np.testing.assert_allclose(d[:3, :3], expected, atol=1e-12)
    # no within-class spread: the pairwise mean distance equals the centroid distance
    np.testing.assert_allclose(class_distance(h.class_counts, cb, "pairwise")[:3, :3], expected, atol=1e-12)
    off = 1.0 - np.eye(3)
    np.testing.assert_allclose(class_distance(h.class_counts, metric="hamming")[:3, :3], off)
    np.testing.assert_allclose(class_distance(h.class_counts, metric="js")[:3, :3], off, atol=1e-12)
    for metric in DISTANCE_METRICS:  # the empty class is undefined
        d = class_distance(h.class_counts, cb, metric)
        assert np.isnan(d[3]).all() and np.isnan(d[:, 3]).all()


def test_pairwise_distance_includes_within_class_spread():
    # class 0 uses codewords (0,0) and (2,0) half the time each: E‖q − q'‖² = P(differ)·4 = 0.5·4 = 2;
    # class 1 always (0,0): E‖q0 − q1‖² = 0.5·0 + 0.5·4 = 2. Unnormalised: sqrt(2) for both.
    codes = torch.tensor([[0], [1], [0], [1], [0]], dtype=torch.int32)
    labels = torch.tensor([0, 0, 0, 0, 1])
    codes[2, 0], codes[3, 0] = 0, 1
    cb = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    h = _hist(codes, labels, 2, 2)
    d = class_distance(h.class_counts, cb, "pairwise", normalize=False)
    np.testing.assert_allclose(d, [[math.sqrt(2), math.sqrt(2)], [math.sqrt(2), 0.0]])
    # centroid: ‖(1,0) − (0,0)‖ = 1
    np.testing.assert_allclose(
        class_distance(h.class_counts, cb, "centroid", normalize=False), [[0.0, 1.0], [1.0, 0.0]]
    )


def test_class_distance_symmetric_zero_diagonal_random():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8, (400, 4), generator=g, dtype=torch.int32)
    labels = torch.randint(0, 5, (400,), generator=g)
    h = _hist(codes, labels, 5, 8)
    cb = torch.randn(4, 8, 3, generator=g)
    for metric in ("centroid", "hamming", "js"):
        d = class_distance(h.class_counts, cb, metric)
        assert np.isfinite(d).all()
        np.testing.assert_allclose(d, d.T, atol=1e-12)
        np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-12)
        assert d.min() >= 0.0 and d.max() <= 1.0 + 1e-12
    with pytest.raises(ValueError, match="codebooks"):
        class_distance(h.class_counts, None, "centroid")


# ------------------------------------------------------------------------------------------- k-means


def test_product_kmeans_recovers_clusters():
    # 2 subspaces, 4 well separated centres each (±5 on two axes); points = centre + N(0, 0.1²).
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0], [-5.0, 0, 0], [0, 5.0, 0], [0, -5.0, 0]])
    truth = torch.randint(0, 4, (200, 2), generator=g)
    x = centres[truth] + 0.1 * torch.randn(200, 2, 3, generator=g)
    codebooks, codes = fit_product_kmeans(x.reshape(200, 6), M=2, K=4, normalize=False, seed=0)
    assert codebooks.shape == (2, 4, 3) and codes.shape == (200, 2)
    for m in range(2):  # each true cluster is exactly one code (up to relabelling)
        cm = ConfusionMatrix(4)
        cm.update(codes[:, m].long(), truth[:, m])
        assert cm.compute("hungarian").accuracy == pytest.approx(100.0)
    assert torch.equal(quantize(x.reshape(200, 6), codebooks, normalize=False), codes)
    with pytest.raises(ValueError, match="at least K"):
        fit_product_kmeans(x[:3].reshape(3, 6), M=2, K=4)


# --------------------------------------------------------------------------------------- run_analyses


@pytest.mark.slow
def test_run_analyses_writes_finite_results(tmp_path):
    g = torch.Generator().manual_seed(0)
    M, K, C = 4, 8, 3
    labels = torch.randint(-1, C, (600,), generator=g)
    codes = (labels.clamp_min(0)[:, None] * 2 + torch.randint(0, 3, (600, M), generator=g)).to(torch.int32)
    h = _hist(codes, labels, C, K)
    # the reference has another M (as backbone features quantized with fewer subspaces would)
    ref = _hist(torch.randint(0, K, (600, 2), generator=g, dtype=torch.int32), labels, C, K)
    files = run_analyses(
        tmp_path,
        h,
        ["sky", "road", "tree"],
        codebooks=torch.randn(M, K, 2, generator=g),
        class_accuracy=np.array([90.0, 60.0, 30.0]),
        reference={"STEGO": ref},
        joint=joint_code_entropy(codes, labels, C),
        distance_metrics=["centroid", "js"],
    )
    expected = {
        f"{stem}.{ext}"
        for stem in (
            "class_entropy",
            "codeword_usage",
            "entropy_vs_accuracy",
            "class_distance_centroid",
            "class_distance_js",
        )
        for ext in ("json", "png")
    }
    assert set(files) == expected
    assert {p.name for p in tmp_path.iterdir()} == expected
    ent = json.loads((tmp_path / "class_entropy.json").read_text())
    for model, m in (("EQUSS", M), ("STEGO", 2)):
        assert ent["codebooks"][model] == {"M": m, "K": K}
        assert all(v is not None and 0 <= v <= m * math.log2(K) for v in ent["entropy"][model])
        assert all(0 <= v <= 1 for v in ent["entropy_normalized"][model])
    # per class, EQUSS codes span 3 of the 8 values per subspace (≤ log2 3 of 3 bits); the uniform random
    # reference codes span all 8 → a larger share of the maximum entropy
    assert max(ent["entropy_normalized"]["EQUSS"]) <= math.log2(3) / 3 + 1e-9
    assert min(ent["entropy_normalized"]["STEGO"]) > 0.8
    usage = json.loads((tmp_path / "codeword_usage.json").read_text())
    assert np.isfinite(np.array(usage["frequency"], dtype=float)).all()
    dist = np.array(json.loads((tmp_path / "class_distance_centroid.json").read_text())["distance"], float)
    np.testing.assert_allclose(dist, dist.T)
    for name in expected:
        if name.endswith(".png"):
            with Image.open(tmp_path / name) as im:
                assert im.format == "PNG" and im.size[0] > 100


# --------------------------------------------------------------------------------- palettes and grid


def test_palettes():
    assert pascal_colormap(4).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    coco = get_palette("COCO-Stuff-27")
    assert coco.shape == (27, 3) and coco[0].tolist() == [128, 0, 0]  # PASCAL entry 1, never black
    city = get_palette("cityscapes", 27)
    assert city[0].tolist() == [128, 64, 128] and city[16].tolist() == [70, 130, 180]  # road, sky
    assert city[26].tolist() == [119, 11, 32]  # bicycle
    assert get_palette("potsdam3").tolist() == [[255, 255, 255], [0, 0, 255], [0, 255, 0]]
    for n in (5, 300):
        pal = get_palette("synthetic", n)
        assert pal.shape == (n, 3) and not (pal == 0).all(1).any()
        assert len({tuple(c) for c in pal.tolist()}) == n
    assert np.array_equal(generic_palette(5), get_palette(None, 5))
    with pytest.raises(ValueError, match="27 classes"):
        get_palette("cityscapes", 19)
    lab = np.array([[0, 1], [-1, 7]])
    rgb = colorize(lab, get_palette("potsdam"))
    assert rgb.tolist() == [[[255, 255, 255], [0, 0, 255]], [[0, 0, 0], [0, 0, 0]]]


def test_prediction_grid_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    N, H, W, scale = 2, 20, 20, 2
    pal = get_palette("potsdam3")
    images = torch.randint(0, 256, (N, H, W, 3), generator=g, dtype=torch.uint8).numpy()
    labels = torch.randint(0, 3, (N, H, W), generator=g)
    labels[1, :5] = -1
    cluster = (labels + 1) % 3
    linear = labels.clone()
    path = save_prediction_grid(
        tmp_path / "grid.png",
        images,
        labels,
        cluster,
        linear,
        palette=pal,
        class_names=["roads and cars", "buildings and clutter", "vegetation"],
        scale=scale,
    )
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"))
    # 4 panels of 40 px + 5 gaps of 4 + legend 200 = 380 wide; header 28 + 2·(40 + 4) = 116 high
    # (the legend needs 28 + 4·18 + 4 = 104 < 116)
    assert px.shape == (116, 380, 3)

    def panel(col, row, y, x):  # pixel (y, x) of the original image in panel col of row
        return px[28 + row * 44 + y * scale, 4 + col * 44 + x * scale]

    assert panel(0, 0, 3, 7).tolist() == images[0, 3, 7].tolist()
    assert panel(1, 0, 10, 10).tolist() == pal[labels[0, 10, 10]].tolist()
    assert panel(2, 1, 15, 2).tolist() == pal[cluster[1, 15, 2]].tolist()
    assert panel(1, 1, 2, 2).tolist() == [0, 0, 0]  # ignored label drawn black
    assert panel(3, 1, 19, 19).tolist() == pal[linear[1, 19, 19]].tolist()


def test_spread_to_subspaces_keeps_every_channel_and_distances():
    from equss.analysis import spread_to_subspaces

    x = torch.randn(7, 66)
    y = spread_to_subspaces(x, 16)  # 66 = 2·5 + 14·4 channels, each group padded to 5
    assert y.shape == (7, 80)
    groups = y.reshape(7, 16, 5)
    assert (groups[:, :2] != 0).all() and (groups[:, 2:, 4] == 0).all() and (groups[:, 2:, :4] != 0).all()
    assert torch.equal(groups[:, :, :4].reshape(7, -1)[:, :8].reshape(7, 2, 4), x[:, :10].reshape(7, 2, 5)[..., :4])
    assert torch.allclose(torch.cdist(y, y), torch.cdist(x, x), atol=1e-5)
    assert spread_to_subspaces(x, 6) is x
    with pytest.raises(ValueError, match="needs C >= M"):
        spread_to_subspaces(torch.randn(2, 3), 4)


@pytest.mark.slow
def test_figures_are_labelled(tmp_path):
    """Every axis and colour bar of the analysis figures has a label, every figure a title."""
    from matplotlib.figure import Figure

    from equss import analysis as A

    saved = []
    orig = A._save

    def keep(fig, path):
        saved.append(fig)
        return orig(fig, path)

    A._save = keep
    try:
        hist = A.CodeHistogram(3, 4, 8)
        g = torch.Generator().manual_seed(0)
        hist.update(torch.randint(0, 8, (300, 4), generator=g), torch.randint(0, 3, (300,), generator=g))
        A.run_analyses(tmp_path, hist, ["a", "b", "c"], codebooks=torch.randn(4, 8, 2),
                       class_accuracy=np.array([50.0, 60.0, 70.0]))
    finally:
        A._save = orig
    assert len(saved) >= 7
    for fig in saved:
        assert isinstance(fig, Figure)
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert any(ax.get_title() for ax in axes)
        for ax in axes:
            assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
        for cb in bars:
            assert cb.get_ylabel(), axes[0].get_title()

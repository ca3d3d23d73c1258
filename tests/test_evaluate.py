"""Metrics against hand-computed confusion matrices (Hungarian and identity mapping, reports)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from equss.evaluate import ConfusionMatrix

pytestmark = pytest.mark.usefixtures("one_thread")
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

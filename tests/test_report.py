"""The numbers printed beside a run's own: chance, k-means on the backbone, the linear upper reference."""

import math

import pytest
import torch

from equss.report import kmeans_baseline, linear_baseline, majority_accuracy


def _blocks(n, n_classes, C=12, h=4, patch=4, noise=0.3, seed=0, informative=True, one_class_per_item=False):
    """Items with features [C, h, h] and labels [h·patch, h·patch]: each patch belongs to one class; the
    feature of a patch is its class's random direction (plus noise), or pure noise when not informative.
    ``one_class_per_item``: every patch of an item has the same class, so that upsampled logits have no
    class border to blur."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_classes, C, generator=torch.Generator().manual_seed(99))
    items = []
    for i in range(n):
        if one_class_per_item:
            cls = torch.randint(0, n_classes, (1, 1), generator=g).expand(h, h)
        else:
            cls = torch.randint(0, n_classes, (h, h), generator=g)
        feat = noise * torch.randn(C, h, h, generator=g)
        if informative:
            feat = feat + dirs[cls].permute(2, 0, 1)
        label = cls.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        items.append({"feat": feat, "label": label, "index": i})
    return items


def _loader(items, bs=4):
    return [{k: torch.stack([it[k] for it in items[j:j + bs]]) for k in ("feat", "label")}
            for j in range(0, len(items), bs)]


def _featurize(batch):
    return batch["feat"]


@pytest.mark.parametrize("informative", [True, False])
def test_linear_baseline_reads_the_features(informative):
    # Training patches with mixed classes; validation items of one class each, where the bilinear
    # upsampling of the patch logits to pixels cannot blur a class border.
    train = _blocks(40, 3, informative=informative)
    val = _blocks(12, 3, seed=1, informative=informative, one_class_per_item=True)
    res = linear_baseline(train, _loader(val), _featurize, 3, "cpu", seed=0)["linear"]
    if informative:
        assert res.accuracy > 99.0 and res.miou > 98.0
    else:  # nothing to read: near the majority share, far from perfect
        assert res.accuracy < 60.0


def test_linear_baseline_needs_labels():
    train = [{k: v for k, v in it.items() if k != "label"} for it in _blocks(4, 2)]
    with pytest.raises(ValueError, match="eval.linear_baseline=false"):
        linear_baseline(train, _loader(_blocks(2, 2)), _featurize, 2, "cpu", seed=0)


def test_kmeans_baseline_finds_separated_clusters():
    train, val = _blocks(40, 3, noise=0.05), _blocks(10, 3, seed=1, noise=0.05)
    res = kmeans_baseline(train, _loader(val), _featurize, 3, "cpu", seed=0)["cluster"]
    assert res.accuracy > 99.0


def test_majority_accuracy():
    assert majority_accuracy([torch.tensor([0, 0, 1, -1]), torch.tensor([[2, 0]])]) == pytest.approx(60.0)
    assert math.isnan(majority_accuracy([torch.tensor([-1, -1])]))

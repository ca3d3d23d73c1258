"""Feature cache: computes once, reloads without the backbone, keys, atomic writes, corruption.

A tiny strided-conv "backbone" that counts its calls stands in for the ViT: the cache only relies on
the ``[B, 3, H, W] -> [B, C, H/p, W/p]`` contract, ``name`` and the weights.
"""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from equss.data import feature_cache as fc
from equss.data.feature_cache import CachedFeatureDataset, FeatureCache, backbone_fingerprint

N_IMAGES, RES, C, P, BATCH = 7, 16, 5, 8, 3  # 7 images in batches of 3: a ragged last batch


class CountingBackbone(nn.Module):
    """Strided conv ``[B, 3, H, W] -> [B, C, H/8, W/8]`` counting forward calls; optionally fails."""

    def __init__(self, name: str = "toy", seed: int = 0, fail_on_call: int | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.name, self.patch_size, self.embed_dim = name, P, C
        self.proj = nn.Conv2d(3, C, P, P)
        self.requires_grad_(False)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def forward(self, x):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash in the middle of the feature pass")
        return self.proj(x)


class ToySet(Dataset):
    """Deterministic images and labels; ``with_labels=False`` drops the "label" field."""

    def __init__(self, n: int = N_IMAGES, res: int = RES, seed: int = 0, with_labels: bool = True):
        self.n, self.res, self.seed, self.with_labels = n, res, seed, with_labels

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 * self.seed + i)
        item = {"img": torch.randn(3, self.res, self.res, generator=g), "index": i}
        if self.with_labels:
            item["label"] = torch.randint(-1, 27, (self.res, self.res), generator=g)
        return item


def _cache(backbone, dataset, tmp_path, **kw):
    args = dict(dataset_name="toyset", split="val", res=RES, crop="center", batch_size=BATCH, progress=False)
    args.update(kw)
    return FeatureCache(backbone, dataset, tmp_path / "cache", **args)


def _expected(backbone: CountingBackbone, dataset: ToySet) -> torch.Tensor:
    """Features computed directly, image by image, with the conv weights (does not touch the counter)."""
    with torch.no_grad():
        return torch.cat([backbone.proj(dataset[i]["img"][None]) for i in range(len(dataset))])


def _entries(tmp_path):
    root = tmp_path / "cache"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_computes_once_then_loads_without_backbone(tmp_path):
    bb, ds = CountingBackbone(), ToySet()
    entry = _cache(bb, ds, tmp_path).load_or_compute()
    assert bb.calls == 3  # ceil(7 / 3) batches
    assert entry.features.shape == (N_IMAGES, C, RES // P, RES // P)
    np.testing.assert_array_equal(entry.features, _expected(bb, ds).numpy())
    np.testing.assert_array_equal(
        entry.labels, torch.stack([ds[i]["label"] for i in range(N_IMAGES)]).numpy()
    )
    np.testing.assert_array_equal(entry.indices, np.arange(N_IMAGES))

    # A new cache object (as in a new run) with the same inputs loads without calling the backbone.
    entry2 = _cache(bb, ds, tmp_path).load_or_compute()
    assert bb.calls == 3
    assert entry2.path == entry.path
    np.testing.assert_array_equal(entry2.features, entry.features)
    assert len(_entries(tmp_path)) == 1  # no temporaries left behind


def test_fp16_storage(tmp_path):
    bb, ds = CountingBackbone(), ToySet()
    entry = _cache(bb, ds, tmp_path, storage_dtype=torch.float16).load_or_compute()
    assert entry.features.dtype == np.float16
    np.testing.assert_array_equal(entry.features, _expected(bb, ds).half().numpy())
    item = CachedFeatureDataset(entry.path)[4]
    assert item["feat"].dtype == torch.float32
    torch.testing.assert_close(item["feat"], _expected(bb, ds)[4].half().float(), rtol=0, atol=0)


def test_dataset_wrapper_items_loader_and_pickle(tmp_path):
    bb, ds = CountingBackbone(), ToySet()
    cache = _cache(bb, ds, tmp_path)
    wrapped = cache.dataset(return_img=True)
    assert len(wrapped) == N_IMAGES
    expected = _expected(bb, ds)
    for i in (0, 3, N_IMAGES - 1):
        item = wrapped[i]
        assert set(item) == {"feat", "label", "index", "img"}
        torch.testing.assert_close(item["feat"], expected[i], rtol=0, atol=0)
        assert item["label"].dtype == torch.int64
        assert torch.equal(item["label"], ds[i]["label"])
        assert torch.equal(item["img"], ds[i]["img"])
        assert item["index"] == i
    with pytest.raises(IndexError):
        wrapped[N_IMAGES]
    # Pickling (DataLoader workers under spawn) must not copy the memory-mapped arrays.
    plain = CachedFeatureDataset(cache.path)
    plain[0]  # opens the memory maps
    assert len(pickle.dumps(plain)) < 2000
    batch = next(iter(DataLoader(plain, batch_size=4)))
    assert batch["feat"].shape == (4, C, 2, 2) and batch["label"].shape == (4, RES, RES)
    torch.testing.assert_close(batch["feat"], expected[:4], rtol=0, atol=0)
    assert bb.calls == 3


def test_items_without_labels(tmp_path):
    bb, ds = CountingBackbone(), ToySet(with_labels=False)
    entry = _cache(bb, ds, tmp_path).load_or_compute()
    assert entry.labels is None
    assert set(CachedFeatureDataset(entry.path)[2]) == {"feat", "index"}


def test_key_changes_with_everything_that_affects_features(tmp_path):
    ds = ToySet()
    base = _cache(CountingBackbone(), ds, tmp_path)
    same = _cache(CountingBackbone(), ToySet(), tmp_path)
    assert same.key == base.key and same.path == base.path

    perturbed = CountingBackbone()
    with torch.no_grad():
        perturbed.proj.bias[0] += 1e-6
    variants = {
        "res": _cache(CountingBackbone(), ds, tmp_path, res=RES + 8),
        "split": _cache(CountingBackbone(), ds, tmp_path, split="train"),
        "crop": _cache(CountingBackbone(), ds, tmp_path, crop="five"),
        "dataset_name": _cache(CountingBackbone(), ds, tmp_path, dataset_name="other"),
        "backbone_name": _cache(CountingBackbone(name="toy2"), ds, tmp_path),
        "backbone_weights": _cache(perturbed, ds, tmp_path),
        "num_images": _cache(CountingBackbone(), ToySet(n=N_IMAGES + 1), tmp_path),
        "image_content": _cache(CountingBackbone(), ToySet(seed=1), tmp_path),
        "storage_dtype": _cache(CountingBackbone(), ds, tmp_path, storage_dtype=torch.float16),
        "extra": _cache(CountingBackbone(), ds, tmp_path, extra={"mean": [0.5, 0.5, 0.5]}),
    }
    keys = {name: c.key for name, c in variants.items()}
    assert base.key not in keys.values(), keys
    assert len(set(keys.values())) == len(keys), keys


def test_extra_fields_with_tuples_still_hit_the_cache(tmp_path):
    bb, ds = CountingBackbone(), ToySet()
    extra = {"mean": (0.485, 0.456, 0.406), "interp": "nearest"}
    _cache(bb, ds, tmp_path, extra=extra).load_or_compute()
    _cache(bb, ds, tmp_path, extra=extra).load_or_compute()
    assert bb.calls == 3


def test_key_change_forces_recompute(tmp_path):
    bb, ds = CountingBackbone(), ToySet()
    _cache(bb, ds, tmp_path).load_or_compute()
    _cache(bb, ds, tmp_path, res=24).load_or_compute()
    assert bb.calls == 6
    assert len(_entries(tmp_path)) == 2


def _tiny_frozen_vit(pos_embed_interp: str):
    from timm.models.vision_transformer import VisionTransformer

    from equss.models.backbone import DinoViTFeatures, FrozenBackbone

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    model = DinoViTFeatures(vit, pos_embed_interp=pos_embed_interp)
    return FrozenBackbone(model, name="tiny_vit", patch_size=8, embed_dim=16, weights_id="random-init")


def test_key_covers_backbone_configuration_not_only_tensors(tmp_path):
    """Same tensors, different position-embedding interpolation: different features at 24x24 ..."""
    dino, timm_interp = _tiny_frozen_vit("dino"), _tiny_frozen_vit("timm")
    ds = ToySet(res=24)
    x = ds[0]["img"][None]
    assert not torch.allclose(dino(x), timm_interp(x))
    # ... so the cache must not hand one the other's features.
    a = _cache(dino, ds, tmp_path, res=24)
    b = _cache(timm_interp, ds, tmp_path, res=24)
    assert a.key != b.key
    fa = a.load_or_compute().features
    fb = b.load_or_compute().features
    # batch of 3 in the cache vs 1 here: matmul rounding may differ in the last bit
    np.testing.assert_allclose(fb[0], timm_interp(x)[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.array_equal(fa, fb)
    # The informational weights_id (e.g. a checkpoint path that moved) does not enter the key.
    moved = _tiny_frozen_vit("dino")
    moved.weights_id = "file:/elsewhere/ckpt.pth"
    assert _cache(moved, ds, tmp_path, res=24).key == a.key


def test_backbone_fingerprint_is_about_values():
    a, b = CountingBackbone(seed=0), CountingBackbone(seed=0)
    assert backbone_fingerprint(a) == backbone_fingerprint(b)
    with torch.no_grad():
        b.proj.weight[0, 0, 0, 0] += 1
    assert backbone_fingerprint(a) != backbone_fingerprint(b)


def test_interrupted_write_leaves_nothing_valid(tmp_path):
    ds = ToySet()
    crashing = CountingBackbone(fail_on_call=2)
    cache = _cache(crashing, ds, tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.load_or_compute()
    assert _entries(tmp_path) == []  # the temporary directory was removed, nothing else written
    assert cache.load() is None
    # A later run computes from scratch.
    bb = CountingBackbone()
    entry = _cache(bb, ds, tmp_path).load_or_compute()
    assert bb.calls == 3
    np.testing.assert_array_equal(entry.features, _expected(bb, ds).numpy())


def test_killed_write_leftover_is_never_taken_for_a_cache(tmp_path, monkeypatch, caplog):
    """A hard kill cannot run the cleanup: simulate it by disabling the cleanup, then crash."""
    ds = ToySet()
    monkeypatch.setattr(fc.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _cache(CountingBackbone(fail_on_call=3), ds, tmp_path).load_or_compute()
    monkeypatch.undo()
    leftovers = _entries(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")
    bb = CountingBackbone()
    cache = _cache(bb, ds, tmp_path)
    assert cache.load() is None
    with caplog.at_level(logging.WARNING, logger=fc.__name__):
        entry = cache.load_or_compute()
    assert bb.calls == 3
    assert "leftover temporary" in caplog.text
    np.testing.assert_array_equal(entry.features, _expected(bb, ds).numpy())


def _corrupt_flip_feature_byte(path):
    f = path / "features.npy"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # inside the array data, past the .npy header
    f.write_bytes(bytes(data))


def _corrupt_truncate_features(path):
    f = path / "features.npy"
    f.write_bytes(f.read_bytes()[:-16])


def _corrupt_labels_missing(path):
    (path / "labels.npy").unlink()


def _corrupt_meta_garbage(path):
    (path / "meta.json").write_text('{"format_version": 1, "key": ')


def _corrupt_meta_missing(path):
    (path / "meta.json").unlink()


def _corrupt_meta_other_key(path):
    meta = json.loads((path / "meta.json").read_text())
    meta["key"]["res"] = 999
    (path / "meta.json").write_text(json.dumps(meta))


def _corrupt_old_format(path):
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 0
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (_corrupt_flip_feature_byte, "CRC-32 mismatch"),
        (_corrupt_truncate_features, "bytes"),
        (_corrupt_labels_missing, "labels.npy is missing"),
        (_corrupt_meta_garbage, "unreadable"),
        (_corrupt_meta_missing, "meta.json is missing"),
        (_corrupt_meta_other_key, "key fields differ: ['res']"),
        (_corrupt_old_format, "format version"),
    ],
    ids=[
        "flipped-byte",
        "truncated",
        "labels-missing",
        "meta-garbage",
        "meta-missing",
        "other-key",
        "old-format",
    ],
)
def test_corrupted_entry_is_detected_and_recomputed(tmp_path, caplog, corrupt, reason):
    bb, ds = CountingBackbone(), ToySet()
    entry = _cache(bb, ds, tmp_path).load_or_compute()
    path = entry.path
    del entry  # release the memory maps before modifying the files
    corrupt(path)
    with caplog.at_level(logging.INFO, logger=fc.__name__):
        entry = _cache(bb, ds, tmp_path).load_or_compute()
    assert reason in caplog.text
    assert bb.calls == 6  # recomputed
    np.testing.assert_array_equal(entry.features, _expected(bb, ds).numpy())
    # ... and the repaired entry is reused.
    _cache(bb, ds, tmp_path).load_or_compute()
    assert bb.calls == 6


def test_quick_verify_still_catches_truncation(tmp_path, caplog):
    bb, ds = CountingBackbone(), ToySet()
    path = _cache(bb, ds, tmp_path, verify="quick").load_or_compute().path
    _corrupt_truncate_features(path)
    with caplog.at_level(logging.INFO, logger=fc.__name__):
        _cache(bb, ds, tmp_path, verify="quick").load_or_compute()
    assert bb.calls == 6 and "bytes" in caplog.text


def test_images_of_different_sizes_are_rejected(tmp_path):
    class Mixed(ToySet):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            if i == 5:
                item["img"] = torch.randn(3, 24, 24)
            return item

    with pytest.raises(RuntimeError):  # default_collate refuses to stack them within a batch
        _cache(CountingBackbone(), Mixed(), tmp_path).load_or_compute()
    with pytest.raises(ValueError, match="same size"):  # across batches: our own check
        _cache(CountingBackbone(), Mixed(), tmp_path, batch_size=1).load_or_compute()
    assert _entries(tmp_path) == []


def test_argument_validation(tmp_path):
    bb, ds = CountingBackbone(), ToySet()
    with pytest.raises(ValueError, match="storage_dtype"):
        _cache(bb, ds, tmp_path, storage_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="verify"):
        _cache(bb, ds, tmp_path, verify="none")
    with pytest.raises(ValueError, match="empty"):
        _cache(bb, ToySet(n=0), tmp_path)
    with pytest.raises(TypeError, match="JSON"):
        _cache(bb, ds, tmp_path, extra={"t": torch.zeros(1)})

"""Datasets, input pipeline, five-crop and kNN of equss.data on tiny fake trees in each standard layout.

Expected labels are hand-written tables here (from docs/method.md §8), never the mappings under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from equss.data import (
    CocoStuff,
    FiveCropDataset,
    ImageFolder,
    PairDataset,
    Potsdam3,
    SegmentationTransform,
    build_dataset,
    class_names,
    knn_from_features,
    load_knn,
    make_five_crop,
    save_knn,
)
from equss.data.cityscapes import Cityscapes27
from equss.data.knn import compute_knn, knn_path, load_or_compute_knn

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _denorm(img: torch.Tensor) -> np.ndarray:
    """float [3,H,W] normalised → uint8-scale float [H,W,3]."""
    return (img.permute(1, 2, 0).numpy() * STD + MEAN) * 255.0


def _save_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr)).save(path)


def _save_rgb(path, colour, size=(4, 8), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((*size, 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


# ------------------------------------------------------------------------------------------- pipeline


def test_pipeline_nearest_resize_and_centre_crop_by_hand():
    # 4x8 label, res 2: shorter side 4 -> 2, so size (2, 4); PIL nearest picks rows floor((i+.5)*2) = 1, 3
    # and columns 1, 3, 5, 7; the centre crop (left = round((4-2)/2) = 1) keeps columns 3 and 5.
    label = np.arange(32, dtype=np.int64).reshape(4, 8)
    img = np.zeros((4, 8, 3), dtype=np.uint8)
    img[..., 0] = np.arange(32).reshape(4, 8) * 7
    out = SegmentationTransform(2)(img, label)
    assert out["label"].dtype == torch.int64
    assert out["label"].tolist() == [[11, 13], [27, 29]]
    red = _denorm(out["img"])[..., 0]
    np.testing.assert_allclose(red, np.array([[11, 13], [27, 29]]) * 7, atol=1e-3)
    assert set(out) == {"img", "label"}


def test_pipeline_portrait_and_unlabelled():
    img = np.full((9, 6, 3), 100, dtype=np.uint8)
    out = SegmentationTransform(4)(img, None)
    assert out["img"].shape == (3, 4, 4) and out["img"].dtype == torch.float32
    assert (out["label"] == -1).all()
    np.testing.assert_allclose(_denorm(out["img"]), 100.0, atol=1e-3)


def test_pipeline_rejects_mismatched_label():
    with pytest.raises(ValueError, match="does not match"):
        SegmentationTransform(4)(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.int64))


def test_photometric_copy_and_geometric_alignment():
    torch.manual_seed(0)
    label = np.ones((16, 16), dtype=np.int64)
    label[:, 8:] = 2
    img = np.where(label[..., None] == 1, 50, 200).astype(np.uint8).repeat(3, axis=2)
    t = SegmentationTransform(16, photometric_aug=True, geometric_aug=True)
    flipped = False
    for _ in range(10):
        out = t(img, label)
        assert out["img_aug"].shape == out["img"].shape
        lab = out["label"].numpy()
        assert set(np.unique(lab)) <= {1, 2}
        grey = _denorm(out["img"])[..., 0]
        # away from the boundary (3x3 neighbourhood with one label) the image value matches the label
        for cls, value in ((1, 50.0), (2, 200.0)):
            m = lab == cls
            inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
            np.testing.assert_allclose(grey[1:-1, 1:-1][inner], value, atol=2.0)
        flipped |= bool(lab[0, 0] == 2)
    assert flipped, "10 draws of p=0.5 flips (seeded) never flipped"


# ----------------------------------------------------------------------------------------- COCO-Stuff

# (fine id, coarse 27, stuff-15, 3-class) written by hand from docs/method.md §8
COCO_CASES = [
    (0, 9, -1, -1), (5, 11, -1, -1), (12, 8, -1, -1), (20, 7, -1, -1), (30, 6, -1, -1), (40, 10, -1, -1),
    (45, 5, -1, -1), (55, 2, -1, -1), (65, 3, -1, -1), (73, 0, -1, -1), (80, 1, -1, -1), (85, 4, -1, -1),
    (90, 4, -1, -1), (91, 17, 5, -1), (93, 22, 10, 1), (94, 20, 8, -1), (97, 15, 3, -1), (98, 25, 13, -1),
    (99, 16, 4, -1), (100, 13, 1, -1), (101, 12, 0, -1), (105, 23, 11, 0), (110, 21, 9, 2), (113, 13, 1, -1),
    (117, 13, 1, -1), (119, 26, 14, -1), (120, 14, 2, -1), (124, 21, 9, 2), (152, 14, 2, -1), (156, 23, 11, 0),
    (162, 22, 10, 1), (170, 18, 6, -1), (176, 18, 6, -1), (179, 19, 7, -1), (181, 24, 12, -1), (255, -1, -1, -1),
]


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    fine = np.array([c[0] for c in COCO_CASES], dtype=np.uint8).reshape(6, 6)
    for split in ("train2017", "val2017"):
        for i, img_id in enumerate(["000000000009", "000000000025"]):
            _save_rgb(root / "images" / split / f"{img_id}.jpg", (10 * i, 128, 200), size=(6, 6))
            _save_png(root / "annotations" / split / f"{img_id}.png", np.rot90(fine, i).copy())
        (root / "curated" / split).mkdir(parents=True)
        (root / "curated" / split / "Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000009\n000000000025\n")
        (root / "curated" / split / "Coco164kFew_Stuff_6.txt").write_text("000000000025\n")
    return root


@pytest.mark.parametrize("variant,col", [(27, 1), (15, 2), (3, 3)])
def test_cocostuff_label_mapping(coco_root, variant, col):
    ds = build_dataset(f"cocostuff{variant}", coco_root, "val", res=6)
    assert isinstance(ds, CocoStuff) and ds.num_classes == variant
    expected = np.array([c[col] for c in COCO_CASES], dtype=np.int64).reshape(6, 6)
    if variant == 3:
        assert len(ds) == 1
        np.testing.assert_array_equal(ds[0]["label"].numpy(), np.rot90(expected, 1))
    else:
        assert len(ds) == 2
        np.testing.assert_array_equal(ds[0]["label"].numpy(), expected)
        np.testing.assert_array_equal(ds[1]["label"].numpy(), np.rot90(expected, 1))
    item = ds[0]
    assert item["index"] == 0 and item["img"].shape == (3, 6, 6)


def test_cocostuff_image_values(coco_root):
    ds = CocoStuff(coco_root, "train", res=6)
    rgb = _denorm(ds[1]["img"])
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), [10, 128, 200], atol=3.0)  # JPEG of a flat colour


def test_cocostuff_class_names():
    names27 = class_names("cocostuff27")
    assert len(names27) == 27 and names27[0] == "electronic" and names27[9] == "person" and names27[26] == "water"
    assert class_names("cocostuff15")[0] == "ceiling" and len(class_names("cocostuff15")) == 15
    assert class_names("cocostuff3") == ["sky", "plant", "ground"]


def test_cocostuff_missing_paths(coco_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("cocostuff27", tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="Other.txt"):
        CocoStuff(coco_root, "train", list_file="Other.txt")
    (coco_root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000009\n000000000777\n")
    with pytest.raises(FileNotFoundError, match="000000000777.jpg"):
        CocoStuff(coco_root, "val")
    (coco_root / "curated" / "train2017" / "Coco164kFew_Stuff_6.txt").write_text("\n")
    with pytest.raises(ValueError, match="Coco164kFew_Stuff_6.txt"):
        build_dataset("cocostuff3", coco_root, "train")
    (coco_root / "annotations" / "train2017" / "000000000025.png").unlink()
    with pytest.raises(FileNotFoundError, match="000000000025.png"):
        CocoStuff(coco_root, "train")


# ----------------------------------------------------------------------------------------- Cityscapes


def test_cityscapes_label_ids_and_order(tmp_path):
    root = tmp_path / "cityscapes"
    ids = np.array([[0, 3, 6, 7], [8, 20, 26, 33]], dtype=np.uint8)
    expected = np.array([[-1, -1, -1, 0], [1, 13, 19, 26]])
    for city, name in (("zurich", "zurich_000000_000019"), ("aachen", "aachen_000001_000019")):
        _save_rgb(root / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png", (1, 2, 3), size=(2, 4))
        lab = ids if city == "aachen" else np.full((2, 4), 24, np.uint8)
        _save_png(root / "gtFine" / "train" / city / f"{name}_gtFine_labelIds.png", lab)
    ds = build_dataset("cityscapes", root, "train", res=2)
    assert isinstance(ds, Cityscapes27) and len(ds) == 2 and ds.num_classes == 27
    assert ds.class_names[0] == "road" and ds.class_names[26] == "bicycle"
    # res 2 on a 2x4 image: no resize, centre crop keeps columns 1..2
    np.testing.assert_array_equal(ds[0]["label"].numpy(), expected[:, 1:3])  # aachen sorts first
    assert (ds[1]["label"] == 17).all()
    np.testing.assert_allclose(_denorm(ds[0]["img"]), np.broadcast_to([1, 2, 3], (2, 2, 3)), atol=1e-3)


def test_cityscapes_missing(tmp_path):
    root = tmp_path / "cs"
    (root / "leftImg8bit" / "val").mkdir(parents=True)
    (root / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no '\\*_leftImg8bit.png' images"):
        Cityscapes27(root, "val")
    _save_rgb(root / "leftImg8bit" / "val" / "bonn" / "bonn_0_0_leftImg8bit.png", (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="bonn_0_0_gtFine_labelIds.png"):
        Cityscapes27(root, "val")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="bare/leftImg8bit/val"):
        Cityscapes27(tmp_path / "bare", "val")


# -------------------------------------------------------------------------------------------- Potsdam


@pytest.fixture
def potsdam_root(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "potsdam"
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    img = np.zeros((4, 4, 4), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2], img[..., 3] = 30, 60, 90, 250  # channel 3 is IR
    gt = np.array([[0, 1, 2, 3], [4, 5, 255, 0], [1, 1, 2, 2], [3, 3, 4, 4]], dtype=np.uint8)
    for name in ("t1", "t2", "u1"):
        savemat(root / "imgs" / f"{name}.mat", {"img": img})
    for name in ("t1", "t2"):
        savemat(root / "gt" / f"{name}.mat", {"gt": gt})
    (root / "labelled_train.txt").write_text("t1\n")
    (root / "labelled_test.txt").write_text("t2\n")
    (root / "unlabelled_train.txt").write_text("u1\n")
    (root / "all.txt").write_text("t1\nt2\nu1\n")
    return root


def test_potsdam_labels_and_rgb(potsdam_root):
    ds = build_dataset("potsdam", potsdam_root, "val", res=4)
    assert isinstance(ds, Potsdam3) and len(ds) == 1 and ds.num_classes == 3
    # roads/cars -> 0, buildings/clutter -> 1, low vegetation/trees -> 2, 255 -> -1
    expected = [[0, 1, 2, 2], [0, 1, -1, 0], [1, 1, 2, 2], [2, 2, 0, 0]]
    assert ds[0]["label"].tolist() == expected
    np.testing.assert_allclose(_denorm(ds[0]["img"]), np.broadcast_to([30, 60, 90], (4, 4, 3)), atol=1e-3)
    assert len(Potsdam3(potsdam_root, "train+val", res=4)) == 2


def test_potsdam_unlabelled_and_missing(potsdam_root):
    ds = Potsdam3(potsdam_root, "all", res=4)
    assert len(ds) == 3 and (ds[2]["label"] == -1).all()
    (potsdam_root / "gt" / "t2.mat").unlink()
    with pytest.raises(FileNotFoundError, match="t2.mat"):
        Potsdam3(potsdam_root, "val")
    (potsdam_root / "labelled_train.txt").unlink()
    with pytest.raises(FileNotFoundError, match="labelled_train.txt"):
        Potsdam3(potsdam_root, "train")


# --------------------------------------------------------------------------------------- image folder


def test_image_folder_with_and_without_labels(tmp_path):
    root = tmp_path / "folder"
    _save_rgb(root / "imgs" / "train" / "b.png", (0, 0, 255), size=(4, 4))
    _save_rgb(root / "imgs" / "train" / "sub" / "a.jpg", (255, 0, 0), size=(4, 4))
    (root / "imgs" / "train" / "notes.txt").write_text("not an image")
    lab = np.array([[0, 1, 2, 255]] * 4, dtype=np.uint8)
    _save_png(root / "labels" / "train" / "b.png", lab)
    _save_png(root / "labels" / "train" / "sub" / "a.png", lab)
    ds = build_dataset("imagefolder", root, "train", res=4, class_names=["x", "y", "z"])
    assert isinstance(ds, ImageFolder) and len(ds) == 2 and ds.num_classes == 3
    assert ds[0]["label"].tolist() == [[0, 1, 2, -1]] * 4  # b.png sorts before sub/a.jpg
    unl = ImageFolder(root / "imgs" / "train", split=None, res=4)
    assert len(unl) == 2 and (unl[1]["label"] == -1).all()
    (root / "labels" / "train" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        ImageFolder(root, "train", res=4)


def test_image_folder_empty(tmp_path):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path, "train")


def test_build_dataset_rejects_unknown():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", "/tmp", "train")
    with pytest.raises(ValueError, match="crop"):
        build_dataset("cocostuff27", "/tmp", "train", crop="random")


# ---------------------------------------------------------------------------------------- five-crop


def test_five_crop_round_trip_and_idempotence(tmp_path):
    root = tmp_path / "folder"
    H, W = 8, 12
    lab = (np.arange(H * W).reshape(H, W) % 7).astype(np.uint8)
    lab[0, 0] = 255
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[..., 1] = 40
    img[4:, :, 1] = 220  # bottom half bright: the JPEG crops keep it
    (root / "imgs" / "train").mkdir(parents=True)
    Image.fromarray(img).save(root / "imgs" / "train" / "im0.png")
    _save_png(root / "labels" / "train" / "im0.png", lab)
    source = ImageFolder(root, "train", res=4)

    out = make_five_crop(source, root, "imagefolder", "train", progress=False)
    assert out == root / "cropped" / "imagefolder_five_crop_0.5"
    # torchvision order: tl, tr, bl, br, centre; each 4x6 (0.5 of 8x12); centre offsets round(2), round(3)
    slices = [(0, 0), (0, 6), (4, 0), (4, 6), (2, 3)]
    stored = [np.array(Image.open(out / "label" / "train" / f"{n}.png")) for n in range(5)]
    for n, (top, left) in enumerate(slices):
        want = lab[top : top + 4, left : left + 6].astype(np.int64)
        want = np.where(want == 255, -1, want)
        np.testing.assert_array_equal(stored[n], want + 1)  # class + 1, 0 = ignore
    assert stored[0][0, 0] == 0

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.*g")}
    assert len(mtimes) == 10
    make_five_crop(source, root, "imagefolder", "train", progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.*g")} == mtimes

    ds = build_dataset("imagefolder", root, "train", res=4, crop="five_crop", class_names=["c"] * 7)
    assert isinstance(ds, FiveCropDataset) and len(ds) == 5
    # res 4 on a 4x6 crop: no resize, centre crop keeps columns 1..4
    for n, (top, left) in enumerate(slices):
        want = lab[top : top + 4, left + 1 : left + 5].astype(np.int64)
        np.testing.assert_array_equal(ds[n]["label"].numpy(), np.where(want == 255, -1, want))
    green = _denorm(ds[3]["img"])[..., 1]  # bottom-right crop: all bright
    np.testing.assert_allclose(green, 220, atol=12)


def test_five_crop_incomplete_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="five_crop.py"):
        FiveCropDataset(tmp_path, "cocostuff27", "train")
    d = tmp_path / "cropped" / "cocostuff27_five_crop_0.5"
    (d / "img" / "train").mkdir(parents=True)
    (d / "label" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        FiveCropDataset(tmp_path, "cocostuff27", "train")
    (d / "done_train.json").write_text(json.dumps({"num_crops": 5}))
    with pytest.raises(FileNotFoundError, match="0.jpg"):
        FiveCropDataset(tmp_path, "cocostuff27", "train")


# ---------------------------------------------------------------------------------------------- kNN


def test_knn_duplicates_are_first_neighbours():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 16, generator=g)
    feats = torch.cat([base, base[:4] * 3.0])  # rows 10..13 duplicate rows 0..3 (cosine 1)
    nns = knn_from_features(feats, k=5, chunk_size=3)
    assert nns.shape == (14, 5) and nns.dtype == np.int64
    np.testing.assert_array_equal(nns[:, 0], np.arange(14))
    for i in range(4):
        assert nns[i, 1] == 10 + i and nns[10 + i, 1] == i


def test_knn_chunked_equals_unchunked_and_brute_force():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(57, 8, generator=g)
    full = knn_from_features(feats, k=30, chunk_size=1000)
    for cs in (1, 7, 16):
        np.testing.assert_array_equal(knn_from_features(feats, k=30, chunk_size=cs), full)
    # brute force in float64, self first
    x = torch.nn.functional.normalize(feats.double(), dim=1)
    sims = x @ x.T
    sims.fill_diagonal_(2.0)
    np.testing.assert_array_equal(full, sims.argsort(dim=1, descending=True)[:, :30].numpy())


def test_knn_faiss_matches_torch():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(40, 8, generator=g)
    feats[5] = feats[9]  # exact duplicate: self must still come first
    np.testing.assert_array_equal(
        knn_from_features(feats, k=10, backend="faiss"), knn_from_features(feats, k=10, chunk_size=8)
    )


class _MeanColour(torch.nn.Module):
    """Toy featurizer: [B,3,H,W] -> [B,3,H/2,W/2] (average colour per 2x2 block)."""

    name = "meancolour"

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 2)


def test_compute_knn_save_load_roundtrip(tmp_path):
    root = tmp_path / "folder"
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (245, 15, 10), (12, 240, 20), (200, 200, 10)]
    for i, c in enumerate(colours):
        _save_rgb(root / "imgs" / "train" / f"{i}.png", c, size=(4, 4))
    ds = ImageFolder(root, "train", res=4)
    nns = compute_knn(_MeanColour(), ds, k=3, batch_size=4, progress=False)
    assert nns[0, :2].tolist() == [0, 3] and nns[3, :2].tolist() == [3, 0]
    assert nns[1, :2].tolist() == [1, 4] and nns[4, :2].tolist() == [4, 1]

    path = knn_path(tmp_path, "meancolour", "imagefolder", "train", None, 4)
    assert path == tmp_path / "nns" / "nns_meancolour_imagefolder_train_None_4.npz"
    save_knn(path, nns, model="meancolour", dataset="imagefolder", split="train", crop=None, res=4)
    np.testing.assert_array_equal(load_knn(path, num_images=6, model="meancolour", res=4), nns)
    with pytest.raises(ValueError, match="6 rows but the dataset has 7"):
        load_knn(path, num_images=7)
    with pytest.raises(ValueError, match="model 'meancolour', not 'vit'"):
        load_knn(path, model="vit")
    with pytest.raises(ValueError, match="res 4, not 224"):
        load_knn(path, res=224)
    with pytest.raises(ValueError, match="need more than num_neighbors=7"):
        load_knn(path, min_neighbors=7)
    with pytest.raises(FileNotFoundError, match="precompute_knn.py"):
        load_knn(tmp_path / "nns" / "absent.npz")

    nns2, p2 = load_or_compute_knn(_MeanColour(), ds, "imagefolder_train_none", tmp_path, k=3, progress=False)
    assert p2.is_file() and p2.name == "nns_meancolour_imagefolder_train_none_4.npz"
    np.testing.assert_array_equal(nns2, nns)
    nns3, _ = load_or_compute_knn(_MeanColour(), ds, "imagefolder_train_none", tmp_path, k=2, progress=False)
    np.testing.assert_array_equal(nns3, nns[:, :2])

    # Precomputed featurizer outputs ("feat" items, as the feature cache yields) give the same table
    # without running the featurizer.
    class _Refuses(_MeanColour):
        def forward(self, x):
            raise AssertionError("the featurizer must not run when features are given")

    feats = [{"feat": _MeanColour()(ds[i]["img"][None])[0]} for i in range(len(ds))]
    nns4, _ = load_or_compute_knn(_Refuses(), ds, "imagefolder_train_none_f", tmp_path, k=3, progress=False,
                                  features=feats)
    np.testing.assert_array_equal(nns4, nns)
    with pytest.raises(ValueError, match="features has 5 items but the dataset has 6"):
        load_or_compute_knn(_Refuses(), ds, "imagefolder_train_none_g", tmp_path, k=3, features=feats[:5])


# --------------------------------------------------------------------------------------------- pairs


class _Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 20

    def __getitem__(self, i):
        return {"img": torch.full((3, 2, 2), float(i)), "label": torch.zeros(2, 2, dtype=torch.int64), "index": i}


def test_pair_dataset_positives_reproducible():
    rng = np.random.default_rng(0)
    nns = np.stack([np.concatenate([[i], rng.permutation([j for j in range(20) if j != i])[:9]]) for i in range(20)])
    pairs = PairDataset(_Toy(), nns, num_neighbors=7, seed=3)
    first = [pairs[i]["index_pos"] for i in range(20)]
    for i, j in enumerate(first):
        assert j in nns[i, 1:8] and j != i
        assert pairs[i]["img_pos"][0, 0, 0] == j and pairs[i]["index"] == i
    assert [PairDataset(_Toy(), nns, 7, seed=3)[i]["index_pos"] for i in range(20)] == first
    pairs.set_epoch(1)
    second = [pairs[i]["index_pos"] for i in range(20)]
    assert second != first
    # over many epochs every one of the 7 allowed neighbours of image 0 is drawn, and nothing else
    drawn = set()
    for e in range(200):
        pairs.set_epoch(e)
        drawn.add(pairs.positive_index(0))
    assert drawn == set(nns[0, 1:8].tolist())


def test_pair_dataset_validation():
    with pytest.raises(ValueError, match="19 rows but the dataset has 20"):
        PairDataset(_Toy(), np.zeros((19, 30), dtype=np.int64))
    with pytest.raises(ValueError, match="num_neighbors"):
        PairDataset(_Toy(), np.zeros((20, 7), dtype=np.int64), num_neighbors=7)

"""Segmenting new images with a trained checkpoint: files, folders and globs, any image size, labelled and
unlabelled runs, matched class ids, overlays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from equss.config import load_config
from equss.predict import UNMATCHED, Predictor, find_images

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "data.dataset=imagefolder", "data.train_res=48", "data.val_res=48", "data.batch_size=8",
    "data.val_batch_size=8", "data.num_workers=0", "data.knn_k=8", "data.num_neighbors=3",
    "model.dim=32", "model.num_subspaces=4", "model.codebook_size=8", "loss.feature_samples=4",
    "loss.neg_samples=1", "eval.every=3", "eval.kmeans_baseline=false", "eval.crf=false",
    "log.progress=false", "log.tensorboard=false", "optim.max_steps=3",
]


def _folder(root: Path, labels: bool) -> None:
    args = ["--out", str(root), "--num-train", "16", "--num-val", "4", "--num-classes", "3", "--res", "48"]
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("make_demo_folder", ROOT / "scripts" / "make_demo_folder.py")
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(args + ([] if labels else ["--no-labels"])) == 0


@pytest.fixture(scope="module", params=["labelled", "unlabelled"])
def run_dir(request, tmp_path_factory):
    from equss.train import run

    tmp = tmp_path_factory.mktemp(request.param)
    _folder(tmp / "data", labels=request.param == "labelled")
    extra = [] if request.param == "labelled" else ["data.num_clusters=3"]
    run(load_config(None, [*TINY, *extra, f"data.root={tmp / 'data'}", f"output_dir={tmp / 'run'}",
                           f"backbone.cache_dir={tmp / 'cache'}"]))
    return tmp, request.param == "labelled"


def test_predict_writes_masks_and_overlays_at_every_image_size(run_dir, tmp_path):
    tmp, labelled = run_dir
    ckpt = tmp / "run" / ("best.ckpt" if labelled else "last.ckpt")
    # An odd, non-square image beside the folder's own: resized to the run's scale and back.
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 61, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    paths = find_images([str(tmp / "data" / "imgs" / "val"), str(tmp_path / "*.png")])
    assert len(paths) == 5
    predictor = Predictor(str(ckpt), device="cpu")
    written = predictor.predict_files(paths, tmp_path / "out", progress=False)
    names = {p.name for p in written}
    assert "odd_cluster.png" in names and "odd_overlay.png" in names
    assert ("odd_linear.png" in names) == labelled
    odd = np.asarray(Image.open(tmp_path / "out" / "odd_cluster.png"))
    assert odd.shape == (37, 61)
    values = set(np.unique(odd).tolist())
    assert values <= set(range(3)) | {UNMATCHED}
    if labelled:  # matched class ids: at most 3 distinct classes, the matching came from results.json
        assert predictor.assignment is not None and len(predictor.assignment) == 3
    overlay = Image.open(tmp_path / "out" / "odd_overlay.png")
    assert overlay.size[0] > 2 * 61 and overlay.size[1] >= 37


def test_find_images_names_what_matched_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        find_images([str(tmp_path / "nothing_here")])


@pytest.mark.slow
def test_predict_script(run_dir, tmp_path):
    tmp, labelled = run_dir
    ckpt = tmp / "run" / ("best.ckpt" if labelled else "last.ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--checkpoint", str(ckpt), "--images",
                          str(tmp / "data" / "imgs" / "val"), "--out-dir", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((tmp_path / "o").glob("*_overlay.png"))) == 4

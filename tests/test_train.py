"""End-to-end training on the embedded synthetic data: the loss goes down, results beat chance, resume is
exact, checkpoints are atomic and checked, eval/analyze reproduce and extend the run, torchrun works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from equss.checkpoint import CheckpointMismatchError, load_checkpoint
from equss.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny but real configuration: 48 train / 12 val scenes of 64×64, the demo backbone (8×8 patches → 8×8
# feature grid), D = 64 = 8 subspaces × 8, K = 16.
TINY = [
    "data.synthetic.num_train=48",
    "data.synthetic.num_val=12",
    "data.synthetic.num_classes=3",
    "data.train_res=64",
    "data.val_res=64",
    "data.batch_size=8",
    "data.val_batch_size=12",
    "data.num_workers=0",
    "model.dim=64",
    "model.num_subspaces=8",
    "model.codebook_size=16",
    "loss.feature_samples=5",
    "loss.neg_samples=2",
    "eval.every=3",
    "eval.kmeans_baseline=false",
    "log.progress=false",
    "log.tensorboard=false",
]


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path / 'run'}", f"backbone.cache_dir={tmp_path / 'cache'}", *extra])


pytestmark = pytest.mark.usefixtures("one_thread")
def _read_csv(path):
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_short_run_learns_and_beats_chance(tmp_path):
    from equss.train import run

    result = run(_cfg(tmp_path, "optim.max_steps=30", "optim.epochs=10", "eval.every=10"))
    rows = _read_csv(tmp_path / "run" / "train_log.csv")
    assert len(rows) == 30
    first = sum(float(r["loss"]) for r in rows[:5]) / 5
    last = sum(float(r["loss"]) for r in rows[-5:]) / 5
    assert last < first, (first, last)
    chance = result["chance"]["majority_acc"]
    assert result["no_crf"]["linear"].accuracy > chance + 5, (result["no_crf"]["linear"].accuracy, chance)
    # Files a user expects after a run.
    for name in ("best.ckpt", "last.ckpt", "results.json", "results.md", "val_log.csv"):
        assert (tmp_path / "run" / name).is_file(), name
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["no_crf"]["cluster"]["accuracy"] == pytest.approx(result["no_crf"]["cluster"].accuracy)


def _state(path):
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """6 uninterrupted steps == 3 steps, stop, resume from last.ckpt, 3 more steps (bit for bit)."""
    from equss.train import Trainer

    a = Trainer(_cfg(tmp_path / "a", "optim.max_steps=6"))
    a.fit()
    b = Trainer(_cfg(tmp_path / "b", "optim.max_steps=3"))
    b.fit()
    resumed = Trainer(_cfg(tmp_path / "b", "optim.max_steps=6"), resume=str(tmp_path / "b" / "run" / "last.ckpt"))
    assert resumed.step == 3
    resumed.fit()
    sa, sb = _state(tmp_path / "a" / "run" / "last.ckpt"), _state(tmp_path / "b" / "run" / "last.ckpt")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # The training logs of the resumed half equal the uninterrupted run's.
    la = _read_csv(tmp_path / "a" / "run" / "train_log.csv")
    lb = _read_csv(tmp_path / "b" / "run" / "train_log.csv")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


@pytest.mark.slow
def test_without_feature_cache_runs_the_backbone(tmp_path):
    """backbone.cache_features=false trains on backbone features computed per step (not on raw images)."""
    from equss.train import Trainer

    t = Trainer(_cfg(tmp_path, "backbone.cache_features=false", "optim.max_steps=2"))
    batch = next(iter(t.data.loader))
    f = t.featurize(batch, "img")
    assert f.shape[1] == t.backbone.embed_dim and f.shape[-1] == batch["img"].shape[-1] // t.backbone.patch_size
    t.fit()
    assert (tmp_path / "run" / "last.ckpt").is_file()


def test_holdout_selection_never_trains_on_held_out_anchors(tmp_path):
    from equss.train import Trainer

    t = Trainer(_cfg(tmp_path, "eval.select_on=holdout", "eval.holdout_fraction=0.25", "optim.max_steps=3"))
    held = set(t.data.holdout_loader.dataset.indices)
    assert len(held) == 12  # 25% of 48
    t.data.sampler.set_epoch(0)
    anchors = set(iter(t.data.sampler))
    assert anchors and not (anchors & held)
    result = t.fit()
    assert result["selected"]["select_on"] == "holdout"
    rows = _read_csv(tmp_path / "run" / "val_log.csv")
    assert "holdout_cluster_miou" in rows[0]


def test_resume_refuses_another_configuration(tmp_path):
    from equss.train import Trainer

    Trainer(_cfg(tmp_path, "optim.max_steps=3")).fit()
    with pytest.raises(CheckpointMismatchError, match="model.codebook_size"):
        Trainer(_cfg(tmp_path, "model.codebook_size=8"), resume=str(tmp_path / "run" / "last.ckpt"))


def test_interrupted_checkpoint_write_keeps_last_good(tmp_path, monkeypatch):
    from equss import checkpoint as ck

    path = tmp_path / "last.ckpt"
    ck.atomic_torch_save({"format": "equss-checkpoint", "version": 1, "step": 1}, str(path))

    def boom(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_torch_save({"format": "equss-checkpoint", "version": 1, "step": 2}, str(path))
    monkeypatch.undo()
    assert load_checkpoint(str(path))["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_missing_dataset_fails_early(tmp_path):
    from equss.train import Trainer

    cfg = load_config("cocostuff27_vits8.yaml", [f"data.root={tmp_path / 'nowhere'}", "backbone.name=demo",
                                                  "backbone.weights=none", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Trainer(cfg)


def test_unknown_config_key_is_an_error():
    with pytest.raises(ConfigError, match="lrr"):
        load_config(None, ["optim.lrr=1"])


@pytest.mark.slow
def test_eval_and_analyze_scripts_reproduce_the_run(tmp_path):
    """scripts/eval.py on the run's best checkpoint prints the numbers the training run reported."""
    from equss.train import run

    result = run(_cfg(tmp_path, "optim.max_steps=6"))
    ckpt = tmp_path / "run" / "best.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "eval.py"), "--checkpoint", str(ckpt),
                          "--num-images", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    evaluated = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert evaluated["no_crf"]["cluster"]["accuracy"] == pytest.approx(result["no_crf"]["cluster"].accuracy, abs=1e-9)
    assert evaluated["no_crf"]["linear"]["miou"] == pytest.approx(result["no_crf"]["linear"].miou, abs=1e-9)
    for name in ("predictions.png", "no_crf_cluster.csv", "no_crf_linear.json", "results.md"):
        assert (tmp_path / "run" / "eval" / name).is_file(), name

    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "analyze.py"), "--checkpoint", str(ckpt)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    files = {p.name for p in (tmp_path / "run" / "analysis").iterdir()}
    for stem in ("class_entropy", "codeword_usage", "entropy_vs_accuracy"):
        assert {f"{stem}.json", f"{stem}.png"} <= files, files
    entropy = json.loads((tmp_path / "run" / "analysis" / "class_entropy.json").read_text())
    (model_key,) = [k for k in entropy["entropy"] if k.startswith("EQUSS")]  # "EQUSS PQ codes (M=.., K=..)"
    values = entropy["entropy"][model_key]
    assert all(v is None or v >= 0 for v in values)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_gloo(tmp_path):
    """A real 2-process DDP run on CPU (gloo): trains, checkpoints from rank 0 only, and finishes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "scripts", "train.py"), *TINY, "optim.max_steps=4", "eval.every=4",
           f"output_dir={tmp_path / 'run'}", f"backbone.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.ckpt"))
    assert ckpt["step"] == 4
    rows = _read_csv(tmp_path / "run" / "train_log.csv")
    assert len(rows) == 4  # rank 0 logs once per step, rank 1 never


@pytest.mark.slow
def test_cold_and_warm_caches_give_the_same_run(tmp_path):
    """A run is a pure function of its configuration and seed: building the feature caches and the kNN
    table (cold) or reading them (warm) must not change a single logged number."""
    from equss.train import run

    cache = tmp_path / "shared_cache"
    logs = []
    for name in ("cold", "warm"):
        run(load_config(None, [*TINY, f"output_dir={tmp_path / name}", f"backbone.cache_dir={cache}",
                               "optim.max_steps=6"]))
        logs.append(((tmp_path / name / "train_log.csv").read_text(), (tmp_path / name / "val_log.csv").read_text()))
    assert (cache / "nns").is_dir() and any((cache / "features").iterdir())
    assert logs[0] == logs[1]


def test_collapse_guard_warns_once_per_kind_after_warmup():
    from equss.train import CollapseGuard

    g = CollapseGuard(n_clusters=6)
    healthy = {"pq_usage": 0.5, "clusters_used": 6.0}
    assert all(g.update(healthy) == [] for _ in range(30))
    warnings = []
    for _ in range(60):  # usage and clusters collapse; the smoothed values cross the thresholds later
        warnings += g.update({"pq_usage": 0.01, "clusters_used": 1.0})
    assert len(warnings) == 2
    usage = [w for w in warnings if "codebook usage" in w]
    clusters = [w for w in warnings if "cluster probe predicts only" in w]
    assert len(usage) == 1 and "dead_code_steps" in usage[0]
    assert len(clusters) == 1 and "cluster_init=kmeans" in clusters[0]
    early = CollapseGuard(n_clusters=6)
    assert all(early.update({"pq_usage": 0.0, "clusters_used": 0.0}) == [] for _ in range(CollapseGuard.WARMUP - 1))


def _scene_folder(root, labelled: bool, n_train: int = 16, n_val: int = 6):
    """An image folder in the documented layout, from generated scenes (3 texture classes)."""
    import numpy as np
    from PIL import Image

    from equss.data.synthetic import generate_scene

    for split, n in (("train", n_train), ("val", n_val)):
        (root / "imgs" / split).mkdir(parents=True)
        if labelled:
            (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img, label = generate_scene(3, split, i, 64, 3)
            Image.fromarray(img).save(root / "imgs" / split / f"scene_{i}.png")
            if labelled:
                Image.fromarray(label.astype(np.uint8)).save(root / "labels" / split / f"scene_{i}.png")


IMAGEFOLDER = [o for o in TINY if not o.startswith("data.synthetic")] + [
    "data.dataset=imagefolder", "optim.max_steps=3", "data.knn_k=8", "data.num_neighbors=3",
]


def test_labelled_image_folder_trains_with_classes_inferred(tmp_path, caplog):
    import logging

    from equss.train import run

    _scene_folder(tmp_path / "data", labelled=True)
    with caplog.at_level(logging.INFO, logger="equss"):
        result = run(load_config(None, [*IMAGEFOLDER, f"data.root={tmp_path / 'data'}",
                                        f"output_dir={tmp_path / 'run'}", f"backbone.cache_dir={tmp_path / 'c'}"]))
    assert any("3 classes inferred from the label PNGs" in r.message for r in caplog.records)
    assert result["no_crf"]["cluster"].n_classes == 3 and result["no_crf"]["cluster"].n_pixels == 6 * 64 * 64


def test_unlabelled_image_folder_trains_clusters_without_metrics(tmp_path):
    from equss.train import run

    _scene_folder(tmp_path / "data", labelled=False)
    base = [*IMAGEFOLDER, f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}",
            f"backbone.cache_dir={tmp_path / 'c'}"]
    with pytest.raises(ValueError, match=r"data\.num_clusters"):
        run(load_config(None, base))
    result = run(load_config(None, [*base, "data.num_clusters=4"]))
    assert result["selected"]["select_on"] == "last"
    assert "no metrics" in (tmp_path / "run" / "results.md").read_text().lower()
    assert load_checkpoint(str(tmp_path / "run" / "last.ckpt"))["n_classes"] == 4


def test_image_folder_class_keys_are_refused_for_other_datasets():
    with pytest.raises(ConfigError, match=r"data\.num_clusters: is for data\.dataset=imagefolder only"):
        load_config(None, ["data.num_clusters=3"])

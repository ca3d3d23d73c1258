"""Regression tests of the faults found by feeding the package bad inputs: no silent wrong result, and every
user error is one line naming what to fix.

Numbered as in the issue that listed them (1-11); each number holds the cases it found. The op-level
non-finite contract is tested per op in ``tests/test_pq_*.py``; here it is held at the level a user sees.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import equss
from equss.checkpoint import CheckpointCorruptError, load_checkpoint
from equss.config import ConfigError, load_config
from equss.nn import ProductQuantizer

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ 1-3: non-finite values never spread
def test_1_nan_codeword_never_wins_and_nan_input_row_does_not_poison_training(backend):
    x = backend.to(torch.randn(40, 4, 8, generator=torch.Generator().manual_seed(0)))
    cb = backend.to(torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(1)))
    cb[:, 5] = NAN
    for metric in ("l2", "dot"):
        codes, min_dist = equss.pq_assign(x, cb, metric)
        assert not (codes == 5).any() and torch.isfinite(min_dist).all(), metric

    for learning in ("param", "ema"):
        torch.manual_seed(0)
        pq = ProductQuantizer(32, 4, 16, channel_dim=1, learning=learning).to(backend.device)
        opt = torch.optim.SGD(pq.parameters(), lr=0.1) if learning == "param" else None
        for step in range(6):
            z = backend.to(torch.randn(3, 32, 4, 4, generator=torch.Generator().manual_seed(10 + step)))
            if step == 0:
                z[0, :, 1, 2] = NAN  # one NaN input vector (all its subspaces)
            out = pq(z)
            assert torch.isfinite(out.loss), (learning, step)
            assert int(out.stats.num_invalid) == (4 if step == 0 else 0)
            if opt is not None:
                opt.zero_grad()
                (out.loss + out.quantized.nan_to_num().square().mean()).backward()
                opt.step()
        assert torch.isfinite(pq.codebooks).all(), learning
        pq.eval()
        assert torch.isfinite(pq(backend.to(torch.randn(2, 32, 4, 4))).quantized).all(), learning


def test_1_on_invalid_raise():
    pq = ProductQuantizer(16, 2, 4, on_invalid="raise")
    x = torch.randn(5, 16)
    x[2, 3] = NAN
    with pytest.raises(FloatingPointError, match=r"1 of 10 input sub-vectors are not finite"):
        pq(x)


def test_2_one_nan_element_enters_no_statistics(backend):
    x = backend.to(torch.randn(64, 2, 4, generator=torch.Generator().manual_seed(2)))
    codes = backend.to(torch.arange(64).remainder(16).unsqueeze(1).expand(64, 2).contiguous().int())
    x[7, 1, 2] = NAN
    counts, sums = equss.pq_cluster_stats(x, codes, 16)
    assert torch.isfinite(sums).all() and int(counts[1, 7]) == 3 and int(counts[0, 7]) == 4
    cs, es = backend.to(torch.zeros(2, 16)), backend.to(torch.zeros(2, 16, 4))
    cb = backend.to(torch.randn(2, 16, 4))
    equss.pq_ema_update_(x, codes, cs, es, cb, 0.9, 1e-5)
    assert torch.isfinite(cb).all() and torch.isfinite(es).all()


@pytest.mark.parametrize("learning", ["param", "ema"])
def test_3_kmeans_init_on_a_batch_with_nan_rows(learning):
    torch.manual_seed(0)
    pq = ProductQuantizer(16, 2, 8, init="kmeans", learning=learning)
    x = torch.randn(64, 16)
    x[[3, 9, 17, 40, 63]] = NAN
    pq(x)
    assert bool(pq.codebook.initialized) and torch.isfinite(pq.codebooks).all()
    for _ in range(3):
        pq(torch.randn(64, 16))
    assert torch.isfinite(pq.codebooks).all()


def test_4_ema_eps_zero_is_rejected():
    x, codes = torch.randn(5, 2, 3), torch.zeros(5, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"eps must be > 0"):
        equss.pq_ema_update_(x, codes, torch.zeros(2, 4), torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), eps=0.0)


def test_5_unchecked_out_of_range_codes_behave_the_same_on_every_backend(backend):
    cb = backend.to(torch.randn(2, 5, 3))
    codes = backend.to(torch.tensor([[0, 4], [5, -1], [2, 7]], dtype=torch.int32))
    out = equss.pq_gather(codes, cb, check_range=False).cpu()
    assert torch.equal(out[1], torch.zeros(2, 3)) and torch.equal(out[2, 1], torch.zeros(3))
    counts, sums = equss.pq_cluster_stats(backend.to(torch.ones(3, 2, 3)), codes, 5, check_range=False)
    assert float(counts.sum()) == 3.0 and float(sums.sum()) == 9.0


# ------------------------------------------------------------------------- 6: caches cannot go stale
def _image_folder(root: Path, n: int = 6, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "imgs" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "imgs" / split / f"{i}.png")


def test_6_replacing_one_image_invalidates_features_and_knn(tmp_path, caplog):
    from equss.data.feature_cache import FeatureCache
    from equss.data.imagefolder import ImageFolder
    from equss.data.knn import load_or_compute_knn
    from equss.models.backbone import build_backbone

    _image_folder(tmp_path / "data")
    backbone = build_backbone("demo", weights="none")

    def cache_and_knn():
        ds = ImageFolder(tmp_path / "data", "train", 48)
        cache = FeatureCache(backbone, ds, tmp_path / "cache", dataset_name="folder", split="train", res=48,
                             crop="none", progress=False)
        return cache, load_or_compute_knn(backbone, ds, "folder_train", tmp_path / "cache", k=4, progress=False)

    cache, (nns, knn_file) = cache_and_knn()
    entry = cache.load_or_compute()
    # Same name, same count, new content (and a new modification time).
    img = tmp_path / "data" / "imgs" / "train" / "2.png"
    Image.fromarray(np.full((48, 48, 3), 255, dtype=np.uint8)).save(img)
    os.utime(img, ns=(1, entry.path.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger="equss"):
        cache2, (nns2, knn_file2) = cache_and_knn()
    assert cache2.key != cache.key  # the features are recomputed, never the old entry reused
    assert knn_file2 == knn_file and any("kNN file" in r.message and "changed" in r.message for r in caplog.records)


def test_6_truncated_knn_file_is_recomputed_with_a_notice(tmp_path, caplog):
    from equss.data.imagefolder import ImageFolder
    from equss.data.knn import load_or_compute_knn
    from equss.models.backbone import build_backbone

    _image_folder(tmp_path / "data")
    backbone = build_backbone("demo", weights="none")
    ds = ImageFolder(tmp_path / "data", "train", 48)
    nns, path = load_or_compute_knn(backbone, ds, "folder_train", tmp_path / "cache", k=4, progress=False)
    path.write_bytes(path.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="equss"):
        again, _ = load_or_compute_knn(backbone, ds, "folder_train", tmp_path / "cache", k=4, progress=False)
    assert np.array_equal(nns, again)
    assert any(str(path) in r.message and "recomputing" in r.message for r in caplog.records)


# ----------------------------------------------------------------------- 7: checkpoints are verified
TINY = [
    "data.synthetic.num_train=24", "data.synthetic.num_val=8", "data.synthetic.num_classes=3",
    "data.train_res=48", "data.val_res=48", "data.batch_size=8", "data.val_batch_size=8", "data.num_workers=0",
    "model.dim=32", "model.num_subspaces=4", "model.codebook_size=8", "loss.feature_samples=4",
    "loss.neg_samples=1", "eval.every=3", "eval.kmeans_baseline=false", "log.progress=false",
    "log.tensorboard=false",
]


def _tiny(tmp_path, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path / 'run'}", f"backbone.cache_dir={tmp_path / 'cache'}",
                              *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from equss.train import run

    tmp = tmp_path_factory.mktemp("trained")
    run(_tiny(tmp, "optim.max_steps=3"))
    return tmp


def _script(name, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("tamper", ["nan-codebook", "head-weight", "config"])
def test_7_tampered_checkpoint_is_an_error_naming_the_entry(trained, tmp_path, tamper):
    ckpt = torch.load(trained / "run" / "best.ckpt", weights_only=False)
    if tamper == "nan-codebook":
        ckpt["model"]["quantizer.codebook.codebooks"][0, 0, 0] = NAN
        entry = "model/quantizer.codebook.codebooks"
    elif tamper == "head-weight":
        next(v for k, v in ckpt["model"].items() if k.startswith("head.") and v.is_floating_point()).add_(1e-3)
        entry = "model/head."
    else:
        ckpt["config"]["model"]["quantizer"]["beta"] = 0.5
        entry = "config"
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointCorruptError, match=rf"{bad}.*entry '{entry}"):
        load_checkpoint(str(bad))


@pytest.mark.slow
def test_7_scripts_refuse_corrupt_and_truncated_checkpoints_in_one_line(trained, tmp_path):
    ckpt = torch.load(trained / "run" / "best.ckpt", weights_only=False)
    ckpt["model"]["quantizer.codebook.codebooks"][0, 0, 0] = NAN
    torch.save(ckpt, tmp_path / "bad.ckpt")
    assert "is corrupt" in _one_line_error(_script("eval.py", "--checkpoint", str(tmp_path / "bad.ckpt")))
    short = tmp_path / "short.ckpt"
    short.write_bytes((trained / "run" / "best.ckpt").read_bytes()[:100])
    assert str(short) in _one_line_error(_script("analyze.py", "--checkpoint", str(short)))


# ----------------------------------------------------------------------- 8: unknown keys everywhere
@pytest.mark.slow
def test_8_eval_and_analyze_reject_typo_overrides(trained):
    ckpt = str(trained / "run" / "best.ckpt")
    for script in ("eval.py", "analyze.py"):
        line = _one_line_error(_script(script, "--checkpoint", ckpt, "data.rooot=/x"))
        assert "data.rooot" in line and "root" in line, (script, line)


def test_8_unused_keys_are_gone():
    with pytest.raises(ConfigError, match=r"data\.synthetic\.res"):
        load_config(None, ["data.synthetic.res=64"])


# ------------------------------------------------------------------------- 9: compile and meta tensors
def _ops_pipeline(x, cb):
    codes, dist = equss.pq_assign(x, cb)
    q = equss.pq_gather(codes, cb)
    counts, sums = equss.pq_cluster_stats(x, codes, cb.shape[1])
    return q, dist, counts, sums


@pytest.mark.slow
def test_9_fullgraph_compile_of_the_ops_and_the_layer_equals_eager():
    torch._dynamo.reset()
    x, cb = torch.randn(64, 4, 8), torch.randn(4, 16, 8)
    for got, want in zip(torch.compile(_ops_pipeline, fullgraph=True)(x, cb), _ops_pipeline(x, cb)):
        torch.testing.assert_close(got, want)
    pq = ProductQuantizer(32, 4, 16, channel_dim=1)
    z = torch.randn(2, 32, 5, 5)
    pq(z)  # training mode: the first call initialises the codebooks (a data-dependent step)
    pq.eval()
    compiled = torch.compile(pq, fullgraph=True)
    got, want = compiled(z), pq(z)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.quantized, want.quantized)
    pq.train()
    got = torch.compile(pq, fullgraph=True)(z)
    assert torch.isfinite(got.loss)


def test_9_ops_and_layer_on_meta_tensors():
    x, cb = torch.empty(64, 4, 8, device="meta"), torch.empty(4, 16, 8, device="meta")
    codes = torch.empty(64, 4, dtype=torch.int32, device="meta")
    assert equss.pq_assign(x, cb)[0].shape == (64, 4)
    assert equss.pq_gather(codes, cb).shape == (64, 4, 8)
    assert equss.pq_cluster_stats(x, codes, 16)[1].shape == (4, 16, 8)
    assert equss.pq_assign_gather(x, cb, stats_x=x)[5].shape == (4, 16, 8)
    pq = ProductQuantizer(32, 4, 16, channel_dim=1, learning="ema").to("meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pq(torch.empty(2, 32, 5, 5, device="meta"))
    assert out.quantized.shape == (2, 32, 5, 5) and out.codes.shape == (2, 4, 5, 5)


# ------------------------------------------------------------------------------ 10: clear user errors
@pytest.mark.parametrize(
    "args, needle",
    [
        (["eval.every=0"], "eval.every"),
        (["optim.lr=abc"], "optim.lr"),
        (["--max-steps", "2", "data.rooot=/x"], "data.rooot"),
        (["data.dataset=cocostuff27", "data.root=/nowhere/coco", "backbone.name=demo", "backbone.weights=none"],
         "/nowhere/coco"),
        (["backbone.name=vit_small_patch16", "backbone.weights=/nowhere/dino.pth"], "/nowhere/dino.pth"),
    ],
    ids=["zero-every", "bad-float", "typo-after-option", "missing-dataset", "missing-weights"],
)
@pytest.mark.slow
def test_10_user_errors_are_one_line(tmp_path, args, needle):
    line = _one_line_error(_script("train.py", *args, f"output_dir={tmp_path}", f"backbone.cache_dir={tmp_path}"))
    assert needle in line, line


@pytest.mark.slow
def test_10_overrides_may_come_before_and_after_options(tmp_path):
    proc = _script("train.py", "optim.lr=1e-4", "--print-config", "seed=3")
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.0001" in proc.stdout and "seed: 3" in proc.stdout


def test_10_knn_k_larger_than_the_data_is_capped_with_a_notice(tmp_path, caplog):
    from equss.train import Trainer

    with caplog.at_level(logging.WARNING, logger="equss"):
        t = Trainer(_tiny(tmp_path, "data.synthetic.num_train=8", "data.knn_k=30", "optim.max_steps=1"))
    assert t.data.pairs.nns.shape[1] == 8
    assert any("data.knn_k=30" in r.message for r in caplog.records)


# ------------------------------------------------------------- 11: resume, temporaries, CRF fallbacks
def test_11_resume_leaves_no_duplicate_rows_and_no_stale_temporaries(tmp_path):
    from equss.train import Trainer

    Trainer(_tiny(tmp_path, "optim.max_steps=3")).fit()
    run = tmp_path / "run"
    log_path = run / "train_log.csv"
    rows = list(csv.reader(io.StringIO(log_path.read_text())))
    with open(log_path, "a", newline="") as fh:  # a run that logged steps 4-5, then died before a checkpoint
        csv.writer(fh).writerows([["4", *rows[1][1:]], ["5", *rows[1][1:]]])
    (run / ".tmp-last.ckpt-abc123").write_bytes(b"partial")  # killed mid-write
    Trainer(_tiny(tmp_path, "optim.max_steps=6"), resume=str(run / "last.ckpt")).fit()
    steps = [r["step"] for r in csv.DictReader(open(log_path))]
    assert steps == [str(i) for i in range(1, 7)]
    assert [r["step"] for r in csv.DictReader(open(run / "val_log.csv"))] == ["3", "6"]
    assert not list(run.glob(".tmp-*"))


def test_11_crf_on_nan_logits_counts_the_image_as_failed():
    from equss.crf import batched_crf

    images = [np.zeros((8, 8, 3), dtype=np.uint8) for _ in range(2)]
    logits = torch.randn(2, 3, 4, 4)
    logits[1, :, 2, 2] = NAN
    res = batched_crf(images, logits, processes=1, crf_fn=_identity_crf)
    assert res.failed == {1: "non-finite logits"} and torch.isfinite(res.probs).all()


def _identity_crf(image, probs):
    return probs

"""The GPU proof (``scripts/bench_gpu.sh``) cannot rot: its CPU rehearsal runs here, and its parts have
unit tests.

``test_rehearsal`` (slow, a few minutes) runs ``scripts/bench_gpu.sh --rehearse``: every stage on tiny
shapes with the Triton interpreter, in a venv holding only the GPU machine's packages plus the wheels
``scripts/gpu_wheels.sh`` downloads (installed the way the GPU machine installs them), over a copy of what
travels to the GPU machine. It fails on an import or collection error, a missing file, a failed test or
validation, or a stage over its share of the budget (``benchmarks/proof.py rehearsal_problems``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import proof  # noqa: E402
import report  # noqa: E402


# ------------------------------------------------------------------------------------------- budgets
def test_gpu_budgets_fit_nine_minutes():
    assert sum(row[2] for row in proof.STAGES) <= proof.TOTAL["gpu"] - 15  # bookkeeping between stages
    assert proof.TOTAL["gpu"] <= 540
    assert sum(row[3] for row in proof.STAGES) <= proof.TOTAL["rehearse"]


def test_script_header_lists_the_stage_table():
    """The budgets in bench_gpu.sh's header are the ones proof.py enforces."""
    text = (ROOT / "scripts" / "bench_gpu.sh").read_text()
    for name, letter, gpu, reh, _ in proof.STAGES:
        label = name if letter == "-" else f"{letter} {name}"
        assert re.search(rf"#\s+{re.escape(label)}\s+{gpu} /\s+{reh}\s", text), (name, gpu, reh)


def test_out_files_fit_what_comes_back():
    assert len(proof.OUT_FILES) <= proof.OUT_MAX_FILES
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in proof.OUT_FILES)


def test_out_dir_problems(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = proof.out_dir_problems(tmp_path)
    assert any("at most 8" in p for p in problems)
    assert any("bad name.txt" in p for p in problems)


def test_stage_problems_flags_failures_timeouts_and_unexpected_skips():
    def e(status, seconds=1.0, budget=10, note=""):
        return {"status": status, "rc": 0, "seconds": seconds, "budget_s": budget, "note": note}

    stages = {name: e("ok") for name, *_ in proof.STAGES}
    assert proof.stage_problems({"stages": stages}, {}) == []
    stages["build"] = e("failed")
    stages["bench"] = e("timeout")
    stages["large"] = e("skipped", note="budget: needs 55s, 3s left")
    stages["calibrate"] = e("skipped", note="scripts/kernel_model.py absent: no calibration table")
    stages["train"] = e("ok", seconds=11.0)
    problems = proof.stage_problems({"stages": stages}, {"calibrate": "absent"})
    assert len(problems) == 4, problems
    assert any("exceeds its budget" in p for p in problems)


def test_script_stops_an_overrunning_stage_and_skips_what_does_not_fit(tmp_path):
    """bench_gpu.sh's driver: a stage over its budget is stopped and recorded, the stages that no longer fit
    are skipped (never started), and every stage is in summary.json and report.md."""
    tree = tmp_path / "tree"
    proof.copy_tree(ROOT, tree)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EQUSS_", "TRITON_"))}
    env.update(EQUSS_PROOF_MODE="rehearse", OUT=str(tmp_path / "out"), EQUSS_PROOF_WORK=str(tmp_path / "work"),
               EQUSS_PROOF_SITE=str(tmp_path / "site"), EQUSS_PROOF_TOTAL="40", EQUSS_PROOF_BUDGET_wheels="30",
               EQUSS_PROOF_BUDGET_env="1", EQUSS_PROOF_BUDGET_calibrate="999")  # importing torch takes > 1 s
    p = subprocess.run(["bash", "scripts/bench_gpu.sh"], cwd=tree, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    stages = summary["stages"]
    assert stages["wheels"]["status"] in ("ok", "failed")  # failed where wheels/ was not downloaded
    assert stages["env"]["status"] == "timeout" and stages["env"]["seconds"] < 10
    for name in ("build", "correctness", "bench", "large", "train", "calibrate"):
        assert stages[name]["status"] == "skipped" and stages[name]["note"].startswith("budget:"), stages[name]
    assert "| env | timeout |" in (tmp_path / "out" / "report.md").read_text()
    assert "PROBLEM: stage env: timeout" in p.stdout
    assert proof.out_dir_problems(tmp_path / "out") == []


# -------------------------------------------------------------------------------- rehearsal helpers
def test_gpu_closure_holds_the_listed_packages_and_not_the_wheels():
    allowed, _, _ = proof.gpu_closure()
    assert {"torch", "pytest", "pytest-benchmark", "numpy"} <= set(allowed)
    assert not {"omegaconf", "vector-quantize-pytorch", "einx", "faiss-cpu", "pebble", "ninja"} & set(allowed)


def test_cuda_home_behind_a_wrapper_script(tmp_path):
    """``/usr/local/bin/nvcc`` may be a shell wrapper: CUDA_HOME must be the toolkit, not /usr/local."""
    real = subprocess.run(["bash", "-lc", "command -v nvcc"], capture_output=True, text=True).stdout.strip()
    if not real:
        pytest.skip("no nvcc here")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{wrapper.parent}:{os.environ['PATH']}")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "proof.py"), "cuda-home"], env=env,
                       capture_output=True, text=True, check=True)
    out = p.stdout.strip()
    assert "CUDA_HOME from nvcc's _HERE_" in p.stderr
    assert out and Path(out, "bin", "nvcc").exists() and Path(out) != tmp_path
    assert any(Path(out, d, "cuda_runtime_api.h").exists() for d in ("include", "targets/x86_64-linux/include"))


def test_plugin_orders_interleaves_caps_and_stops_at_the_deadline(tmp_path):
    (tmp_path / "test_a.py").write_text("import pytest\n@pytest.mark.parametrize('i', range(4))\ndef test_a(i): pass\n"
                                        "def test_first(): pass\n")
    (tmp_path / "test_b.py").write_text("def test_b1(): pass\ndef test_b2(): pass\n")
    result = tmp_path / "r.json"
    env = dict(os.environ, EQUSS_PROOF_RESULT=str(result), EQUSS_PROOF_PRIORITY="test_first",
               EQUSS_PROOF_INTERLEAVE="1", EQUSS_PROOF_MAX_TESTS="5", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "benchmarks.proof_plugin", "-p", "no:cacheprovider",
                        "-v", "test_a.py", "test_b.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    ran = re.findall(r"::(\w+(?:\[\d\])?) PASSED", p.stdout)
    assert ran == ["test_first", "test_b1", "test_a[0]", "test_b2", "test_a[1]"], p.stdout
    r = json.loads(result.read_text())
    assert r["passed"] == 5 and r["deselected_by_cap"] == 2 and r["collected"] == 7
    env.update(EQUSS_PROOF_DEADLINE="1", EQUSS_PROOF_MAX_TESTS="0")
    subprocess.run([sys.executable, "-m", "pytest", "-p", "benchmarks.proof_plugin", "-p", "no:cacheprovider",
                    "-q", "test_b.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    r = json.loads(result.read_text())
    assert r["budget_skipped"] == 2 and r["passed"] == 0


def test_bench_records_map_to_the_kernel_models_calibration_keys():
    """scripts/kernel_model.py --calibrate maps test_bench_gpu.py's records to its modelled ops by test
    name, backend, shape, dtype and do_bench_median_ms: the names and keys the harness writes."""
    if not (ROOT / "scripts" / "kernel_model.py").is_file():
        pytest.skip("scripts/kernel_model.py absent")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import kernel_model
    finally:
        sys.path.pop(0)

    def rec(test, backend, op):
        return {"name": f"{test}[{op}-equss_train-float32-{backend}]", "stats": {"median": 2e-4},
                "extra_info": {"backend": backend, "shape": "equss_train(N=25088,M=32,K=256,Ds=32)",
                               "dtype": "float32", "triton_precision": "ieee", "do_bench_median_ms": 0.1}}

    from benchmarks import test_bench_gpu as T

    for fn, op in ((T.test_assign, "assign_gather"), (T.test_ema_update, "ema_update")):
        (mark,) = [m for m in fn.pytestmark if m.name == "parametrize"]
        assert {c.op for c in mark.args[1]} == {op}
    measured = kernel_model.measured_times({"benchmarks": [
        rec("test_assign", "triton-fused", "assign_gather"), rec("test_ema_update", "triton", "ema_update")]})
    assert measured == {"op:pq_assign_gather@equss_train/fp32|ieee": 100.0,
                        "op:pq_cluster_stats+pq_ema_apply_@equss_train/fp32|ieee": 100.0}, measured


# --------------------------------------------------------------------------------------------- report
def _rec(op, backend, median, peak=100, shape="equss_train", dtype="float32", pct=None, validated=True):
    extra = {"op": op, "backend": backend, "shape": f"{shape}(...)", "shape_name": shape, "dtype": dtype,
             "device": "NVIDIA H100", "peak_memory_bytes": peak, "GBps": 1000.0, "TFLOPs": 10.0,
             "median_s": median, "matmul_precision": "fp32", "measured_peak_mm_TFLOPs": 50.0,
             "versions": {"torch": "2.11.0"}, "validated": validated}
    if pct is not None:
        extra["pct_of_roofline"] = pct
    return {"group": f"{op}-{shape}-{dtype}", "name": f"test_gpu_case[{op}-{backend}]",
            "stats": {"median": median * 1.1}, "extra_info": extra}


def test_report_tables_and_targets(tmp_path):
    """benchmarks/report.py: tables with every ratio and % of roofline, the targets met or not."""
    data = {
        "benchmarks": [
            _rec("assign_gather", "triton-fused", 1e-4, pct=60.0),
            _rec("assign_gather", "torch", 4e-4),
            _rec("assign_gather", "authors", 5e-3),
            _rec("module_step-ema", "triton", 1e-3, peak=2**20),
            _rec("module_step-ema", "vqp", 9e-3, peak=5 * 2**20),
            _rec("ema_update", "triton", 1e-4),
            _rec("ema_update", "authors", 4e-4, validated=False),
        ],
        "commit_info": {"id": "abcdef1234567"},
        "datetime": "now",
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    text = report.render([str(path)])
    assert "| torch | 0.400 | 4.0 |" in text  # do_bench's median_s, not pytest-benchmark's
    assert "| 60 |" in text and "fp32 (50.0)" in text
    assert "triton-fused vs torch, speed | 4.0× | ≥ 8× | **NOT met** |" in text
    assert "triton-fused vs authors, speed | 50.0× | ≥ 40× | met |" in text
    assert "triton vs vqp, speed | 9.0× | ≥ 8× | met |" in text
    assert "triton peak memory vs vqp | 1/5.0 | ≤ 1/4 | met |" in text
    assert "triton vs authors, speed | 4.0× | ≥ 5× | **NOT met** |" in text
    assert "| **NO** |" in text  # the unvalidated row is marked


def test_report_readme_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Benchmarks\n\nCPU table.\n\n## Next\n\ntext\n")
    data = tmp_path / "r.json"
    data.write_text(json.dumps({"benchmarks": [_rec("assign_gather", "triton-fused", 1e-4)]}))
    summary = tmp_path / "s.json"
    summary.write_text(json.dumps({"stages": {"env": {"status": "ok", "seconds": 3, "budget_s": 20}},
                                   "env": {"commit": "abc", "source_hash": "123"}}))
    for _ in range(2):  # idempotent: the second run replaces the block
        report.main([str(data), "--summary", str(summary), "--readme", str(readme)])
    doc = readme.read_text()
    assert doc.count(report.BEGIN) == 1 and doc.count(report.END) == 1
    assert doc.index("CPU table.") < doc.index(report.BEGIN) < doc.index(report.END) < doc.index("## Next")
    assert "### GPU benchmarks (NVIDIA H100)" in doc and "#### Targets" in doc and "| env | ok |" in doc


# ------------------------------------------------------------------------------------------ rehearsal
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_rehearsal(tmp_path):
    if not any((ROOT / "equss").glob("_C*.so")):
        pytest.skip("the rehearsal loads the built extension: pip install --no-build-isolation -e . first")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EQUSS_", "TRITON_"))}
    p = subprocess.run(["bash", "scripts/bench_gpu.sh", "--rehearse", "--dir", str(tmp_path / "r")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1400)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "rehearsal: " in out and "PASSED" in out, out[-8000:]

"""The GPU proof's bookkeeping (``scripts/bench_gpu.sh``) and its CPU rehearsal (``--rehearse``).

Standard library only at import time: the stage bookkeeping must work even where torch does not import.

Subcommands (``python3 benchmarks/proof.py CMD --help``):

* ``source-hash``: the hash of the sources that ``summary.json`` records (no .git may travel).
* ``budgets``: the stage table as shell assignments (``BUDGET_<stage>=<s>``, ``TOTAL=<s>``) for a mode.
* ``env``, ``backends``, ``cuda-home``, ``cuda-arch``, ``train``: what the stages measure or need.
* ``record``: one stage's outcome into ``$OUT/summary.json``, re-render ``$OUT/report.md``, mirror ``$OUT``
  into ``benchmarks/results/``; ``finish``: the closing table and the exit status.
* ``rehearse``: build the emulated GPU-machine environment, run the whole script there on CPU, check it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (stage, letter of the issue, budget on the GPU machine [s], budget in the CPU rehearsal [s], what it does)
STAGES = [
    ("wheels", "-", 15, 60, "install the carried wheels/ into the target directory (pip --no-index --target)"),
    ("env", "a", 20, 60, "environment: GPU, clocks, driver, versions, installed wheels"),
    ("build", "b", 135, 120, "build equss._C with CUDA (CUDA_HOME from nvcc, arch of the visible GPU)"),
    ("correctness", "c", 70, 150, "Triton, CUDA extension and torch reference against float64 (selected contract tests)"),
    ("bench", "d", 105, 240, "timings at the EQUSS shape, every implementation, validated"),
    ("large", "e", 50, 120, "timings at the large shape, our kernels and the torch reference"),
    ("train", "f", 70, 240, "scripts/train.py with the embedded default, timed"),
    ("calibrate", "g", 55, 120, "cost-model calibration table (scripts/kernel_model.py --calibrate), if it exists"),
]
TOTAL = {"gpu": 540, "rehearse": 1120}
# Files the script leaves in $OUT (the device tool returns at most 8, 16 MiB each, names [A-Za-z0-9._-]).
OUT_FILES = ("summary.json", "log.txt", "correctness.xml", "bench.json", "bench_large.json", "report.md",
             "calibration.md")
OUT_MAX_FILES, OUT_MAX_BYTES, TREE_MAX_BYTES = 8, 16 * 2**20, 64 * 2**20
SKIPPED_RC = 100  # a stage that decides not to run exits with this (e.g. calibrate without the model)

# The GPU machine's Python packages (the facts of the issue), the wheels add the rest.
GPU_PACKAGES = ("torch", "triton", "torchvision", "timm", "numpy", "scipy", "pytest", "pytest-benchmark",
                "pytest-timeout", "matplotlib", "pillow", "tqdm", "pyyaml", "einops", "scikit-image",
                "tensorboard", "pip", "setuptools")
GPU_PYTHON = "3.12"
WHEEL_MODULES = ("omegaconf", "antlr4", "vector_quantize_pytorch", "einx", "frozendict", "loguru",
                 "torch_einops_utils", "ninja")
CORRECTNESS_PRIORITY = ("random_data_is_optimal", "matches_float64", "well_separated_is_exact",
                        "equals_assign_gather_and_stats", "backward_matches_float64", "update_matches_float64",
                        "apply_fp32_against_float64", "forward_bit_exact", "invalid_rows")


def _json_load(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)


def _run(cmd: list[str], timeout: float = 30, **kw) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ budgets
def cmd_budgets(args) -> int:
    """``EQUSS_PROOF_TOTAL`` and ``EQUSS_PROOF_BUDGET_<stage>`` override the table (tests of the budget logic)."""
    col = 2 if args.mode == "gpu" else 3
    for row in STAGES:
        print(f"BUDGET_{row[0]}={int(os.environ.get(f'EQUSS_PROOF_BUDGET_{row[0]}', row[col]))}")
    print(f"TOTAL={int(os.environ.get('EQUSS_PROOF_TOTAL', TOTAL[args.mode]))}")
    print("STAGES='" + " ".join(r[0] for r in STAGES) + "'")
    return 0


# ---------------------------------------------------------------------------------------- commit id
def source_hash(root: Path = ROOT) -> str:
    """sha256 (12 hex) over the sources that decide the results (equss/, kernels/, csrc/, benchmarks/,
    scripts/, setup.py): identifies the tree where no .git travels."""
    h = hashlib.sha256()
    for top in ("equss", "kernels", "csrc", "benchmarks", "scripts", "tests"):
        base = root / top
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.suffix in (".py", ".cpp", ".cu", ".cuh", ".h", ".sh"):
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    for name in ("setup.py", "pyproject.toml"):
        if (root / name).is_file():
            h.update(name.encode() + b"\0" + (root / name).read_bytes())
    return h.hexdigest()[:12]


def commit_id(root: Path = ROOT) -> str:
    rc, out = _run(["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"], timeout=10)
    if rc == 0 and out:
        rc2, _ = _run(["git", "-C", str(root), "diff", "--quiet", "HEAD"], timeout=10)
        return out + ("-dirty" if rc2 != 0 else "")
    return os.environ.get("EQUSS_COMMIT") or "nogit"


# ------------------------------------------------------------------------------------------ measure
def cmd_env(args) -> int:
    """Everything about the machine the numbers depend on, into ``work/env.json``."""
    env: dict = {"mode": args.mode, "python": sys.version.split()[0], "executable": sys.executable,
                 "platform": sys.platform, "cpus": os.cpu_count(), "commit": commit_id(),
                 "source_hash": source_hash(), "hostname": os.uname().nodename}
    fields = ("name,driver_version,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,"
              "power.limit,temperature.gpu,memory.total,persistence_mode")
    if shutil.which("nvidia-smi"):
        rc, out = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"])
        env["nvidia_smi"] = out if rc == 0 else f"rc {rc}: {out[-500:]}"
        rc, out = _run(["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE"])  # throttle reasons, application clocks
        env["nvidia_smi_clocks"] = out[-4000:]
    else:
        env["nvidia_smi"] = "nvidia-smi not on PATH"
    nvcc = shutil.which("nvcc")
    env["nvcc"] = {"path": nvcc, "version": _run([nvcc, "--version"])[1].splitlines()[-1] if nvcc else None}
    for tool in ("ncu", "cuobjdump", "nvdisasm", "ninja", "c++"):
        env.setdefault("tools", {})[tool] = shutil.which(tool)
    try:
        import torch

        env["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "cuda_available": torch.cuda.is_available(),
                        "allow_tf32": torch.backends.cuda.matmul.allow_tf32}
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                          "memory_GiB": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    except Exception as exc:
        env["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
    from importlib import metadata

    versions = {}
    for name in (*GPU_PACKAGES, "omegaconf", "antlr4-python3-runtime", "vector-quantize-pytorch", "einx",
                 "frozendict", "loguru", "torch-einops-utils", "ninja"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env["packages"] = versions
    site = Path(os.environ.get("EQUSS_PROOF_SITE", "/tmp/site"))
    wheels = {}
    for mod in WHEEL_MODULES:
        try:
            m = __import__(mod)
            where = str(Path(m.__file__).resolve()) if getattr(m, "__file__", None) else "?"
            wheels[mod] = {"ok": True, "from_wheel": where.startswith(str(site.resolve())), "file": where}
        except Exception as exc:
            wheels[mod] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    env["wheels"] = {"site": str(site), "installed": sorted(p.name for p in site.glob("*.dist-info")),
                     "imports": wheels}
    env["environment"] = {k: v for k, v in os.environ.items()
                          if k.startswith(("EQUSS_", "TRITON_", "CUDA_", "TORCH_")) or k in ("PATH", "PYTHONPATH")}
    _write_json(Path(args.work) / "env.json", env)
    print(json.dumps({k: env[k] for k in ("python", "commit", "nvidia_smi", "nvcc", "torch")}, indent=1))
    bad = [m for m, w in wheels.items() if not w["ok"]]
    if bad:
        print(f"not importable: {', '.join(bad)} (are the wheels installed?)", file=sys.stderr)
        return 1
    return 0


def cmd_cuda_home(args) -> int:
    """CUDA_HOME of the ``nvcc`` on PATH: nvcc's own ``_HERE_`` (its bin directory, also behind a
    wrapper script such as /usr/local/bin/nvcc), else two levels above the resolved binary. Prints nothing
    without nvcc."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return 0
    import tempfile

    candidates = []
    with tempfile.TemporaryDirectory() as tmp:  # --dryrun prints nvcc's environment and runs nothing
        src = Path(tmp) / "probe.cu"
        src.write_text("")
        rc, out = _run([nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")], timeout=60)
    for line in out.splitlines():
        m = re.match(r"#\$ _HERE_=(.+)", line.strip())
        if m:
            candidates.append(("nvcc's _HERE_", Path(m.group(1).strip()).parent))
    candidates.append(("the resolved nvcc binary", Path(nvcc).resolve().parent.parent))
    candidates.append(("the default location", Path("/usr/local/cuda")))
    for how, c in candidates:
        if (c / "bin" / "nvcc").exists() and any((c / d / "cuda_runtime_api.h").exists()
                                                  for d in ("include", "targets/x86_64-linux/include")):
            print(c.resolve())
            print(f"CUDA_HOME from {how}", file=sys.stderr)
            return 0
    print(f"nvcc at {nvcc} but no CUDA toolkit directory with include/cuda_runtime_api.h among "
          f"{[str(c) for _, c in candidates]}", file=sys.stderr)
    return 1


def cmd_cuda_arch(args) -> int:
    """The visible GPUs' compute capabilities (``9.0``); ``--default`` without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            caps = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
            print(";".join(caps))
            return 0
    except Exception as exc:
        print(f"torch: {exc}", file=sys.stderr)
    print(args.default)
    return 0


def cmd_backends(args) -> int:
    """After the build: which backends loaded and on which devices, into ``work/build.json``."""
    import equss
    from equss import backends

    info = {n: {"loaded": backends.info(n).loaded, "devices": list(backends.info(n).devices),
                "detail": backends.info(n).detail} for n in backends.BACKENDS}
    lib = backends.extension_library_path()
    data = {"describe": backends.describe(), "backends": info, "library": lib,
            "library_bytes": os.path.getsize(lib) if lib else None, "equss": equss.__file__}
    prev = _json_load(Path(args.work) / "build.json", {}) or {}
    prev.update(data)
    _write_json(Path(args.work) / "build.json", prev)
    print(data["describe"])
    return 0


def cmd_train(args) -> int:
    """``scripts/train.py ARGS`` timed, its results.json into ``work/train.json``."""
    out_dir = Path(args.work) / "train"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, "scripts/train.py", "--output-dir", str(out_dir), *args.train_args]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    data = {"command": cmd, "rc": rc, "seconds": round(time.time() - t0, 1)}
    res = _json_load(out_dir / "results.json")
    if res is not None:
        data["results"] = res
    md = out_dir / "results.md"
    if md.is_file():
        data["results_md"] = md.read_text(encoding="utf-8")[:4000]
    _write_json(Path(args.work) / "train.json", data)
    print(f"train.py: rc {rc} in {data['seconds']} s; results.json {'found' if res is not None else 'MISSING'}")
    return rc if rc else (0 if res is not None else 1)


# ---------------------------------------------------------------------------------------- recording
def _summary_path(args) -> Path:
    return Path(args.out) / "summary.json"


def cmd_record(args) -> int:
    out, work = Path(args.out), Path(args.work)
    if args.millis is not None:
        args.seconds = args.millis / 1000
    summary = _json_load(_summary_path(args)) or {"mode": args.mode, "total_budget_s": TOTAL[args.mode],
                                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                  "stages": {}, "stage_table": [list(r) for r in STAGES]}
    if args.status:
        status = args.status
    elif args.rc == 0:
        status = "ok"
    elif args.rc == SKIPPED_RC:
        status = "skipped"
    elif args.rc in (124, 137):
        status = "timeout"
    else:
        status = "failed"
    entry = {"status": status, "rc": args.rc, "seconds": round(args.seconds, 1), "budget_s": args.budget,
             "note": args.note}
    if args.log and Path(args.log).is_file():
        tail = Path(args.log).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        if status != "ok":
            entry["log_tail"] = tail
        if status == "skipped" and not args.note and tail:
            entry["note"] = tail[-1]
    summary["stages"][args.stage] = entry
    detail = _json_load(work / f"{args.stage}.json")
    if detail is not None:
        summary[args.stage] = detail
    summary["elapsed_s"] = round(time.time() - float(os.environ.get("EQUSS_PROOF_START", time.time())), 1)
    _write_json(_summary_path(args), summary)
    _render_report(out, summary)
    _mirror(out, summary)
    print(f"=== [{args.stage}] {status} in {entry['seconds']:.0f}s (budget {args.budget}s)"
          + (f": {entry['note']}" if entry.get("note") else ""), flush=True)
    return 0


def _report_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report  # benchmarks/report.py (stdlib only)
    finally:
        sys.path.pop(0)
    return report


def _render_report(out: Path, summary: dict) -> None:
    paths = [str(out / n) for n in ("bench.json", "bench_large.json") if (out / n).is_file()]
    try:
        text = _report_module().render(paths, summary=summary)
    except Exception as exc:  # a report bug must not lose the stage records
        text = f"report.py failed: {type(exc).__name__}: {exc}\n"
    (out / "report.md").write_text(text, encoding="utf-8")


def _mirror(out: Path, summary: dict) -> None:
    """Copy $OUT into benchmarks/results/proof-<device>-<commit>/ (persistent where the tree is; not for
    the rehearsal, whose $OUT is its result)."""
    if summary.get("mode") == "rehearse":
        return
    env = summary.get("env") or {}
    device = (env.get("gpu") or {}).get("name") or ("cpu-rehearsal" if summary.get("mode") == "rehearse" else "gpu")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{device}-{env.get('commit', 'nocommit')}").strip("-")
    dest = ROOT / "benchmarks" / "results" / f"proof-{slug}"
    if dest.resolve() == out.resolve():
        return
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for f in out.iterdir():
            if f.is_file():
                shutil.copy2(f, dest / f.name)
    except OSError as exc:
        print(f"could not mirror {out} to {dest}: {exc}", file=sys.stderr)


def stage_problems(summary: dict, allowed_skips: dict[str, str]) -> list[str]:
    """Stages not ok: failed, timed out, or skipped for a reason not in ``allowed_skips`` (stage → substring)."""
    problems = []
    for name, *_ in STAGES:
        e = summary.get("stages", {}).get(name)
        if e is None:
            problems.append(f"stage {name}: never recorded")
        elif e["status"] == "skipped":
            if allowed_skips.get(name, "\0") not in (e.get("note") or ""):
                problems.append(f"stage {name}: skipped ({e.get('note')})")
        elif e["status"] != "ok":
            problems.append(f"stage {name}: {e['status']} (rc {e['rc']}, {e['seconds']}s of {e['budget_s']}s)"
                            + (": " + " | ".join(e.get("log_tail", [])[-3:]) if e.get("log_tail") else ""))
        elif e["seconds"] > e["budget_s"]:
            problems.append(f"stage {name}: {e['seconds']}s exceeds its budget of {e['budget_s']}s")
    return problems


def test_stage_problems(summary: dict, stage: str, allow_skips: bool) -> list[str]:
    r = summary.get(stage)
    if r is None:
        return [f"{stage}: no pytest result"]
    out = [f"{stage}: collection error {e}" for e in r.get("collection_errors", [])]
    out += [f"{stage}: failed {e}" for e in r.get("failed", [])]
    out += [f"{stage}: error {e}" for e in r.get("errors", [])]
    if r.get("budget_skipped"):
        out.append(f"{stage}: {r['budget_skipped']} tests skipped because the stage's budget ran out")
    if not r.get("passed"):
        out.append(f"{stage}: no test passed")
    if not allow_skips and r.get("skipped"):
        out += [f"{stage}: {n} skipped: {why}" for why, n in r["skipped"].items()]
    return out


def out_dir_problems(out: Path) -> list[str]:
    problems = []
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > OUT_MAX_FILES:
        problems.append(f"$OUT holds {len(files)} files; the device tool returns at most {OUT_MAX_FILES}")
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) > 3 or not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts):
            problems.append(f"$OUT/{rel}: name or depth that does not come back")
        if p.stat().st_size > OUT_MAX_BYTES:
            problems.append(f"$OUT/{rel}: {p.stat().st_size} bytes, over the 16 MiB that come back")
    return problems


def cmd_finish(args) -> int:
    summary = _json_load(_summary_path(args)) or {}
    rows = ["| stage | | status | seconds | budget | note |", "| --- | --- | --- | ---: | ---: | --- |"]
    for name, letter, *_ in STAGES:
        e = summary.get("stages", {}).get(name, {})
        rows.append(f"| {name} | {letter} | {e.get('status', '–')} | {e.get('seconds', '–')} | "
                    f"{e.get('budget_s', '–')} | {(e.get('note') or '')[:90]} |")
    print("\n".join(rows))
    print(f"elapsed {summary.get('elapsed_s')}s of {summary.get('total_budget_s')}s; results in {args.out}: "
          + ", ".join(f"{p.name} ({p.stat().st_size // 1024} KiB)" for p in sorted(Path(args.out).iterdir()) if p.is_file()))
    report = Path(args.out) / "report.md"
    if report.is_file():
        text = report.read_text(encoding="utf-8")
        i = text.find("### Targets")
        if i >= 0:
            print(text[i:].split("\n### ", 2)[0][:3000])
    problems = stage_problems(summary, {"calibrate": "absent"}) + out_dir_problems(Path(args.out))
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------- rehearsal
def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_closure(packages=GPU_PACKAGES, python_version: str = GPU_PYTHON):
    """The installed distributions of ``packages`` and of everything they require (markers evaluated for
    the GPU machine's Python), and the names not installed here."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement

    installed = {}
    for d in metadata.distributions():
        installed.setdefault(_canon(d.metadata["Name"]), d)
    marker_env = {"python_version": python_version, "python_full_version": python_version + ".3", "extra": ""}
    allowed, missing, queue = {}, set(), [_canon(p) for p in packages]
    while queue:
        name = queue.pop()
        if name in allowed or name in missing:
            continue
        if name not in installed:
            missing.add(name)
            continue
        d = allowed[name] = installed[name]
        for spec in d.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(marker_env):
                queue.append(_canon(req.name))
    return allowed, installed, sorted(missing)


def _tops(dist) -> set[str]:
    files = dist.files
    if files is None:  # no RECORD: top_level.txt and the metadata directory
        tops = set((dist.read_text("top_level.txt") or "").split())
        tops.add(Path(str(dist._path)).name)  # noqa: SLF001 (importlib.metadata has no public path)
        return tops
    return {str(f).split("/")[0] for f in files if not str(f).startswith("..")}


def build_farm(site_src: Path, site_dst: Path, allowed: dict, installed: dict) -> dict:
    """Symlink the allowed distributions' files from ``site_src`` into ``site_dst``. A top-level entry that
    only allowed distributions own is linked whole; one shared with others (namespace directories) is
    made a directory and linked one level down per owning file."""
    owners: dict[str, set[str]] = {}
    for name, d in installed.items():
        try:
            if Path(str(d.locate_file(""))).resolve() != site_src.resolve():
                continue
        except Exception:
            continue
        for top in _tops(d):
            owners.setdefault(top, set()).add(name)
    linked, partial = 0, 0
    for d in allowed.values():
        if Path(str(d.locate_file(""))).resolve() != site_src.resolve():
            continue
        for top in _tops(d):
            src, dst = site_src / top, site_dst / top
            if not src.exists():
                continue
            if owners.get(top, set()) <= set(allowed) or not src.is_dir():
                if not (dst.exists() or dst.is_symlink()):
                    dst.symlink_to(src)
                    linked += 1
                continue
            if not dst.exists():
                dst.mkdir()
                partial += 1
            for f in d.files or []:
                parts = Path(str(f)).parts
                if parts[0] != top or len(parts) < 2:
                    continue
                s2, d2 = src / parts[1], dst / parts[1]
                if s2.exists() and not (d2.exists() or d2.is_symlink()):
                    d2.symlink_to(s2)
    return {"linked": linked, "partial_dirs": partial}


STUB = "#!/bin/sh\necho \"{name}: {why}\" >&2\nexit 127\n"

FAKE_COMPILER = r"""#!/usr/bin/env bash
# Rehearsal stand-in for {real}: compiling (-c) or linking (-shared) only creates the outputs (and the
# dependency files ninja reads); anything else (--version, -dM -E, ...) runs the real tool.
out=""; dep=""; compile=0; args=("$@")
for ((i = 0; i < ${{#args[@]}}; i++)); do
  case "${{args[i]}}" in
    -o) out=${{args[i+1]}} ;;
    -MF|--dependency-output) dep=${{args[i+1]}} ;;
    -c|-shared|--shared) compile=1 ;;
  esac
done
if [ "$compile" = 1 ] && [ -n "$out" ]; then
  mkdir -p "$(dirname "$out")"; : > "$out"
  [ -n "$dep" ] && echo "$out:" > "$dep"
  echo "[rehearsal] $(basename "$0") -> $out" >&2
  exit 0
fi
exec {real} "$@"
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


def make_env(r: Path) -> dict:
    """The emulated GPU machine under ``r``: a venv holding only the GPU packages' closure (symlinked from
    this interpreter's site-packages), ``python`` and ``ninja`` missing, and a toolchain whose compiler and
    nvcc only pretend to compile (two cores cannot build the CUDA extension in a rehearsal)."""
    import sysconfig

    venv = r / "venv"
    allowed, installed, missing = gpu_closure()
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_dst = Path(subprocess.check_output(
        [str(venv / "bin" / "python3"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())
    farm = build_farm(Path(sysconfig.get_paths()["purelib"]), site_dst, allowed, installed)
    real_python = Path(os.path.realpath(venv / "bin" / "python3"))
    for name in ("python", "python3"):
        (venv / "bin" / name).unlink(missing_ok=True)
    (venv / "bin" / "python3").symlink_to(real_python)
    _write_exe(venv / "bin" / "python", STUB.format(name="python", why="not on the GPU machine: use python3"))
    _write_exe(venv / "bin" / "ninja", STUB.format(name="ninja", why="not on the GPU machine: the ninja wheel brings it"))
    tool = r / "toolchain"
    shutil.rmtree(tool, ignore_errors=True)
    (tool / "bin").mkdir(parents=True)
    compilers = {}
    for cc in ("c++", "cc", "gcc", "g++"):
        real = shutil.which(cc)
        if real:
            _write_exe(tool / "bin" / cc, FAKE_COMPILER.format(real=real))
            compilers[cc] = str(tool / "bin" / cc)
    nvcc_real = shutil.which("nvcc")
    cuda = None
    if nvcc_real:
        home = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "proof.py"), "cuda-home", "--out", str(r),
                               "--work", str(r)], capture_output=True, text=True).stdout.strip()
        if home:
            cuda = tool / "cuda"
            (cuda / "bin").mkdir(parents=True)
            for sub in ("include", "lib64", "lib", "targets", "nvvm"):
                if (Path(home) / sub).exists():
                    (cuda / sub).symlink_to(Path(home) / sub)
            _write_exe(cuda / "bin" / "nvcc", FAKE_COMPILER.format(real=nvcc_real))
    return {"venv": str(venv), "packages": sorted(allowed), "not_installed_here": missing, "farm": farm,
            "compilers": compilers, "cuda": str(cuda) if cuda else None}


def copy_tree(src: Path, dst: Path) -> int:
    """What travels to the GPU machine: tracked and untracked-not-ignored files (no .git), plus wheels/."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    listed = subprocess.check_output(["git", "-C", str(src), "ls-files", "-z", "--cached", "--others",
                                      "--exclude-standard"]).decode().split("\0")
    paths = [p for p in listed if p] + [str(p.relative_to(src)) for p in sorted((src / "wheels").glob("*.whl"))]
    total = 0
    for rel in paths:
        s, d = src / rel, dst / rel
        if not (s.exists() or s.is_symlink()):
            continue  # deleted in the work tree, not committed yet
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_symlink():
            d.symlink_to(os.readlink(s))
        else:
            shutil.copy2(s, d)
            total += s.stat().st_size
    return total


def rehearsal_problems(r: Path, rc: int, tree_bytes: int, setup: dict) -> list[str]:
    out = r / "out"
    summary = _json_load(out / "summary.json")
    if summary is None:
        return [f"no $OUT/summary.json (script rc {rc})"]
    problems = [] if rc == 0 else [f"scripts/bench_gpu.sh exited {rc}"]
    problems += stage_problems(summary, {"calibrate": "absent"})
    problems += test_stage_problems(summary, "correctness", allow_skips=False)
    for stage in ("bench", "large"):
        problems += test_stage_problems(summary, stage, allow_skips=False)
        bench = _json_load(out / ("bench.json" if stage == "bench" else "bench_large.json"))
        if bench is None:
            problems.append(f"{stage}: no pytest-benchmark JSON in $OUT")
            continue
        recs = bench.get("benchmarks", [])
        selected = (summary.get(stage) or {}).get("selected")
        if len(recs) != selected:
            problems.append(f"{stage}: {len(recs)} benchmark records for {selected} selected cases")
        problems += [f"{stage}: {b['name']} not validated: {b.get('extra_info', {}).get('validation')}"
                     for b in recs if not b.get("extra_info", {}).get("validated")]
    for name in ("summary.json", "log.txt", "correctness.xml", "bench.json", "bench_large.json", "report.md"):
        if not (out / name).is_file():
            problems.append(f"$OUT/{name} missing")
    problems += out_dir_problems(out)
    log = (out / "log.txt").read_text(encoding="utf-8", errors="replace") if (out / "log.txt").is_file() else ""
    for pattern in ("ModuleNotFoundError", "ImportError", "command not found", "No such file or directory",
                    "not on the GPU machine", "could not find ninja"):
        hits = [line for line in log.splitlines() if pattern in line]
        if hits:
            problems.append(f"log: {len(hits)}× {pattern!r}, first: {hits[0].strip()[:200]}")
    build = summary.get("build") or {}
    if not (build.get("backends", {}).get("ext", {}).get("loaded")):
        problems.append(f"build: the extension did not load: {build.get('backends', {}).get('ext')}")
    if setup.get("cuda") and "building CPU + CUDA extension" not in log:
        problems.append("build: setup.py did not take the CUDA path although nvcc is on PATH")
    if not re.search(r"^\[1/\d+\] ", log, flags=re.M) or "could not find ninja" in log:
        problems.append("build: torch's builder did not use ninja (no ninja progress lines in the log)")
    env = summary.get("env") or {}
    for mod, w in (env.get("wheels", {}).get("imports") or {}).items():
        if not (w.get("ok") and w.get("from_wheel")):
            problems.append(f"wheels: {mod} does not import from the installed wheels: {w}")
    train = summary.get("train") or {}
    if not train.get("results"):
        problems.append("train: no results.json")
    report = (out / "report.md").read_text(encoding="utf-8") if (out / "report.md").is_file() else ""
    for needle in ("## GPU benchmarks", "### Targets", "### Proof stages"):
        if needle not in report:
            problems.append(f"report.md lacks {needle!r}")
    if tree_bytes > TREE_MAX_BYTES:
        problems.append(f"the travelling tree is {tree_bytes / 2**20:.1f} MiB, over 64 MiB")
    return problems


def cmd_rehearse(args) -> int:
    t0 = time.time()
    r = Path(args.dir or os.environ.get("EQUSS_REHEARSE_DIR") or "/tmp/equss-rehearse").resolve()
    r.mkdir(parents=True, exist_ok=True)
    prebuilt = Path(args.prebuilt or os.environ.get("EQUSS_REHEARSE_PREBUILT") or ROOT / "equss" / "_C.so")
    if not prebuilt.is_file():
        print(f"rehearsal: no built extension at {prebuilt} (pip install --no-build-isolation -e . first); the "
              "rehearsal pretends to compile and loads this library instead", file=sys.stderr)
        return 3
    print(f"rehearsal in {r}", flush=True)
    rc = subprocess.call(["bash", str(ROOT / "scripts" / "gpu_wheels.sh")], cwd=ROOT)
    if rc != 0:
        print("rehearsal: scripts/gpu_wheels.sh failed", file=sys.stderr)
        return rc
    tree = r / "tree"
    tree_bytes = copy_tree(ROOT, tree)
    print(f"travelling tree: {tree_bytes / 2**20:.2f} MiB (limit 64 MiB)", flush=True)
    setup = make_env(r)
    print(f"emulated environment: {len(setup['packages'])} distributions (closure of the GPU machine's list for "
          f"Python {GPU_PYTHON}); not installed here: {', '.join(setup['not_installed_here']) or 'none'}; "
          f"farm {setup['farm']}; fake nvcc: {setup['cuda'] or 'none (no nvcc here)'}", flush=True)
    for sub in ("out", "work", "site", "home"):
        shutil.rmtree(r / sub, ignore_errors=True)
        (r / sub).mkdir()
    path = [str(r / "toolchain" / "cuda" / "bin")] if setup["cuda"] else []
    path += [str(r / "toolchain" / "bin"), str(Path(setup["venv"]) / "bin"),
             "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    env = {"PATH": ":".join(path), "HOME": str(r / "home"), "LANG": os.environ.get("LANG", "C.UTF-8"),
           "OUT": str(r / "out"), "EQUSS_PROOF_MODE": "rehearse", "EQUSS_PROOF_WORK": str(r / "work"),
           "EQUSS_PROOF_SITE": str(r / "site"), "EQUSS_REHEARSE_PREBUILT": str(prebuilt),
           "EQUSS_COMMIT": commit_id(), "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    for var in ("CC", "CXX", "LDSHARED", "LDCXXSHARED"):
        cc = setup["compilers"].get("c++" if var in ("CXX", "LDCXXSHARED") else "cc") or setup["compilers"].get("c++")
        if cc:
            env[var] = cc + (" -shared" if var.startswith("LD") else "")
    rc = subprocess.call(["bash", "scripts/bench_gpu.sh"], cwd=tree, env=env)
    problems = rehearsal_problems(r, rc, tree_bytes, setup)
    print(f"\nrehearsal: {time.time() - t0:.0f}s; " + ("PASSED" if not problems else f"{len(problems)} problems"))
    for p in problems:
        print("REHEARSAL PROBLEM:", p)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, fn, **kw):
        s = sub.add_parser(name, **kw)
        s.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results" / "proof-out")))
        s.add_argument("--work", default=os.environ.get("EQUSS_PROOF_WORK", "/tmp/equss-proof"))
        s.add_argument("--mode", default=os.environ.get("EQUSS_PROOF_MODE", "gpu"), choices=sorted(TOTAL))
        s.set_defaults(fn=fn)
        return s

    add("budgets", cmd_budgets)
    add("source-hash", lambda a: print(source_hash()) or 0, help="the source hash summary.json records (match a GPU run to a tree)")
    add("env", cmd_env)
    add("cuda-home", cmd_cuda_home)
    add("cuda-arch", cmd_cuda_arch).add_argument("--default", default="9.0")
    add("backends", cmd_backends)
    add("train", cmd_train, help="proof.py train [--work DIR] -- TRAIN.PY ARGS")
    s = add("record", cmd_record)
    s.add_argument("--stage", required=True)
    s.add_argument("--rc", type=int, default=0)
    s.add_argument("--status", default=None)
    s.add_argument("--seconds", type=float, default=0.0)
    s.add_argument("--millis", type=int, default=None, help="the stage's duration in ms (instead of --seconds)")
    s.add_argument("--budget", type=int, default=0)
    s.add_argument("--note", default="")
    s.add_argument("--log", default=None)
    add("finish", cmd_finish)
    s = add("rehearse", cmd_rehearse)
    s.add_argument("--dir", default=None, help="work directory (default $EQUSS_REHEARSE_DIR or /tmp/equss-rehearse)")
    s.add_argument("--prebuilt", default=None, help="the built equss/_C.so the rehearsal loads (default: this tree's)")
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.train_args = rest
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The GPU proof: one command for a briefly lent, offline GPU machine (H100/H200), ≤ 9 minutes in all.
#
#   scripts/bench_gpu.sh              # on the GPU machine, from the repository root (device tool: carry=["wheels"])
#   scripts/bench_gpu.sh --rehearse   # here, on CPU: the same stages on tiny shapes in an emulated GPU machine
#
# Before: scripts/gpu_wheels.sh (here, with a registry) puts the wheels the GPU machine lacks into wheels/.
# The device tool's call (wheels/ is git-ignored, so it must be carried; no .git may travel, so pass the
# commit literally; `python3 benchmarks/proof.py source-hash` here matches summary.json's source hash):
#   run(command="EQUSS_COMMIT=<git rev-parse --short=10 HEAD> bash scripts/bench_gpu.sh", carry=["wheels"], timeout_s=600)
#
# Ordered stages, each under its own time budget (benchmarks/proof.py STAGES; GPU / rehearsal seconds).
# A stage that does not fit the time left is skipped, never started; one that overruns is stopped. After
# every stage its results are in $OUT (and benchmarks/results/proof-<device>-<commit>/), so a stop at any
# point returns everything done so far:
#   wheels        15 /  60  pip install --no-index --no-deps --target $EQUSS_PROOF_SITE (/tmp/site) wheels/*.whl
#   a env         20 /  60  GPU, clocks, driver, versions, which wheels import from where
#   b build      135 / 120  equss._C with CUDA: CUDA_HOME from nvcc, arch of the visible GPU, ninja from the
#                           wheel; on failure the later stages run without it (why: summary.json "build")
#   c correctness 70 / 150  Triton, CUDA extension, torch reference against float64: the contract tests of
#                           tests/test_pq_*.py and tests/test_triton.py, -k "triton or ext-cuda", float64
#                           cases first, files interleaved, stopped by the budget (never the full suite)
#   d bench      105 / 240  EQUSS shape (N=25,088, M=32, K=256, Ds=32): every op and implementation, validated,
#                           do_bench medians, % of roofline at the precision used, peak memory
#   e large       50 / 120  N=10^6, M=64, K=1024, Ds=32: our kernels and the torch reference, 5 calls a row
#   f train       70 / 240  scripts/train.py, embedded default, on the GPU, timed
#   g calibrate   55 / 120  scripts/kernel_model.py --calibrate (bench + large records) --gpu <this GPU>:
#                           the static cost model's predictions against the measured times (skipped,
#                           and said so, if the model is absent; it needs no GPU, so it can be redone here)
# Total budget 540 s on the GPU machine (the whole lease is ~15 min including its start).
#
# $OUT (at most 8 files come back): summary.json (stages, env, build, test outcomes, train), log.txt (all
# output), correctness.xml (JUnit), bench.json and bench_large.json (pytest-benchmark), report.md
# (benchmarks/report.py: tables and targets; apply to the README here with
# `python benchmarks/report.py bench.json bench_large.json --summary summary.json --readme README.md`),
# calibration.md. Exit status: 0 if every stage passed, 1 otherwise (the files come back either way).
#
# Environment: OUT (default benchmarks/results/proof-out), EQUSS_PROOF_WORK (scratch, /tmp/equss-proof),
# EQUSS_PROOF_SITE (wheel target, /tmp/site), EQUSS_COMMIT (recorded where no .git travels),
# EQUSS_TRITON_PRECISION (exact | ieee | tf32x3 | tf32; recorded), EQUSS_PROOF_MODE (gpu | rehearse; set by
# --rehearse). Only python3 is called (the GPU machine may have no `python`).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=python3

if [ "${1:-}" = "--rehearse" ]; then
  shift
  exec "$PY" benchmarks/proof.py rehearse "$@"
fi

export EQUSS_PROOF_MODE=${EQUSS_PROOF_MODE:-gpu}
MODE=$EQUSS_PROOF_MODE
export OUT=${OUT:-$ROOT/benchmarks/results/proof-out}
export EQUSS_PROOF_WORK=${EQUSS_PROOF_WORK:-/tmp/equss-proof}
export EQUSS_PROOF_SITE=${EQUSS_PROOF_SITE:-/tmp/site}
WORK=$EQUSS_PROOF_WORK
SITE=$EQUSS_PROOF_SITE
LOG=$OUT/log.txt
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ "$MODE" = rehearse ]; then
  export TRITON_INTERPRET=1 EQUSS_BENCH_DEVICE=cpu
  SHAPES_BENCH=tiny SHAPES_LARGE=tiny_large DEVICE=cpu
else
  SHAPES_BENCH=equss_train SHAPES_LARGE=large DEVICE=cuda
fi
eval "$("$PY" benchmarks/proof.py budgets --mode "$MODE")"  # BUDGET_<stage>, TOTAL, STAGES
proof() { "$PY" benchmarks/proof.py "$@"; }
pytest_stage() {  # NAME MARGIN_S pytest-args...: pytest with the proof plugin, stopping MARGIN_S before the budget
  local name=$1 margin=$2; shift 2
  EQUSS_PROOF_RESULT="$WORK/$name.json" EQUSS_PROOF_DEADLINE=$((STAGE_DEADLINE - margin)) \
    "$PY" -m pytest -p benchmarks.proof_plugin -p no:cacheprovider -q -rfE "$@"
}

# ------------------------------------------------------------------------------------------- stages
stage_wheels() {
  if ! ls wheels/*.whl >/dev/null 2>&1; then
    echo "no wheels/*.whl in the tree: run scripts/gpu_wheels.sh here and give the device tool carry=[\"wheels\"]"
    return 1
  fi
  [ "$MODE" = rehearse ] && rm -rf "$SITE"
  ls -l wheels/
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
    --target "$SITE" wheels/*.whl
}

stage_env() {
  proof env
}

stage_build() {
  local cuda_home arch
  cuda_home=$(proof cuda-home)
  arch=$(proof cuda-arch --default 9.0)
  rm -f equss/_C*.so
  if [ -n "$cuda_home" ]; then
    echo "CUDA_HOME=$cuda_home (from nvcc at $(command -v nvcc)); archs $arch; $(nproc) jobs"
    export CUDA_HOME=$cuda_home EQUSS_CUDA_ARCHS=$arch EQUSS_BUILD_CUDA=1
  else
    echo "no nvcc on PATH: building the CPU library only (every CUDA-extension row will skip)"
    export EQUSS_BUILD_CUDA=0
  fi
  local rc=0
  MAX_JOBS=$(nproc) "$PY" setup.py build_ext --inplace || rc=$?
  if [ "$MODE" = rehearse ]; then
    # the toolchain only pretended to compile: load the library built for this tree instead
    echo "rehearsal: replacing the stand-in library with $EQUSS_REHEARSE_PREBUILT"
    cp "$EQUSS_REHEARSE_PREBUILT" equss/_C.so
  fi
  proof backends
  [ "$rc" = 0 ] || echo "BUILD FAILED (rc $rc): the later stages run without the extension"
  return "$rc"
}

stage_correctness() {
  export EQUSS_PROOF_INTERLEAVE=1 EQUSS_PROOF_PRIORITY
  EQUSS_PROOF_PRIORITY=$("$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import proof; print(','.join(proof.CORRECTNESS_PRIORITY))")
  [ "$MODE" = rehearse ] && export EQUSS_PROOF_MAX_TESTS=14
  pytest_stage correctness 12 --timeout 60 --junitxml="$OUT/correctness.xml" -k "triton or ext-cuda" \
    tests/test_pq_assign.py tests/test_pq_assign_gather.py tests/test_pq_gather.py \
    tests/test_pq_cluster_stats.py tests/test_pq_ema.py tests/test_triton.py
}

stage_bench() {
  EQUSS_BENCH_SHAPES=$SHAPES_BENCH pytest_stage bench 15 --timeout 120 benchmarks/test_bench_gpu.py \
    --benchmark --benchmark-json="$OUT/bench.json" --benchmark-columns=median,rounds --benchmark-sort=name
}

stage_large() {
  EQUSS_BENCH_SHAPES=$SHAPES_LARGE pytest_stage large 20 --timeout 120 benchmarks/test_bench_gpu.py \
    --benchmark --benchmark-json="$OUT/bench_large.json" --benchmark-columns=median,rounds --benchmark-sort=name
}

stage_train() {
  local opts=(--device "$DEVICE") overrides=("backbone.cache_dir=$WORK/cache" log.progress=false log.tensorboard=false)
  if [ "$MODE" = rehearse ]; then  # the same entry point on a few steps of a small synthetic set
    opts+=(--epochs 1 --max-steps 3)
    overrides+=(data.synthetic.num_train=32 data.synthetic.num_val=16 data.batch_size=8 data.val_batch_size=8
                eval.every=3)
  fi
  proof train -- "${opts[@]}" "${overrides[@]}"
}

stage_calibrate() {
  if [ ! -f scripts/kernel_model.py ]; then
    echo "scripts/kernel_model.py absent: no calibration table"
    return 100
  fi
  # one JSON with both shapes' records (--calibrate takes one file); the model itself needs no GPU
  # (it compiles the kernels for sm_90 and reads their SASS), so this table can also be redone afterwards
  "$PY" - "$WORK/bench_all.json" "$OUT/bench.json" "$OUT/bench_large.json" <<'PYEOF'
import json, os, sys
data = {"benchmarks": []}
for path in sys.argv[2:]:
    try:
        data["benchmarks"] += json.load(open(path)).get("benchmarks", [])
    except (OSError, ValueError) as exc:
        print(f"{path}: {type(exc).__name__} (skipped)")
json.dump(data, open(sys.argv[1], "w"))
PYEOF
  local gpu
  gpu=$("$PY" -c "import json; n = (json.load(open('$WORK/env.json')).get('gpu') or {}).get('name', ''); print('H200' if 'H200' in n else 'A100' if 'A100' in n else 'H100')" 2>/dev/null || echo H100)
  local args=(--calibrate "$WORK/bench_all.json" --gpu "$gpu" --quiet)
  if [ "$MODE" = rehearse ]; then
    args+=(--shape equss_train --op pq_assign_gather)  # the plumbing; compiling every launch takes minutes on 2 cores
  else
    args+=(--shape equss_train large)
  fi
  "$PY" scripts/kernel_model.py "${args[@]}" > "$OUT/calibration.md"
  local rc=$?
  cat "$OUT/calibration.md"
  return "$rc"
}

if [ "${1:-}" = "--stage" ]; then  # one stage (run_stage calls this under `timeout`)
  "stage_$2"
  exit $?
fi

# ------------------------------------------------------------------------------------------- driver
mkdir -p "$OUT" "$WORK"
for f in summary.json log.txt correctness.xml bench.json bench_large.json report.md calibration.md; do
  rm -f "$OUT/$f"
done
rm -f "$WORK"/*.json
[ -e equss/kernels ] || ln -s ../kernels equss/kernels  # git-excluded symlink: it does not travel
export EQUSS_PROOF_START=$(date +%s)
DEADLINE=$((EQUSS_PROOF_START + TOTAL))
echo "GPU proof ($MODE): stages $STAGES; ${TOTAL}s budget; results in $OUT" | tee -a "$LOG"

run_stage() {
  local name=$1 budget_var="BUDGET_$1" now left
  local budget=${!budget_var}
  now=$(date +%s)
  left=$((DEADLINE - now))
  echo "=== [$name] start: budget ${budget}s, ${left}s left" | tee -a "$LOG"
  if [ "$budget" -gt "$left" ]; then
    proof record --stage "$name" --status skipped --budget "$budget" \
      --note "budget: needs ${budget}s, ${left}s left" | tee -a "$LOG"
    return
  fi
  export STAGE_DEADLINE=$((now + budget))
  local t0 t1 rc slog="$WORK/stage-$name.log"
  t0=$(date +%s%N)
  if command -v timeout >/dev/null; then
    timeout --kill-after=5 "$budget" bash "$ROOT/scripts/bench_gpu.sh" --stage "$name" > "$slog" 2>&1
  else  # no coreutils timeout: the pytest stages still stop themselves at their deadline
    bash "$ROOT/scripts/bench_gpu.sh" --stage "$name" > "$slog" 2>&1
  fi
  rc=$?
  t1=$(date +%s%N)
  cat "$slog" >> "$LOG"
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="stopped at its budget of ${budget}s"
  proof record --stage "$name" --rc "$rc" --millis $(((t1 - t0) / 1000000)) \
    --budget "$budget" --note "$note" --log "$slog" | tee -a "$LOG"
  if [ "$rc" != 0 ] && [ "$rc" != 100 ]; then
    echo "--- [$name] last lines:"; tail -n 25 "$slog"
  fi
}

no_cuda_left() {  # on the GPU machine without a visible GPU only the environment report makes sense
  [ "$MODE" = gpu ] && ! "$PY" -c "import json, sys; sys.exit(0 if json.load(open('$WORK/env.json'))['torch'].get('cuda_available') else 1)" 2>/dev/null
}

for stage in $STAGES; do
  if [ "$stage" != wheels ] && [ "$stage" != env ] && no_cuda_left; then
    proof record --stage "$stage" --status skipped --note "no CUDA device visible" | tee -a "$LOG"
    continue
  fi
  run_stage "$stage"
done
proof finish | tee -a "$LOG"
exit "${PIPESTATUS[0]}"

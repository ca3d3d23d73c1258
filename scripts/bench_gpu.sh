#!/usr/bin/env bash
# Run the CUDA/Triton tests and the GPU benchmarks on a GPU machine, save the results, print the tables.
#
#   scripts/bench_gpu.sh            # from the repository root, after torch (CUDA build) and triton are installed
#
# Steps (fails on the first error):
#   1. offline editable install: pip install --no-build-isolation --no-deps -e .   (builds equss._C with CUDA)
#   2. python -m equss.backends                 (which backends loaded, and why not)
#   3. the Triton/CUDA tests: tests/test_triton.py, tests/test_triton_compile.py, tests/test_baselines.py,
#      plus every test marked cuda
#   4. benchmarks/test_bench_gpu.py with timing → benchmarks/results/<device>-<commit>.json (and $OUT/ if set)
#   5. benchmarks/report.py → markdown tables (also saved next to the JSON as .md)
#
# Environment: EQUSS_TRITON_PRECISION (ieee | tf32x3 | tf32, default ieee) is recorded in the results;
# BENCH_ARGS adds pytest arguments to the benchmark run (e.g. BENCH_ARGS="-k assign").
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible: this script is for GPU machines')"

pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
python -m equss.backends

python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_triton_compile.py tests/test_baselines.py
python -m pytest -q -p no:cacheprovider -m cuda tests || [ $? -eq 5 ]   # 5 = no tests collected

device=$(python -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-'))")
commit=$(git rev-parse --short HEAD 2>/dev/null || echo nocommit)
if ! git diff --quiet HEAD 2>/dev/null; then commit="${commit}-dirty"; fi
mkdir -p benchmarks/results
json="benchmarks/results/${device}-${commit}.json"

# shellcheck disable=SC2086
python -m pytest benchmarks/test_bench_gpu.py --benchmark --benchmark-json="$json" -p no:cacheprovider -q ${BENCH_ARGS:-}
python benchmarks/report.py "$json" | tee "${json%.json}.md"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$json" "${json%.json}.md" "$OUT"/
fi
echo "results: $json"

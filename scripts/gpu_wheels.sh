#!/usr/bin/env bash
# Download (here, with a package registry) the wheels that the offline GPU machine lacks for the GPU proof
# (scripts/bench_gpu.sh) into the git-ignored wheels/ folder, and check that they travel: the working
# tree sent to the GPU machine (tracked + untracked-not-ignored files, plus the carried wheels/) must stay
# under 64 MiB.
#
#   scripts/gpu_wheels.sh            # idempotent: wheels already in wheels/ are kept
#   scripts/gpu_wheels.sh --check    # no download: list wheels/, check names and sizes (exit 1 if any is missing)
#
# The GPU machine has Python 3.12, torch 2.11 (CUDA 13), triton 3.6, torchvision, timm, numpy, scipy,
# pytest (+ benchmark, timeout), matplotlib, pillow, tqdm, pyyaml, einops, scikit-image, tensorboard.
# For the proof it lacks (faiss, pebble and pydensecrf2 are missing too, but the proof does not use them):
#
#   omegaconf, antlr4-python3-runtime       equss.config, scripts/train.py
#   vector-quantize-pytorch, einx, frozendict, loguru, torch-einops-utils    the vqp benchmark rows
#   ninja                                   parallel extension build (torch's builder otherwise compiles
#                                           the sources one after another)
#
# Versions are pinned to the ones the project's CI environment runs. Binary-only download for cp312 /
# manylinux x86_64; a pure-Python package that ships only an sdist is built into a py3-none-any wheel with
# `pip wheel --no-deps` (refused if the result is not pure Python). The GPU machine installs them with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site wheels/*.whl
# (scripts/bench_gpu.sh does it); give the device tool carry=["wheels"], since wheels/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  omegaconf==2.4.0
  antlr4-python3-runtime==4.13.2
  vector-quantize-pytorch==1.32.0
  einx==0.4.3
  frozendict==2.5.1
  loguru==0.7.3
  torch-einops-utils==0.2.0
  ninja==1.13.2
)
DEST=${GPU_WHEELS_DIR:-wheels}
LIMIT_MIB=64
PY=${PYTHON:-python3}
check_only=0
[ "${1:-}" = "--check" ] && check_only=1

# "Name==1.2" -> "name-1.2" and a wheel file name -> the same key (PEP 427 name escaping, lower case).
key_of_spec() { local n=${1%%==*}; n=$(echo "$n" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'); echo "$n-${1#*==}"; }
key_of_wheel() { local b; b=$(basename "$1"); local n=${b%%-*}; local rest=${b#*-};
  n=$(echo "$n" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'); echo "$n-${rest%%-*}"; }
have() { local f; for f in "$DEST"/*.whl; do [ -e "$f" ] && [ "$(key_of_wheel "$f")" = "$1" ] && return 0; done; return 1; }

download() {  # SPEC...: binary wheels for the GPU machine's interpreter and platform
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$@"
}

mkdir -p "$DEST"
todo=() missing=0
for spec in "${WHEELS[@]}"; do
  have "$(key_of_spec "$spec")" && continue
  if [ "$check_only" = 1 ]; then echo "missing: $spec" >&2; missing=1; else todo+=("$spec"); fi
done
if [ "${#todo[@]}" -gt 0 ]; then
  echo "downloading ${todo[*]}" >&2
  if ! download "${todo[@]}" 2>/dev/null; then  # one of them has no such wheel: one by one
    for spec in "${todo[@]}"; do
      have "$(key_of_spec "$spec")" && continue
      download "$spec" && continue
      echo "no cp312/manylinux wheel of $spec: building a pure-Python wheel from its sdist" >&2
      tmp=$(mktemp -d)
      "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary=:all: -w "$tmp" "$spec"
      for w in "$tmp"/*.whl; do
        case "$w" in
          *-py3-none-any.whl | *-py2.py3-none-any.whl) mv "$w" "$DEST"/ ;;
          *) echo "error: $spec builds a platform wheel ($(basename "$w")), which cannot be made here for cp312" >&2
             rm -rf "$tmp"; exit 1 ;;
        esac
      done
      rm -rf "$tmp"
    done
  fi
  for spec in "${todo[@]}"; do
    have "$(key_of_spec "$spec")" || { echo "error: no wheel of $spec in $DEST after the download" >&2; exit 1; }
  done
fi
[ "$missing" = 1 ] && { echo "run scripts/gpu_wheels.sh (it needs a package registry)" >&2; exit 1; }

# A stale wheel (another version, or a package no longer listed) would be installed there too: refuse it.
keys=" "; for spec in "${WHEELS[@]}"; do keys+="$(key_of_spec "$spec") "; done
for f in "$DEST"/*.whl; do
  case "$keys" in *" $(key_of_wheel "$f") "*) ;; *) echo "error: $f is not in the pinned list; remove it" >&2; exit 1 ;; esac
done

"$PY" - "$DEST" "$LIMIT_MIB" <<'EOF'
import os, subprocess, sys
dest, limit_mib = sys.argv[1], int(sys.argv[2])
wheels = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
wheel_bytes = 0
print(f"wheels for the GPU machine ({dest}/):")
for w in wheels:
    s = os.path.getsize(os.path.join(dest, w))
    wheel_bytes += s
    print(f"  {w:<78} {s / 1024:9.1f} KiB")
# What travels (the device tool's rule): tracked files and untracked files that git does not ignore.
out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                     check=True, capture_output=True).stdout
tree_bytes = sum(os.path.getsize(p) for p in out.decode().split("\0") if p and os.path.isfile(p))
total = tree_bytes + wheel_bytes
print(f"wheels {wheel_bytes / 2**20:.2f} MiB + repository tree {tree_bytes / 2**20:.2f} MiB = "
      f"{total / 2**20:.2f} MiB of the {limit_mib} MiB that travel")
if total > limit_mib * 2**20:
    sys.exit("error: the tree with the wheels does not fit the 64 MiB that travel")
EOF

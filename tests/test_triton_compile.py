"""Ahead-of-time compilation of every Triton kernel configuration for sm_90 and sm_80, without a GPU
(a configuration with an ``arch`` field, picked only on that compute capability, only for it).

``scripts/triton_resources.py`` compiles each configuration in the kernel modules' ``CONFIGS`` (exactly
the set their launchers can pick; ``test_triton.py::test_pick_config_only_returns_precompiled_configs``
and ``::test_launchers_use_pick_config`` check that) to PTX and a cubin, and reads the resources with
the ``cuobjdump`` bundled in Triton. The compile test (marked ``slow``) fails on a compile error, on register spills (STACK or LOCAL > 0) and on shared memory above the
architecture's per-block opt-in limit (227 KB sm_90, 163 KB sm_80).

It runs the script in a subprocess without ``TRITON_INTERPRET``: under the interpreter (which the root
conftest turns on when there is no GPU) ``@triton.jit`` yields ``InterpretedFunction`` objects that
``triton.compile`` rejects. Cold, the ~90 compiles take 1–3 minutes on two cores (ptxas dominates);
Triton's on-disk cache makes reruns take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'equss[triton]')")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_resources.py"
sys.path.insert(0, str(SCRIPT.parent))
import triton_resources as TR  # noqa: E402

pytestmark = pytest.mark.triton

CUOBJDUMP_SAMPLE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _pq_assign_kernel:
  REG:122 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    assert TR.parse_resource_usage(CUOBJDUMP_SAMPLE) == {"reg": 122, "stack": 8, "shared": 1024, "local": 16}
    with pytest.raises(ValueError, match="no REG field"):
        TR.parse_resource_usage("Resource usage:\n")


def test_occupancy_arithmetic():
    # 128 regs × 32 lanes = 4096 per warp; 4 warps → 16384 per block → 4 blocks fit in 65536 registers.
    occ = TR.occupancy(regs=128, smem=0, num_warps=4, arch=90)
    assert occ["blocks_per_sm"] == 4 and occ["occupancy"] == 0.25 and occ["limiter"] == "registers"
    # 100 KB of shared memory (+1 KB reserved) → 2 blocks in 228 KB (sm_90) but 1 in 164 KB (sm_80).
    assert TR.occupancy(32, 100 * 1024, 4, 90)["blocks_per_sm"] == 2
    assert TR.occupancy(32, 100 * 1024, 4, 80)["blocks_per_sm"] == 1


def test_problems_flags_spills_and_shared_memory():
    row = {"ok": True, "arch": "sm_80", "stack": 0, "local": 0, "reg": 100, "total_shared": 163 * 1024}
    assert TR.problems(row) == []
    assert "register spill" in TR.problems({**row, "stack": 8})[0]
    assert "register spill" in TR.problems({**row, "local": 4})[0]
    assert "per-block limit" in TR.problems({**row, "total_shared": 163 * 1024 + 1})[0]
    assert "compile error" in TR.problems({"ok": False, "error": "boom"})[0]


@pytest.mark.slow  # 1–3 minutes cold (module docstring); deselect with -m 'not slow'
def test_every_config_compiles_for_sm90_and_sm80_without_spills(tmp_path):
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "80", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert out.exists(), f"script failed before writing JSON:\n{proc.stderr[-4000:]}"
    rows = json.loads(out.read_text())["rows"]
    configs = [cfg for _, cfg in TR.kernel_configs()]
    expected = sum(TR.compiled_for(cfg, arch) for cfg in configs for arch in (90, 80))
    assert configs and len(rows) == expected
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    bad = [f"{r['arch']} {r['config']}: {'; '.join(TR.problems(r))}" for r in rows if TR.problems(r)]
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in rows:  # the cubin really was produced and inspected
        assert r["ptx_bytes"] > 0 and r["reg"] > 0

"""Hot-loop SASS statistics of Triton kernel configurations (no GPU needed), for before/after comparisons.

For each configuration of a kernel module's ``CONFIGS`` this compiles ``compile_spec(cfg)`` ahead of time
(``triton.compile``, sm_90 by default), disassembles the cubin with the ``cuobjdump`` bundled in Triton
and reports registers, spills, shared memory, occupancy (``scripts/triton_resources.py``) and the
instruction mix of the hot loop: the innermost loop (a backward branch) holding the most global-memory
instructions, or the whole kernel when it has no loop. Classes: global memory by opcode and width
(``LDG.128``, ``REDG.ADD.F32x4`` ...), shared memory, barriers, shuffles, tensor-core, float, integer,
conversions, control, uniform-datapath.

    python scripts/sass_hotloop.py pq_segment_sum                    # every config of equss.kernels.pq_segment_sum
    python scripts/sass_hotloop.py pq_gather --idx 0 2 --spec Ds M   # mark Ds, M divisible by 16
    python scripts/sass_hotloop.py old --file /tmp/old_segment_sum.py  # a module from a file (e.g. git show)

``--spec NAME ...`` marks integer arguments as divisible by 16, as Triton's JIT launcher does for every
integer argument ≡ 0 (mod 16) (Ds = 32, M = 32, K = 256 at the EQUSS shape): the code that actually runs
at such a shape, whereas ``compile_spec`` (and scripts/triton_resources.py) compile without those hints.
Run as its own process: it removes ``TRITON_INTERPRET`` before importing triton.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import triton  # noqa: E402
import triton_resources as TR  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_MEM = ("LDG", "STG", "REDG", "RED", "ATOMG", "ATOM", "LDGSTS")
_NOISE = {"E", "STRONG", "GPU", "SYS", "CONSTANT", "RN", "FTZ", "EF", "EL", "LU", "EN"}
_INT = {
    "IMAD", "IADD3", "LEA", "LOP3", "SHF", "ISETP", "SEL", "IABS", "PRMT", "IMNMX", "FLO", "POPC", "BMSK",
    "VIADD", "IADD", "IMUL", "BREV", "VIMNMX", "SGXT", "P2R", "R2P", "PLOP3", "VOTE",
}


def classify(op: str) -> str:
    parts = op.split(".")
    base = parts[0]
    if base in _MEM:
        return ".".join([base] + [p for p in parts[1:] if p not in _NOISE])
    if base in ("LDS", "STS", "LDSM", "ATOMS"):
        return "shared"
    if base in ("BAR", "MEMBAR", "DEPBAR", "ERRBAR", "CCTL", "FENCE", "LDGDEPBAR"):
        return "sync"
    if base in ("HMMA", "HGMMA", "IMMA", "DMMA", "WARPGROUP"):
        return "tensor"
    if base in ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FCHK", "HADD2", "HFMA2", "HMUL2", "DADD",
                "DFMA", "DMUL", "DSETP", "REDUX"):
        return "float"
    if base == "MUFU":
        return "mufu"
    if base in ("F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "FRND"):
        return "convert"
    if base == "SHFL":
        return "shuffle"
    if base in ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "WARPSYNC", "YIELD", "NOP", "BREAK", "JMP"):
        return "control"
    if base.startswith("U") or base in ("S2UR", "R2UR"):
        return "uniform"
    if base in _INT:
        return "int"
    return "move/other"


def _module(name: str, path: str | None):
    if path is None:
        return importlib.import_module(f"equss.kernels.{name}")
    spec = importlib.util.spec_from_file_location(f"equss.kernels._sass_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def analyse(kernel, sig, constexprs, options, arch: int, spec: set[str]) -> dict:
    attrs = {(i,): [["tt.divisibility", 16]] for i, (a, t) in enumerate(sig.items()) if t.startswith("*") or a in spec}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([f"{BIN}/cuobjdump", "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = TR.parse_resource_usage(res)
    ins = [(int(m.group(1), 16), m.group(3)) for m in LINE.finditer(sass)]
    loops = []
    for m in LINE.finditer(sass):
        addr, op, args = int(m.group(1), 16), m.group(3), m.group(4)
        target = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]

    def n_mem(lo, hi):
        return sum(1 for a, op in ins if lo <= a <= hi and op.split(".")[0] in _MEM)

    lo, hi = max(inner, key=lambda lp: (n_mem(*lp), lp[1] - lp[0])) if inner else (0, ins[-1][0])
    body = [op for a, op in ins if lo <= a <= hi]
    smem = usage["shared"] + int(compiled.metadata.shared)
    occ = TR.occupancy(usage["reg"], smem, options["num_warps"], arch)
    return {
        "reg": usage["reg"],
        "spill": usage["stack"] + usage["local"],
        "smem": smem,
        "blocks_per_sm": occ["blocks_per_sm"],
        "occupancy": occ["occupancy"],
        "instructions": len(ins),
        "loops": len(loops),
        "hot_loop": [hex(lo), hex(hi)] if inner else None,
        "hot_instructions": len(body),
        "mix": dict(sorted(collections.Counter(classify(op) for op in body).items())),
        "sass": sass,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", help="kernel module name in equss.kernels (or a label with --file)")
    ap.add_argument("--file", help="load the module from this file instead")
    ap.add_argument("--idx", type=int, nargs="*", help="config indices (default: all)")
    ap.add_argument("--spec", nargs="*", default=[], help="integer arguments divisible by 16")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dump", help="write each config's SASS to this folder")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    mod = _module(args.module, args.file)
    rows = []
    for i, cfg in enumerate(mod.CONFIGS):
        if args.idx and i not in args.idx:
            continue
        kernel, sig, constexprs, options = mod.compile_spec(cfg)
        row = {"index": i, "config": cfg.describe(), **analyse(kernel, sig, constexprs, options, args.arch, set(args.spec))}
        sass = row.pop("sass")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{args.module}_{i}.sass"), "w") as f:
                f.write(sass)
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

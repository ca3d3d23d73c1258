"""Static SASS reading of the Triton assignment kernels (no GPU): instruction mix of the hot loop and a time model.

For each configuration of ``equss.kernels.pq_assign.CONFIGS`` that matches ``--config`` this compiles the
kernel ahead of time for sm_90 (``triton.compile``, as ``scripts/triton_resources.py`` does), with the
divisibility hints Triton's launcher would give the integer arguments at the chosen shape (an argument
divisible by 16 is specialised as such at run time), dumps the SASS with the ``cuobjdump`` bundled in
Triton, and reports

* registers, spills, shared memory and occupancy (``triton_resources.occupancy``);
* the row-tile loop (the loop around the tensor-core products, or the outer loop of the streaming
  kernel): instructions per warp and iteration by class, for the plain assignment (the fused-epilogue
  block skipped: the outermost forward branch of the loop whose skipped range holds the statistics'
  ``RED`` atomics) and for the fused training forward (every block: all codeword groups, stats = 2);
  for the streaming kernel also the codeword-chunk loop nested in it;
* loop trips per program and a time model at the shape on an H100 SXM (132 SMs, 4 SM sub-partitions
  issuing one warp instruction per cycle each at 1.8 GHz; 3.35 TB/s HBM; dense tensor-core peaks 990
  TFLOP/s bf16, 495 tf32, 67 fp32 FMA):

  - issue time = Σ warp instructions of the row loops / (4 · 132 · 1.8 GHz);
  - tensor time = the products the kernel issues (padded tiles included) / peak;
  - memory time = the bytes the op must move / bandwidth (x read once, outputs written once; the fused
    op adds quantized, sq_err, stats_x and the statistics; the codebook and L2-resident atomics are
    not counted);
  - predicted = max(issue, tensor, memory) / 0.8, i.e. 80 % of the binding unit's peak, the units
    overlapping across the resident warpgroups; ``no-overlap`` = issue + tensor + memory.

``--module FILE`` reads another version of the module (e.g. ``git show <rev>:kernels/pq_assign.py``)
to compare before/after; that version's launcher heuristics are used as far as they exist.

Usage::

    python scripts/assign_sass.py --config 'assign_tc[fp32,exact,dot]' --shape equss
    python scripts/assign_sass.py --shape large --config tc
    python scripts/assign_sass.py --module /tmp/old_pq_assign.py --config 'fp32,ieee,plain] BLOCK_N=64 BLOCK_K=64 BLOCK_D=32'
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

SHAPES = {"equss": (25088, 32, 256, 32), "large": (1_000_000, 64, 1024, 32)}
SMS, SMSP, CLOCK = 132, 4, 1.8e9
HBM = 3.35e12
PEAK = {"bf16": 990e12, "fp16": 990e12, "tf32": 495e12, "fp32": 67e12}

CLASSES = [
    ("HGMMA", r"^HGMMA"),
    ("HMMA", r"^HMMA"),
    ("WGMMA-sync", r"^WARPGROUP"),
    ("FFMA", r"^FFMA"),
    ("FADD/FMUL", r"^FADD|^FMUL"),
    ("FMNMX", r"^FMNMX"),
    ("FSETP/FSEL", r"^FSETP|^FSEL"),
    ("LOP3", r"^LOP3"),
    ("SEL/ISETP", r"^SEL|^ISETP|^IMNMX|^VIMNMX"),
    ("F2F/PRMT", r"^F2F|^PRMT|^I2F|^F2I"),
    ("SHFL", r"^SHFL"),
    ("BAR", r"^BAR|^SYNCS|^MEMBAR"),
    ("LDG", r"^LDG(?!STS)"),
    ("LDGSTS", r"^LDGSTS|^LDGDEPBAR|^DEPBAR"),
    ("LDS", r"^LDS|^LDSM"),
    ("STS", r"^STS"),
    ("STG", r"^STG"),
    ("ATOM/RED", r"^ATOM|^RED"),
    ("int/addr", r"^IADD|^IMAD|^LEA|^SHF|^MOV|^IABS|^S2R|^CS2R|^S2UR|^R2UR|^U|^LDC|^VIADD|^SGXT|^POPC|^FLO|^BMSK"),
    ("MUFU", r"^MUFU"),
    ("control", r"^BRA|^BSYNC|^BSSY|^EXIT|^NOP|^YIELD|^CALL|^RET|^PLOP3|^P2R|^R2P|^VOTE|^WARPSYNC|^ELECT"),
]


def classify(op: str) -> str:
    for name, pat in CLASSES:
        if re.match(pat, op):
            return name
    return "other"


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """``[(address, opcode, text)]`` of the single function in a ``cuobjdump --dump-sass`` listing."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            text = m.group(2).strip()
            op = re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0]
            out.append((int(m.group(1), 16), op, text))
    return out


def branches(ins):
    """``(address, target, conditional)`` of every branch with an immediate target."""
    res = []
    for addr, op, text in ins:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
            if m:
                res.append((addr, int(m.group(1), 16), text.startswith("@")))
    return res


def loops(ins):
    """``(start, end)`` address ranges closed by a backward branch."""
    return sorted({(t, a) for a, t, _ in branches(ins) if t <= a})


def count(ins, lo, hi, skip=()):
    c = collections.Counter()
    for addr, op, _ in ins:
        if lo <= addr <= hi and not any(s <= addr < e for s, e in skip):
            c[classify(op)] += 1
    return c


def _compile(mod, cfg, shape, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget

    kernel, signature, constexprs, options = mod.compile_spec(cfg)
    N, M, K, Ds = shape
    values = {"N": N, "M": M, "K": K, "Ds": Ds, "NM": N * M}
    attrs = {}
    for i, (name, ty) in enumerate(signature.items()):
        if ty.startswith("*") or (ty == "i32" and values.get(name, 1) % 16 == 0 and name in values):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    nv = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(nv, "cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run(
            [os.path.join(nv, "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return compiled, sass, res


def _row_loop(ins):
    """The row-tile loop: the outermost loop that contains tensor-core products (HGMMA/HMMA), else the
    outermost one with FFMAs (the FMA recheck loop of the tensor-core kernel has FFMAs only)."""
    cands = []
    for lo, hi in loops(ins):
        c = count(ins, lo, hi)
        if c["HGMMA"] + c["HMMA"] > 0:
            cands.append((1, hi - lo, lo, hi))
        elif c["FFMA"] > 0:
            cands.append((0, hi - lo, lo, hi))
    if not cands:
        return None
    _, _, lo, hi = max(cands)
    return lo, hi


def _fused_range(ins, lo, hi):
    """Skipped range of the outermost forward conditional branch in [lo, hi] whose range holds a RED."""
    best = None
    reds = [a for a, op, _ in ins if lo <= a <= hi and op.startswith("RED")]
    if not reds:
        return None
    for a, t, cond in branches(ins):
        if cond and lo <= a < t <= hi + 16 and any(a < r < t for r in reds):
            if best is None or t - a > best[1] - best[0]:
                best = (a + 16, t)
    return best


def analyse(mod, cfg, shape, arch=90):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import triton_resources as TR

    compiled, sass, res = _compile(mod, cfg, shape, arch)
    usage = TR.parse_resource_usage(res)
    smem = usage["shared"] + int(compiled.metadata.shared)
    occ = TR.occupancy(usage["reg"], smem, cfg.num_warps, arch)
    ins = parse_sass(sass)
    row = {"config": cfg.describe(), **usage, "total_shared": smem, **occ, "sass_instructions": len(ins)}
    rl = _row_loop(ins)
    if rl is None:
        return row, ins
    lo, hi = rl
    fused = _fused_range(ins, lo, hi)
    row["loop_fused"] = dict(count(ins, lo, hi))
    row["loop_plain"] = dict(count(ins, lo, hi, skip=[fused] if fused else []))
    inner = [(a, b) for a, b in loops(ins) if lo < a and b < hi]
    if inner:
        a, b = max(inner, key=lambda r: count(ins, *r)["FFMA"] + count(ins, *r)["HMMA"] + count(ins, *r)["HGMMA"])
        row["inner_loop"] = dict(count(ins, a, b))
    return row, ins


def model(mod, cfg, shape, row, fused: bool, stats_x: bool = True) -> dict:
    """The time model of the module docstring for one configuration at ``shape``."""
    N, M, K, Ds = shape
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[_dtype_name(cfg)]
    warps = cfg.num_warps
    tiles = -(-N // cfg.BLOCK_N)
    loop = row.get("loop_fused" if fused else "loop_plain", {})
    per_iter = sum(loop.values())
    out = {"instr_per_tile_per_warp": per_iter}
    kern = getattr(cfg, "kernel", "legacy")
    if kern == "generic" and "inner_loop" in row:
        chunks = -(-K // cfg.BLOCK_K)
        per_iter = per_iter + (chunks - 1) * sum(row["inner_loop"].values())
        out["instr_per_tile_per_warp"] = per_iter
    elif kern == "legacy" and "inner_loop" not in row:
        per_iter = per_iter * -(-K // cfg.BLOCK_K)  # the legacy kernel's row loop is the codeword-tile loop
        tiles = -(-N // cfg.BLOCK_N)
        out["instr_per_tile_per_warp"] = per_iter
    warp_instr = M * tiles * warps * per_iter
    t_issue = warp_instr / (SMSP * SMS * CLOCK)
    # tensor / FMA work actually issued (padding included)
    k_pad = -(-K // 64) * 64 if kern != "tc" else -(-K // cfg.BLOCK_K) * cfg.BLOCK_K
    d_pad = max(Ds, cfg.BLOCK_D) if not getattr(cfg, "D_LOOP", False) else -(-Ds // cfg.BLOCK_D) * cfg.BLOCK_D
    flops = 2.0 * tiles * cfg.BLOCK_N * M * k_pad * d_pad
    prec = getattr(cfg, "precision", "ieee")
    if prec == "exact":
        peak, flops = PEAK["bf16"], 3 * flops
    elif prec == "tf32x3":
        peak, flops = PEAK["tf32"], 3 * flops
    elif prec == "tf32":
        peak = PEAK["tf32"]
    elif prec == "ieee" and _dtype_name(cfg) == "fp32":
        peak = PEAK["fp32"]
    else:
        peak = PEAK["bf16"]
    t_tensor = flops / peak
    x_bytes = N * M * Ds * itemsize
    bytes_ = x_bytes + N * M * 8  # x, codes, min_dist
    if fused:
        bytes_ += x_bytes + N * M * 4 + (x_bytes if stats_x else 0)  # quantized, sq_err, stats_x
    t_mem = bytes_ / HBM
    t_pred = max(t_issue, t_tensor, t_mem) / 0.8
    out.update(
        issue_us=t_issue * 1e6,
        tensor_us=t_tensor * 1e6,
        memory_us=t_mem * 1e6,
        predicted_us=t_pred * 1e6,
        no_overlap_us=(t_issue + t_tensor + t_mem) * 1e6,
        roofline_memory_us=t_mem * 1e6,
        tensor_floor_us=t_tensor * 1e6,
        pct_of_memory_roofline=100 * t_mem / t_pred,
    )
    return out


def _dtype_name(cfg) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[cfg.dtype]


def _load_module(path: str | None):
    if path is None:
        return importlib.import_module("equss.kernels.pq_assign")
    spec = importlib.util.spec_from_file_location("equss.kernels._assign_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="", help="substring of AssignConfig.describe() (default: every config)")
    ap.add_argument("--shape", default="equss", help="equss | large | N,M,K,Ds")
    ap.add_argument("--module", default=None, help="path of another pq_assign.py to read (before/after)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sass-dir", default=None, help="write each config's SASS here")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shape = SHAPES.get(args.shape) or tuple(int(v) for v in args.shape.split(","))
    mod = _load_module(args.module)
    rows = []
    for i, cfg in enumerate(mod.CONFIGS):
        if args.config not in cfg.describe():
            continue
        row, ins = analyse(mod, cfg, shape, args.arch)
        fused_variants = (False, True) if getattr(cfg, "kernel", None) else (getattr(cfg, "fused", False),)
        row["model"] = {("fused" if f else "plain"): model(mod, cfg, shape, row, f) for f in fused_variants}
        rows.append(row)
        if args.sass_dir:
            os.makedirs(args.sass_dir, exist_ok=True)
            with open(os.path.join(args.sass_dir, f"cfg{i}.sass"), "w") as f:
                f.write("\n".join(f"/*{a:04x}*/ {t};" for a, _, t in ins))
        print(f"\n== {row['config']}  (shape N,M,K,Ds = {shape}, sm_{args.arch})")
        print(
            f"   REG {row['reg']}  spill {row['stack']}/{row['local']}  smem {row['total_shared']} B  "
            f"{row['blocks_per_sm']} CTA/SM  occupancy {row['occupancy']:.0%} ({row['limiter']})"
        )
        for key in ("loop_plain", "loop_fused", "inner_loop"):
            if key in row:
                c = row[key]
                items = ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))
                print(f"   {key:10s} {sum(c.values()):5d} instr/warp/iter: {items}")
        for name, m in row["model"].items():
            print(
                f"   {name:6s} per tile {m['instr_per_tile_per_warp']:6d} instr/warp | issue {m['issue_us']:8.1f} µs  "
                f"tensor {m['tensor_us']:8.1f} µs  memory {m['memory_us']:7.1f} µs  → predicted {m['predicted_us']:8.1f} µs "
                f"({m['pct_of_memory_roofline']:.0f}% of the memory roofline; no-overlap {m['no_overlap_us']:.1f})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

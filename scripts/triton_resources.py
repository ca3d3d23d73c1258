"""Compile every Triton kernel configuration ahead of time (no GPU needed) and report its resources.

For each configuration that the launchers in ``equss.kernels`` can pick (the modules' ``CONFIGS``) and each
target architecture (sm_90, sm_80 by default), this compiles the kernel with ``triton.compile`` to PTX
and a cubin, reads registers / stack / local / static shared memory with the ``cuobjdump`` bundled in
Triton's NVIDIA backend (``--dump-resource-usage``), adds Triton's dynamic shared memory
(``metadata.shared``) and derives the occupancy those resources allow.

Usage::

    python scripts/triton_resources.py                     # markdown table on stdout
    python scripts/triton_resources.py --readme README.md  # replace the section between the markers
    python scripts/triton_resources.py --json out.json     # machine-readable (tests/test_triton_compile.py)

The section markers in README.md are ``<!-- triton-resources:start -->`` / ``<!-- triton-resources:end -->``.
``main()`` removes ``TRITON_INTERPRET`` from the environment before triton is imported: under the
interpreter ``@triton.jit`` returns an ``InterpretedFunction``, which ``triton.compile`` cannot compile
(``ASTSource.hash`` fails on its missing ``cache_key``). Run it as its own process.

Pointer arguments are compiled with the 16-byte alignment hint that Triton's launcher derives for
PyTorch allocations; integer arguments without divisibility hints (a launch with e.g. ``Ds % 16 == 0``
compiles a specialised twin whose resources are no larger in practice).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

START_MARKER = "<!-- triton-resources:start -->"
END_MARKER = "<!-- triton-resources:end -->"

# Per-architecture limits (CUDA C Programming Guide, "Technical Specifications per Compute Capability"):
# opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) and per SM, registers per SM,
# max resident warps and blocks per SM.
ARCH_LIMITS = {
    90: {
        "smem_per_block": 227 * 1024,
        "smem_per_sm": 228 * 1024,
        "regs_per_sm": 65536,
        "warps_per_sm": 64,
        "blocks_per_sm": 32,
    },
    80: {
        "smem_per_block": 163 * 1024,
        "smem_per_sm": 164 * 1024,
        "regs_per_sm": 65536,
        "warps_per_sm": 64,
        "blocks_per_sm": 32,
    },
}
# The driver reserves 1 KB of shared memory per resident block (sm_80 and later).
_RESERVED_SMEM_PER_BLOCK = 1024


def kernel_configs() -> list[tuple[str, object]]:
    """``(module name, config)`` for every distinct configuration the launchers can pick."""
    # Imported here, not at module level: main() must drop TRITON_INTERPRET before triton is imported.
    from equss.kernels import KERNEL_MODULES

    seen, out = set(), []
    for mod in (importlib.import_module(f"equss.kernels.{name}") for name in KERNEL_MODULES):
        for cfg in mod.CONFIGS:
            if cfg not in seen:
                seen.add(cfg)
                out.append((mod.__name__, cfg))
    return out


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships with triton's NVIDIA backend)")
    return path


def cuobjdump(cubin: bytes, *flags: str) -> str:
    """Output of the bundled ``cuobjdump <flags>`` (``--dump-resource-usage``, ``--dump-sass``) on a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), *flags, f.name], capture_output=True, text=True, check=True).stdout


def parse_resource_usage(text: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of the (single) function in ``cuobjdump --dump-resource-usage`` output."""
    fields = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        if match is None:
            raise ValueError(f"no {key} field in cuobjdump output:\n{text}")
        fields[key.lower()] = int(match.group(1))
    return fields


def occupancy(regs: int, smem: int, num_warps: int, arch: int) -> dict[str, float]:
    """Resident blocks per SM and the fraction of the SM's warp slots they fill."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256 registers
    by_regs = lim["regs_per_sm"] // max(1, regs_per_warp * num_warps)
    by_warps = lim["warps_per_sm"] // num_warps
    by_smem = lim["smem_per_sm"] // (smem + _RESERVED_SMEM_PER_BLOCK)
    blocks = min(by_regs, by_warps, by_smem, lim["blocks_per_sm"])
    limiter = min((by_regs, "registers"), (by_warps, "warps"), (by_smem, "shared memory"))[1]
    return {
        "blocks_per_sm": blocks,
        "occupancy": blocks * num_warps / lim["warps_per_sm"],
        "limiter": limiter,
    }


def compile_one(job: tuple[str, int, int]) -> dict:
    """Compile config number ``index`` of :func:`kernel_configs` for ``arch``; never raises."""
    import triton
    from triton.backends.compiler import GPUTarget

    module_name, index, arch = job
    name, cfg = kernel_configs()[index]
    mod = importlib.import_module(name)
    kernel, signature, constexprs, options = mod.compile_spec(cfg)
    row = {
        "module": name.rsplit(".", 1)[-1],
        "kernel": getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?"),
        "config": cfg.describe(),
        "arch": f"sm_{arch}",
        "num_warps": options["num_warps"],
        "ok": False,
        "error": "",
    }
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(signature.items()) if ty.startswith("*")
    }
    t0 = time.perf_counter()
    try:
        if not isinstance(kernel, triton.runtime.jit.JITFunction):
            raise RuntimeError(
                f"{kernel!r} was created under TRITON_INTERPRET=1 and cannot be compiled: run this script as its "
                "own process (python scripts/triton_resources.py), which removes the variable before importing triton"
            )
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        row["compile_s"] = round(time.perf_counter() - t0, 3)
        row["ptx_bytes"] = len(compiled.asm["ptx"])
        usage = parse_resource_usage(cuobjdump(compiled.asm["cubin"], "--dump-resource-usage"))
        row.update(usage)
        row["dynamic_shared"] = int(compiled.metadata.shared)
        row["total_shared"] = row["shared"] + row["dynamic_shared"]
        row.update(occupancy(row["reg"], row["total_shared"], row["num_warps"], arch))
        row["ok"] = True
    except Exception as exc:  # reported per configuration; the caller decides what fails
        row["compile_s"] = round(time.perf_counter() - t0, 3)
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return row


def problems(row: dict) -> list[str]:
    """Why a compiled configuration is unacceptable: compile error, spills, shared memory over the limit.

    STACK > 0 or LOCAL > 0 means registers spilled to local memory (none of these kernels has
    recursion, large local arrays or calls that would use a stack legitimately), so both count as spills.
    """
    if not row["ok"]:
        return [f"compile error: {row['error']}"]
    out = []
    if row["stack"] > 0 or row["local"] > 0:
        out.append(f"register spill: STACK={row['stack']} LOCAL={row['local']} (REG={row['reg']})")
    limit = ARCH_LIMITS[int(row["arch"][3:])]["smem_per_block"]
    if row["total_shared"] > limit:
        out.append(f"shared memory {row['total_shared']} B > {limit} B per-block limit of {row['arch']}")
    return out


def compiled_for(cfg, arch: int) -> bool:
    """Whether ``cfg`` runs on ``arch``: a config with an ``arch`` field other than 0 is picked only there."""
    return getattr(cfg, "arch", 0) in (0, arch)


def collect(archs: list[int], jobs: int) -> list[dict]:
    configs = kernel_configs()
    work = [(name, i, arch) for arch in archs for i, (name, cfg) in enumerate(configs) if compiled_for(cfg, arch)]
    if jobs <= 1:
        return [compile_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_one, work, chunksize=4))


def to_markdown(rows: list[dict]) -> str:
    import triton

    lines = [
        f"Triton {triton.__version__}, ahead-of-time compile (`python scripts/triton_resources.py`). "
        "REG = registers/thread, shared = static + dynamic bytes/block, occupancy = resident warps / 64 "
        "from registers, warps and shared memory (the limiter is named).",
        "",
        "| arch | kernel config | REG | spill (stack/local) | shared B | blocks/SM | occupancy | limiter | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        if r["ok"]:
            status = "; ".join(problems(r)) or "ok"
            lines.append(
                f"| {r['arch']} | `{r['config']}` | {r['reg']} | {r['stack']}/{r['local']} | {r['total_shared']} | "
                f"{r['blocks_per_sm']} | {r['occupancy']:.0%} | {r['limiter']} | {status} |"
            )
        else:
            lines.append(
                f"| {r['arch']} | `{r['config']}` | – | – | – | – | – | – | {problems(r)[0][:120]} |"
            )
    return "\n".join(lines) + "\n"


def write_readme(path: str, table: str, start: str = START_MARKER, end: str = END_MARKER) -> bool:
    """Replace the text between the markers of ``path``; False (file untouched) if it has no markers."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{table}{end}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch",
        type=int,
        nargs="+",
        default=[90, 80],
        choices=sorted(ARCH_LIMITS),
        help="compute capabilities (default: 90 80)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="parallel compile processes (default: min(2, cores))",
    )
    parser.add_argument("--json", metavar="PATH", help="also write all rows as JSON to PATH")
    parser.add_argument(
        "--readme",
        metavar="PATH",
        help="write the table between the triton-resources markers of PATH (else stdout)",
    )
    args = parser.parse_args(argv)
    # Only here, never at import: tests import this module for its helpers inside an interpreted session.
    os.environ.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    rows = collect(args.arch, args.jobs)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "wall_s": round(time.perf_counter() - t0, 2)}, f, indent=1)
    table = to_markdown(rows)
    if args.readme:
        if not write_readme(args.readme, table):
            print(
                f"{args.readme} has no {START_MARKER} / {END_MARKER} markers; table follows", file=sys.stderr
            )
            sys.stdout.write(table)
    else:
        sys.stdout.write(table)
    bad = [r for r in rows if problems(r)]
    print(
        f"{len(rows)} configurations compiled in {time.perf_counter() - t0:.1f} s; {len(bad)} with problems",
        file=sys.stderr,
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

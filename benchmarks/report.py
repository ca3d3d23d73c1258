"""pytest-benchmark JSON of the GPU suite (``benchmarks/test_bench_gpu.py``) → the README's GPU tables.

Usage::

    python benchmarks/report.py bench.json [bench_large.json ...] [--summary summary.json] [--readme README.md]

``--summary``: the GPU proof's ``summary.json`` (``scripts/bench_gpu.sh``): device, clocks, versions,
commit, build and test outcomes, the training run. ``--readme``: write the report between the markers
``<!-- gpu-proof:begin -->`` / ``<!-- gpu-proof:end -->`` of the README's Benchmarks section (inserted at
the section's end if absent) instead of printing it.

Sections: the targets (ratios of medians between rows of the same run at the EQUSS shape, the memory
ratio, each met or not), then one table per op × shape × dtype: median (do_bench at the EQUSS shape), the
ratio of every row to ours, achieved GB/s and TFLOP/s, the matmul precision the row computes in and its %
of the roofline at that precision's measured rate, peak memory, whether the result was validated.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# (op, our row, other row, minimum ratio other/ours of the medians): issue "GPU proof" targets.
SPEED_TARGETS = [
    ("assign_gather", "triton-fused", "torch", 8.0),
    ("assign_gather", "triton-fused", "authors", 40.0),
    ("module_step-ema", "triton", "vqp", 8.0),
    ("ema_update", "triton", "authors", 5.0),
]
MEMORY_TARGETS = [("module_step-ema", "triton", "vqp", 4.0)]  # ours ≤ 1/4 of vqp's peak memory
TARGET_SHAPES = ("equss_train", "tiny")  # the targets are stated at the EQUSS shape (tiny: its rehearsal stand-in)
OURS_ORDER = ("triton-fused", "triton")
BEGIN, END = "<!-- gpu-proof:begin -->", "<!-- gpu-proof:end -->"


def _info(b: dict) -> dict:
    return b.get("extra_info", {}) or {}


def _backend(b: dict) -> str:
    return _info(b).get("backend") or b.get("params", {}).get("backend", b["name"])


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None or isinstance(value, str) else format(value, spec)


def median(b: dict) -> float | None:
    """The case's median in seconds: do_bench's (``extra_info.median_s``) when recorded, else pytest-benchmark's."""
    m = _info(b).get("median_s")
    if isinstance(m, (int, float)) and m > 0:
        return float(m)
    return (b.get("stats") or {}).get("median")


def load(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """All benchmark records and the files' commit headers."""
    benches, headers = [], []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:  # e.g. the empty file pytest-benchmark leaves when nothing ran
            headers.append({"path": path, "commit": "?", "datetime": f"unreadable ({type(exc).__name__})"})
            continue
        headers.append({"path": path, "commit": data.get("commit_info", {}).get("id", "?")[:10],
                        "datetime": data.get("datetime", "?")})
        benches.extend(data.get("benchmarks", []))
    return benches, headers


def _key(b: dict) -> tuple[str, str, str]:
    """``(op, shape name, dtype)``; records without them (older suites) fall back to their group."""
    i = _info(b)
    if "op" in i:
        return i["op"], i.get("shape_name", i.get("shape", "?")), i.get("dtype", "float32")
    return b.get("group") or "ungrouped", "", ""


def _groups(benches: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in benches:
        groups[_key(b)][_backend(b)] = b
    return groups


def _ours(rows: dict[str, dict]) -> dict | None:
    for name in OURS_ORDER:
        if name in rows and median(rows[name]):
            return rows[name]
    return None


def tables(benches: list[dict]) -> str:
    out = []
    for (op, shape, dtype), rows in sorted(_groups(benches).items()):
        ours = _ours(rows)
        ours_t = median(ours) if ours else None
        first = _info(next(iter(rows.values())))
        out.append(f"#### {op} — {first.get('shape', shape)}, {dtype}\n")
        out.append(f"Roofline from {first.get('measured_peak_hbm_GBps', '?')} GB/s (device copy) and the matmul rate "
                   f"of each row's precision, measured in the same run; ours = {_backend(ours) if ours else '–'}.\n")
        out.append("| backend | median ms | time ÷ ours | GB/s | TFLOP/s | precision (TFLOP/s) | % of roofline | peak MiB | validated |")
        out.append("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |")
        for backend, b in sorted(rows.items(), key=lambda kv: median(kv[1]) or float("inf")):
            info, t = _info(b), median(b)
            ratio = t / ours_t if (t and ours_t) else None
            peak = info.get("peak_memory_bytes")
            prec = info.get("matmul_precision")
            prec_s = f"{prec} ({info.get('measured_peak_mm_TFLOPs', '?')})" if prec else "–"
            valid = {True: "yes", False: "**NO**"}.get(info.get("validated"), "–")
            out.append(
                f"| {backend} | {_fmt(t * 1e3 if t else None, '.3f')} | {_fmt(ratio, '.1f')} | "
                f"{_fmt(info.get('GBps'), '.0f')} | {_fmt(info.get('TFLOPs'), '.2f')} | {prec_s} | "
                f"{_fmt(info.get('pct_of_roofline'), '.0f')} | "
                f"{_fmt(peak / 2**20 if peak is not None else None, '.0f')} | {valid} |"
            )
        configs = _info(ours or {}).get("kernel_configs")
        if configs:
            out.append("\nTriton configurations: " + "; ".join(f"`{k}`: {v}" for k, v in sorted(configs.items())))
        out.append("")
    return "\n".join(out)


def target_rows(benches: list[dict]) -> list[dict]:
    """Every target evaluated on every group that has both rows (EQUSS shape first)."""
    rows_out = []
    for (op, shape, dtype), rows in sorted(_groups(benches).items(), key=lambda kv: kv[0][1] not in TARGET_SHAPES):
        if dtype != "float32":
            continue
        for t_op, ours, other, need in SPEED_TARGETS:
            if op == t_op and ours in rows and other in rows and median(rows[ours]) and median(rows[other]):
                ratio = median(rows[other]) / median(rows[ours])
                rows_out.append({"what": f"{op} ({shape}): {ours} vs {other}, speed", "measured": f"{ratio:.1f}×",
                                 "need": f"≥ {need:g}×", "met": ratio >= need, "binding": shape in TARGET_SHAPES})
        for t_op, ours, other, need in MEMORY_TARGETS:
            if op == t_op and ours in rows and other in rows:
                a, b = _info(rows[ours]).get("peak_memory_bytes"), _info(rows[other]).get("peak_memory_bytes")
                if a and b:
                    ratio = b / a
                    rows_out.append({"what": f"{op} ({shape}): {ours} peak memory vs {other}",
                                     "measured": f"1/{ratio:.1f}", "need": f"≤ 1/{need:g}", "met": ratio >= need,
                                     "binding": shape in TARGET_SHAPES})
    return rows_out


def targets(benches: list[dict]) -> str:
    rows = target_rows(benches)
    if not rows:
        return "(no group has the rows the targets compare)\n"
    out = ["| target | measured | needed | |", "| --- | ---: | ---: | --- |"]
    for r in rows:
        out.append(f"| {r['what']} | {r['measured']} | {r['need']} | {'met' if r['met'] else '**NOT met**'} |")
    return "\n".join(out) + "\n"


def _header(benches: list[dict], headers: list[dict], summary: dict | None) -> list[str]:
    first = _info(benches[0]) if benches else {}
    env = (summary or {}).get("env") or {}
    device = first.get("device") or (env.get("gpu") or {}).get("name") or "?"
    lines = [f"## GPU benchmarks ({device})", ""]
    commit = env.get("commit") or (headers[0]["commit"] if headers else "?")
    lines.append(f"- commit {commit}" + (f", sources {env['source_hash']}" if env.get("source_hash") else "")
                 + (f", {headers[0]['datetime']}" if headers else ""))
    versions = first.get("versions")
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    precision = next((_info(b).get("triton_precision") for b in benches if _info(b).get("triton_precision")), None)
    if precision:
        lines.append(f"- Triton fp32 matmul precision: {precision}")
    smi = env.get("nvidia_smi")
    if isinstance(smi, str) and "\n" in smi:
        head, *vals = smi.strip().splitlines()
        lines.append("- nvidia-smi: " + "; ".join(f"{k.strip()}: {v.strip()}" for k, v in zip(head.split(","), vals[0].split(","))))
    if env.get("mode") == "rehearse" or (summary or {}).get("mode") == "rehearse":
        lines.append("- **CPU rehearsal** (tiny shapes, Triton interpreter): the numbers mean nothing")
    lines += [f"- data: `{Path(h['path']).name}`" for h in headers]
    return lines


def stages(summary: dict | None) -> str:
    if not summary or not summary.get("stages"):
        return ""
    out = ["### Proof stages", "", "| stage | status | seconds | budget | note |", "| --- | --- | ---: | ---: | --- |"]
    for row in summary.get("stage_table") or [[n] for n in summary["stages"]]:
        e = summary["stages"].get(row[0])
        if e:
            out.append(f"| {row[0]} | {e['status']} | {e['seconds']} | {e['budget_s']} | {(e.get('note') or '')[:100]} |")
    extra = []
    build = summary.get("build") or {}
    ext = (build.get("backends") or {}).get("ext")
    if ext:
        extra.append(f"- extension: {ext.get('detail')}")
    for stage in ("correctness", "bench", "large"):
        r = summary.get(stage)
        if r:
            extra.append(f"- {stage}: {r.get('passed', 0)} passed, {len(r.get('failed', []))} failed, "
                         f"{sum((r.get('skipped') or {}).values())} skipped ({r.get('budget_skipped', 0)} for the budget), "
                         f"{len(r.get('collection_errors', []))} collection errors")
    train = summary.get("train")
    if train:
        res = train.get("results") or {}
        extra.append(f"- scripts/train.py: rc {train.get('rc')} in {train.get('seconds')} s; results: "
                     + (json.dumps(res)[:300] if res else "none"))
    return "\n".join(out + [""] + extra) + "\n"


def render(paths: list[str], summary: dict | None = None) -> str:
    benches, headers = load(paths) if paths else ([], [])
    head = _header(benches, headers, summary)
    body = [
        "\n".join(head), "",
        "### Targets (EQUSS shape N = 25,088, M = 32, K = 256, Ds = 32, fp32)", "",
        targets(benches) if benches else "(no benchmark records yet)\n",
        stages(summary),
        "### Tables", "",
        tables(benches) if benches else "(no benchmark records)\n",
    ]
    return "\n".join(body)


def write_readme(readme: Path, text: str) -> None:
    """Put ``text`` between the markers of the README's Benchmarks section (added at its end if absent)."""
    doc = readme.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in doc and END in doc:
        start, end = doc.index(BEGIN), doc.index(END) + len(END)
        doc = doc[:start] + block + doc[end:]
    else:
        m = re.search(r"^## Benchmarks[^\n]*\n", doc, flags=re.M)
        if m is None:
            doc = doc.rstrip() + "\n\n## Benchmarks\n\n" + block + "\n"
        else:
            nxt = re.search(r"^## ", doc[m.end():], flags=re.M)
            at = m.end() + nxt.start() if nxt else len(doc)
            doc = doc[:at].rstrip() + "\n\n" + block + "\n\n" + doc[at:]
    readme.write_text(doc, encoding="utf-8")


def demote(text: str) -> str:
    """Every markdown heading one level down (the report's ``##`` becomes a ``###`` under ``## Benchmarks``)."""
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--summary", help="summary.json of scripts/bench_gpu.sh")
    parser.add_argument("--readme", help="write between the gpu-proof markers of this README instead of printing")
    args = parser.parse_args(argv)
    summary = json.loads(Path(args.summary).read_text(encoding="utf-8")) if args.summary else None
    text = render([p for p in args.json if Path(p).is_file()], summary)
    if args.readme:
        write_readme(Path(args.readme), demote(text))
        print(f"wrote the GPU report into {args.readme}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

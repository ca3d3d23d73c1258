"""pytest-benchmark JSON (from ``benchmarks/test_bench_gpu.py``) → markdown comparison tables.

Usage::

    python benchmarks/report.py benchmarks/results/<device>-<commit>.json [more.json ...]

One table per benchmark group (op × shape × dtype): median time, speed-up of our Triton path over each
row, achieved GB/s and TFLOP/s, percentage of the roofline measured in the same session, peak memory.
A final section checks the targets of issue #4 (ratios between rows of the same run).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

# Issue #4 targets: (group prefix, our row, other row, minimum time ratio other/ours).
SPEED_TARGETS = [
    ("assign", "triton-fused", "torch", 5.0),
    ("assign", "triton-fused", "authors", 30.0),
    ("train_step", "triton-fused", "vqp", 5.0),
    ("ema_update", "triton", "authors", 5.0),
]
MEMORY_TARGETS = [("train_step", "triton-fused", "vqp", 4.0)]  # ours ≤ 1/4 of vqp's peak memory
ROOFLINE_TARGET = ("assign", "triton-fused", 50.0)  # within 2× of the roofline = ≥ 50 %


def _backend(bench: dict) -> str:
    return bench.get("extra_info", {}).get("backend") or bench.get("params", {}).get("backend", bench["name"])


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None or isinstance(value, str) else format(value, spec)


def load(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """All benchmark records and the files' machine/commit headers."""
    benches, headers = [], []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        headers.append(
            {
                "path": path,
                "commit": data.get("commit_info", {}).get("id", "?")[:10],
                "datetime": data.get("datetime", "?"),
            }
        )
        benches.extend(data.get("benchmarks", []))
    return benches, headers


def _groups(benches: list[dict]) -> dict[str, dict[str, dict]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in benches:
        groups[b.get("group") or "ungrouped"][_backend(b)] = b
    return groups


def _median(b: dict) -> float | None:
    stats = b.get("stats") or {}
    return stats.get("median")


def tables(benches: list[dict]) -> str:
    out = []
    for group, rows in sorted(_groups(benches).items()):
        ours = rows.get("triton-fused") or rows.get("triton")
        ours_t = _median(ours) if ours else None
        first = next(iter(rows.values())).get("extra_info", {})
        out.append(f"### {group}\n")
        out.append(
            f"{first.get('shape', '')} on {first.get('device', '?')}; roofline from "
            f"{first.get('measured_peak_hbm_GBps', '?')} GB/s, {first.get('measured_peak_mm_TFLOPs', '?')} TFLOP/s "
            f"measured in the same run\n"
        )
        out.append("| backend | median ms | ours is × faster | GB/s | TFLOP/s | % of roofline | peak MiB |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for backend, b in sorted(rows.items(), key=lambda kv: _median(kv[1]) or float("inf")):
            info, t = b.get("extra_info", {}), _median(b)
            speedup = t / ours_t if (t and ours_t) else None
            peak = info.get("peak_memory_bytes")
            out.append(
                f"| {backend} | {_fmt(t * 1e3 if t else None, '.3f')} | {_fmt(speedup, '.1f')} | "
                f"{_fmt(info.get('GBps'), '.0f')} | {_fmt(info.get('TFLOPs'), '.2f')} | "
                f"{_fmt(info.get('pct_of_roofline'), '.0f')} | {_fmt(peak / 2**20 if peak is not None else None, '.0f')} |"
            )
        configs = (ours or {}).get("extra_info", {}).get("kernel_configs")
        if configs:
            out.append(
                "\nTriton configurations: " + "; ".join(f"`{k}`: {v}" for k, v in sorted(configs.items()))
            )
        out.append("")
    return "\n".join(out)


def targets(benches: list[dict]) -> str:
    """Markdown list: each issue #4 target per matching group, met or not, with the measured ratio."""
    lines = []
    for group, rows in sorted(_groups(benches).items()):
        for prefix, ours, other, need in SPEED_TARGETS:
            if (
                group.startswith(prefix)
                and ours in rows
                and other in rows
                and _median(rows[ours])
                and _median(rows[other])
            ):
                ratio = _median(rows[other]) / _median(rows[ours])
                lines.append(
                    f"- {group}: {ours} vs {other}: {ratio:.1f}× faster (target ≥ {need:g}×) — {'met' if ratio >= need else 'NOT met'}"
                )
        for prefix, ours, other, need in MEMORY_TARGETS:
            if group.startswith(prefix) and ours in rows and other in rows:
                a = rows[ours].get("extra_info", {}).get("peak_memory_bytes")
                b = rows[other].get("extra_info", {}).get("peak_memory_bytes")
                if a and b:
                    ratio = b / a
                    lines.append(
                        f"- {group}: {ours} peak memory is 1/{ratio:.1f} of {other}'s (target ≤ 1/{need:g}) — {'met' if ratio >= need else 'NOT met'}"
                    )
        prefix, ours, need = ROOFLINE_TARGET
        if group.startswith(prefix) and ours in rows:
            pct = rows[ours].get("extra_info", {}).get("pct_of_roofline")
            if isinstance(pct, (int, float)):
                lines.append(
                    f"- {group}: {ours} at {pct:.0f}% of roofline (target ≥ {need:g}%, i.e. within 2×) — {'met' if pct >= need else 'NOT met'}"
                )
    return "\n".join(lines) if lines else "(no groups with the rows the targets compare)"


def render(paths: list[str]) -> str:
    benches, headers = load(paths)
    if not benches:
        return "No benchmark records in " + ", ".join(paths) + " (were they run without a GPU?)\n"
    first = benches[0].get("extra_info", {})
    head = [f"## GPU benchmarks ({first.get('device', '?')})", ""]
    head += [f"- `{h['path']}` — commit {h['commit']}, {h['datetime']}" for h in headers]
    versions = first.get("versions")
    if versions:
        head.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return "\n".join(head) + "\n\n" + tables(benches) + "\n### Issue #4 targets\n\n" + targets(benches) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    args = parser.parse_args(argv)
    sys.stdout.write(render(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())

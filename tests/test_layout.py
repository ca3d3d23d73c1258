"""The import graph has no upward edge: every module imports only from its own layer or below.

Layers (README "Layout"), bottom first. Imports inside functions count too: a lazy import is still a
dependency. Siblings that must not know each other: models and data; the trainer and prediction.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("equss.kernels",)),
    ("ops", ("equss.ops", "equss.backends")),
    ("foundations", ("equss.io", "equss.normalization", "equss.palettes", "equss.runtime", "equss.checkpoint", "equss.progress",
                     "equss.losses")),
    ("layers", ("equss.nn",)),
    ("models/data", ("equss.models", "equss.data")),
    ("config", ("equss.config",)),
    ("evaluation", ("equss.evaluate", "equss.crf", "equss.report", "equss.analysis", "equss.visualize")),
    ("pipeline", ("equss.pipeline",)),
    ("applications", ("equss.train", "equss.predict", "equss.cli")),
]
SIBLINGS = [("equss.models", "equss.data"), ("equss.train", "equss.predict")]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["equss", *parts]  # installed as equss.kernels
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int | None:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                best = rank
    return best


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m == "equss" or m.startswith("equss.")}


def _package_files() -> list[Path]:
    return sorted((ROOT / "equss").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def test_every_module_has_a_layer():
    missing = [_module_name(p) for p in _package_files()
               if _module_name(p) != "equss" and _layer(_module_name(p)) is None]
    assert not missing, f"modules outside every layer of README 'Layout': {missing}"


def test_no_import_points_upward_or_across_siblings():
    bad = []
    for path in _package_files():
        src = _module_name(path)
        if src == "equss":  # the package face re-exports the public API
            continue
        for target in _imports(path):
            rank = _layer(target)
            if rank is None:
                continue  # e.g. `from equss.ops import pq_assign` resolves to a layered prefix anyway
            if rank > _layer(src):
                bad.append(f"{src} -> {target} (layer {LAYERS[_layer(src)][0]} imports {LAYERS[rank][0]})")
            for a, b in SIBLINGS:
                for x, y in ((a, b), (b, a)):
                    if (src == x or src.startswith(x + ".")) and (target == y or target.startswith(y + ".")):
                        bad.append(f"{src} -> {target} (siblings)")
    assert not bad, "\n".join(bad)

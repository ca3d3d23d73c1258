"""scripts/readme_results.py, reduced (--quick): the README section it writes has the tables, the
provenance (commit and command) and the figures, and nothing outside the markers changes."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_writes_the_section(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", readme)
    before = readme.read_text()
    figures = tmp_path / "figures"
    proc = subprocess.run(
        [sys.executable, "scripts/readme_results.py", "--quick", "--readme", str(readme),
         "--out-dir", str(tmp_path / "runs"), "--figures-dir", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    after = readme.read_text()
    start, end = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
    assert before.split(start)[0] == after.split(start)[0] and before.split(end)[1] == after.split(end)[1]
    section = after.split(start)[1].split(end)[0]

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert f"`python scripts/readme_results.py --quick` at commit `{sha}" in section
    assert "Quick mode" in section
    # the default's table: chance, k-means, linear on frozen features, EQUSS, EQUSS + CRF, all with numbers
    for row in ("chance (majority class)", "k-means on the frozen backbone features",
                "linear probe on the frozen backbone features", "EQUSS", "EQUSS + CRF"):
        assert re.search(rf"^\| {re.escape(row)}[^|]*\|.*\d+\.\d", section, re.M), row
    assert "reproduces the EQUSS row exactly" in section
    # the variants table: the default and three variants, eight cells each, a signed margin at the end
    rows = [ln for ln in section.splitlines() if re.match(r"^\| (default|seed \d)", ln)]
    assert len(rows) == 4
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == 8 and re.fullmatch(r"[+-]\d+\.\d", cells[-1]), ln
    # every figure the section shows was written, with a caption
    shown = re.findall(r"!\[[^\]]*\]\(docs/demo/([\w.]+)\)", section)
    assert "predictions.png" in shown and "class_entropy.png" in shown
    for name in shown:
        assert (figures / name).stat().st_size > 1000, name

    # --render-only rewrites the same section from the finished run (its commit, its times)
    proc = subprocess.run(
        [sys.executable, "scripts/readme_results.py", "--render-only", "--readme", str(readme),
         "--out-dir", str(tmp_path / "runs"), "--figures-dir", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert readme.read_text() == after

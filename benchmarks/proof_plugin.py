"""pytest plugin of the GPU proof's test stages (``scripts/bench_gpu.sh``): ``-p benchmarks.proof_plugin``.

Environment (all optional):

* ``EQUSS_PROOF_DEADLINE``: epoch seconds; a test that would start after it is skipped ("budget"), so the
  session ends in time and still writes its JUnit XML and pytest-benchmark JSON.
* ``EQUSS_PROOF_INTERLEAVE=1``: run the test files round-robin (each op gets tested before a deadline).
* ``EQUSS_PROOF_PRIORITY``: comma-separated substrings of node ids; matching tests run first, in that order.
* ``EQUSS_PROOF_MAX_TESTS``: keep only the first N tests after ordering (the rest are deselected).
* ``EQUSS_PROOF_RESULT``: write the outcome here as JSON (after every test, and at the end with the exit
  status): counts, failures, collection errors, skip reasons.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict

import pytest

_state: dict = {
    "passed": 0,
    "failed": [],
    "errors": [],
    "skipped": Counter(),
    "budget_skipped": 0,
    "collection_errors": [],
    "collected": 0,
    "selected": 0,
    "deselected_by_cap": 0,
    "started": time.time(),
}


def _env_float(name: str) -> float:
    try:
        return float(os.environ.get(name, "") or 0)
    except ValueError:
        return 0.0


def _module(item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    _state["collected"] = len(items)
    priority = [p for p in os.environ.get("EQUSS_PROOF_PRIORITY", "").split(",") if p]
    if priority:
        rank = lambda it: next((i for i, p in enumerate(priority) if p in it.nodeid), len(priority))
        items.sort(key=rank)  # stable: file and parametrisation order otherwise
    if os.environ.get("EQUSS_PROOF_INTERLEAVE") == "1":
        queues: dict[str, list] = defaultdict(list)
        for it in items:
            queues[_module(it)].append(it)
        mixed = []
        while any(queues.values()):
            for q in queues.values():
                if q:
                    mixed.append(q.pop(0))
        items[:] = mixed
    cap = int(_env_float("EQUSS_PROOF_MAX_TESTS"))
    if cap and len(items) > cap:
        dropped = items[cap:]
        items[:] = items[:cap]
        config.hook.pytest_deselected(items=dropped)
        _state["deselected_by_cap"] = len(dropped)
    _state["selected"] = len(items)


def pytest_runtest_setup(item):
    deadline = _env_float("EQUSS_PROOF_DEADLINE")
    if deadline and time.time() > deadline:
        _state["budget_skipped"] += 1
        pytest.skip("GPU proof: this stage's time budget is spent")


def pytest_collectreport(report):
    if report.failed:
        _state["collection_errors"].append(f"{report.nodeid}: {str(report.longrepr).strip().splitlines()[-1]}")


def _dump(exitstatus=None) -> None:
    path = os.environ.get("EQUSS_PROOF_RESULT")
    if not path:
        return
    out = dict(_state, skipped=dict(_state["skipped"]), exitstatus=exitstatus,
               seconds=round(time.time() - _state["started"], 1))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _state["passed"] += 1
    elif report.failed:
        line = str(report.longrepr).strip().splitlines()[-1] if report.longrepr else ""
        (_state["failed"] if report.when == "call" else _state["errors"]).append(f"{report.nodeid}: {line[:300]}")
    elif report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _state["skipped"][reason.removeprefix("Skipped: ")[:200]] += 1
    if report.when == "teardown":
        _dump()  # after every test: a stage stopped at its budget keeps what ran


def pytest_collection_finish(session):
    _dump()


def pytest_sessionfinish(session, exitstatus):
    _dump(int(exitstatus))

"""Run the cases of ``benchmarks/test_bench_gpu.py`` in the order of its ``CASES`` list (most important
first), across its per-op test functions; every other test keeps its place."""

from __future__ import annotations


def pytest_collection_modifyitems(session, config, items):
    slots, bench = [], []
    for i, item in enumerate(items):
        order = getattr(item.module, "CASE_ORDER", None) if hasattr(item, "module") else None
        callspec = getattr(item, "callspec", None)
        if order is not None and callspec is not None and "case" in callspec.params:
            slots.append(i)
            bench.append((order.get(callspec.params["case"].id, len(order)), item))
    for i, (_, item) in zip(slots, sorted(bench, key=lambda t: t[0])):
        items[i] = item

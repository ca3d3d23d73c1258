"""Run the cases of ``benchmarks/test_bench_gpu.py`` in the order of its ``CASES`` list (most important
first), across its per-op test functions, and drop the functions that have no case for the shapes chosen
(``$EQUSS_BENCH_SHAPES``: the large shape has no module step); every other test keeps its place."""

from __future__ import annotations


def pytest_collection_modifyitems(session, config, items):
    slots, bench, empty = [], [], []
    for i, item in enumerate(items):
        order = getattr(getattr(item, "module", None), "CASE_ORDER", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if order is None or "case" not in params:
            continue
        case = params["case"]
        if not hasattr(case, "id"):  # an empty parametrisation
            empty.append(item)
            continue
        slots.append(i)
        bench.append((order.get(case.id, len(order)), item))
    for i, (_, item) in zip(slots, sorted(bench, key=lambda t: t[0])):
        items[i] = item
    if empty:
        items[:] = [it for it in items if it not in empty]
        config.hook.pytest_deselected(items=empty)

"""GPU benchmarks of the PQ hot path: our Triton kernels, our C++/CUDA extension, the PyTorch reference,
the authors' per-subspace formulation and vector-quantize-pytorch, in one session on one device, every
result validated before it is timed (:mod:`benchmarks.harness`, cases in :mod:`benchmarks.cases`).

One test function per op over one ordered list of cases (``CASES``; ``benchmarks/conftest.py`` runs
them in that order): the rows that the targets of ``benchmarks/report.py`` compare come first, so a run
cut short by its time budget (``scripts/bench_gpu.sh``) still has them. At the EQUSS shape every op and every implementation; at the
large shape (``large``: 10^6 vectors, M = 64, K = 1024) our kernels and the PyTorch reference only (the
authors' loop and vqp materialise N×K per subspace), with the fewest calls that give a stable median.

Shapes: ``$EQUSS_BENCH_SHAPES`` (default ``equss_train,large``; ``tiny,tiny_large`` in the CPU rehearsal,
:mod:`benchmarks.shapes`). Device: CUDA; ``EQUSS_BENCH_DEVICE=cpu`` runs the same cases on CPU with the
Triton interpreter (the rehearsal; meaningless timings). Without either, every case skips.

Run on a GPU: ``scripts/bench_gpu.sh`` (the whole proof) or ``pytest benchmarks/test_bench_gpu.py
--benchmark --benchmark-json=out.json``.
"""

from __future__ import annotations

import pytest

from benchmarks import harness as H
from benchmarks.cases import Case, build
from benchmarks.shapes import GPU_SHAPES, bench_shapes

pytestmark = pytest.mark.skipif(
    not H.ON_CUDA and H._FORCED != "cpu",
    reason="GPU benchmarks need a CUDA device (EQUSS_BENCH_DEVICE=cpu runs them on CPU for the rehearsal)",
)

OURS = ("triton-fused", "triton", "ext", "torch")
UNFUSED = ("triton", "ext", "torch")


def cases_for(shape) -> list[Case]:
    """The cases of one shape, most important first (the target rows, then the rest)."""
    if H.is_large(shape):
        return [
            *(Case("assign_gather", b, shape) for b in OURS),
            *(Case("ema_update", b, shape) for b in UNFUSED),
            Case("assign_gather_stats", "triton-fused", shape),
            Case("assign_gather_stats", "torch", shape),
            *(Case("assign_gather", b, shape, "bfloat16") for b in ("triton-fused", "torch")),
            *(Case("assign", b, shape) for b in UNFUSED),
        ]
    return [
        # the targets' rows
        *(Case("assign_gather", b, shape) for b in ("triton-fused", "torch", "authors")),
        *(Case("module_step-ema", b, shape) for b in ("triton", "vqp")),
        *(Case("ema_update", b, shape) for b in ("triton", "authors")),
        # every other implementation of the same ops
        *(Case("assign_gather", b, shape) for b in ("triton", "ext")),
        *(Case("module_step-ema", b, shape) for b in ("ext", "torch")),
        *(Case("ema_update", b, shape) for b in ("ext", "torch")),
        *(Case("assign_gather_stats", b, shape) for b in (*OURS, "authors")),
        *(Case("train_step", b, shape) for b in ("triton-fused", "vqp", *UNFUSED, "authors")),
        *(Case("assign", b, shape) for b in UNFUSED),
        *(Case("assign_gather", b, shape, "bfloat16") for b in (*OURS, "authors")),
        *(Case("module_step-param", b, shape) for b in UNFUSED),
    ]


CASES = [c for shape in bench_shapes(GPU_SHAPES) for c in cases_for(shape)]
# Case id → position: benchmarks/conftest.py runs the cases in this order across the test functions.
CASE_ORDER = {c.id: i for i, c in enumerate(CASES)}


def _run(benchmark, case: Case) -> None:
    H.require(case.backend)
    fn, validate, bytes_moved, flops = build(case)
    H.run_case(benchmark, fn, validate, op=case.op, backend=case.backend, shape=case.shape,
               dtype_name=case.dtype_name, bytes_moved=bytes_moved, flops=flops)


def _cases(*ops: str):
    """Parametrise one test function over the cases of ``ops`` (ids = case ids)."""
    chosen = [c for c in CASES if c.op in ops]
    return pytest.mark.parametrize("case", chosen, ids=[c.id for c in chosen])


# One test function per op; the names of the first two are the ones scripts/kernel_model.py --calibrate
# maps to its modelled ops (assign + gather, EMA statistics + apply).
@_cases("assign_gather")
def test_assign(benchmark, case):
    _run(benchmark, case)


@_cases("ema_update")
def test_ema_update(benchmark, case):
    _run(benchmark, case)


@_cases("assign")
def test_assign_only(benchmark, case):
    _run(benchmark, case)


@_cases("assign_gather_stats")
def test_assign_gather_stats(benchmark, case):
    _run(benchmark, case)


@_cases("train_step")
def test_train_step(benchmark, case):
    _run(benchmark, case)


@_cases("module_step-ema", "module_step-param")
def test_module_step(benchmark, case):
    _run(benchmark, case)

"""Benchmark shapes shared by every suite (names from the glossary in docs/method.md).

``equss_train``: one EQUSS training step, 16 images × 2 views × 28×28 positions, D = 1024 = 32 × 32.
``large``: offline quantization of 10^6 vectors, D = 2048 = 64 × 32, K = 1024.
``cpu_small``: a shape that the CPU suites can afford to repeat.
``tiny`` / ``tiny_large``: stand-ins of ``equss_train`` / ``large`` for the CPU rehearsal of the GPU proof
(``scripts/bench_gpu.sh --rehearse``: Triton interpreter, same code paths, shapes small enough for it).

``EQUSS_BENCH_SHAPES`` (comma-separated names) picks the shapes of the GPU suites
(``benchmarks/test_bench_gpu.py``, ``benchmarks/test_bench_module.py``): :func:`bench_shapes`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class PQShape:
    name: str
    N: int
    M: int
    K: int
    Ds: int

    @property
    def D(self) -> int:
        return self.M * self.Ds

    def __str__(self) -> str:
        return f"{self.name}(N={self.N},M={self.M},K={self.K},Ds={self.Ds})"


EQUSS_TRAIN = PQShape("equss_train", N=25_088, M=32, K=256, Ds=32)
LARGE = PQShape("large", N=1_000_000, M=64, K=1024, Ds=32)
CPU_SMALL = PQShape("cpu_small", N=4_096, M=32, K=256, Ds=32)

CPU_SHAPES = (EQUSS_TRAIN,)
GPU_SHAPES = (EQUSS_TRAIN, LARGE)
TINY = PQShape("tiny", N=256, M=2, K=32, Ds=16)
TINY_LARGE = PQShape("tiny_large", N=1_024, M=2, K=64, Ds=32)

SHAPES = {s.name: s for s in (EQUSS_TRAIN, LARGE, CPU_SMALL, TINY, TINY_LARGE)}
# The large shape's stand-in: suites give it the large shape's treatment (fewer calls, fewer rows).
LARGE_LIKE = ("large", "tiny_large")


def bench_shapes(default: tuple[PQShape, ...] = GPU_SHAPES, env: str = "EQUSS_BENCH_SHAPES") -> tuple[PQShape, ...]:
    """The shapes named in ``$EQUSS_BENCH_SHAPES`` (comma-separated), else ``default``."""
    spec = os.environ.get(env, "").strip()
    if not spec:
        return default
    try:
        return tuple(SHAPES[name.strip()] for name in spec.split(",") if name.strip())
    except KeyError as exc:
        raise ValueError(f"{env}={spec!r}: unknown shape {exc}; known: {sorted(SHAPES)}") from None

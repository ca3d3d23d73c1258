"""Benchmark shapes shared by every suite (names from the glossary in docs/method.md).

``equss_train``: one EQUSS training step, 16 images × 2 views × 28×28 positions, D = 1024 = 32 × 32.
``large``: offline quantization of 10^6 vectors, D = 2048 = 64 × 32, K = 1024.
``cpu_small``: a shape that the CPU suites can afford to repeat.
"""

from __future__ import annotations

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

"""CPU benchmark of PQ assignment (nearest codeword per row and subspace), group ``assign-cpu``.

Backends, all on the same fp32 data and the same thread count (``THREADS``):

* ``torch_ref``: :func:`equss.ops.reference.pq_assign_ref` (bmm + min over the materialised distances).
* ``ext``: the C++ extension's fused kernel (``torch.ops.equss_C.pq_assign``; AVX2/FMA where available).
* ``faiss``: ``faiss.ProductQuantizer(D, M, 8).compute_codes`` with the same centroids (l2 only: faiss
  encodes with L2; it returns uint8 codes and no distances, so it does a little less work than the others).

Run with ``pytest benchmarks/test_bench_assign_cpu.py --benchmark`` (without ``--benchmark`` every case
runs once as a smoke test). ``extra_info`` holds FLOPs (N·D·K·2), bytes moved (read x and codebooks,
write codes and distances), GFLOP/s, GB/s and the thread count.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.shapes import CPU_SHAPES, PQShape
from equss import backends
from equss.ops.reference import pq_assign_ref

THREADS = 2
BACKENDS = ["torch_ref", "ext", "faiss"]


def _data(shape: PQShape) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape.N, shape.M, shape.Ds, generator=g)
    codebooks = torch.randn(shape.M, shape.K, shape.Ds, generator=g)
    return x, codebooks


def _runner(backend: str, x: torch.Tensor, codebooks: torch.Tensor, metric: str):
    """A zero-argument callable that assigns all of x, and the bytes it writes per (row, subspace)."""
    if backend == "torch_ref":
        return (lambda: pq_assign_ref(x, codebooks, metric)), 8
    if backend == "ext":
        info = backends.info("ext")
        if not info.loaded:
            pytest.skip(f"ext backend not loaded: {info.detail}")
        op = torch.ops.equss_C.pq_assign
        return (lambda: op(x, codebooks, metric)), 8
    if importlib.util.find_spec("faiss") is None:
        pytest.skip("faiss not installed (pip install faiss-cpu)")
    if metric != "l2":
        pytest.skip("faiss.ProductQuantizer encodes with the L2 distance only")
    import faiss

    faiss.omp_set_num_threads(THREADS)
    N, M, Ds = x.shape
    K = codebooks.shape[1]
    assert K == 256, "ProductQuantizer(D, M, 8) has 2^8 = 256 centroids per subspace"
    pq = faiss.ProductQuantizer(M * Ds, M, 8)
    faiss.copy_array_to_vector(codebooks.numpy().ravel(), pq.centroids)
    flat = x.reshape(N, M * Ds).numpy()
    return (lambda: pq.compute_codes(flat)), 1


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_assign_cpu(benchmark, backend, shape, metric):
    benchmark.group = "assign-cpu"
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        x, codebooks = _data(shape)
        fn, out_bytes_per_code = _runner(backend, x, codebooks, metric)
        flops = 2 * shape.N * shape.D * shape.K
        nbytes = x.numel() * 4 + codebooks.numel() * 4 + shape.N * shape.M * out_bytes_per_code
        benchmark.extra_info.update(
            shape=str(shape), metric=metric, threads=THREADS, flops=flops, bytes=nbytes, dtype="float32"
        )
        benchmark.pedantic(fn, rounds=7, warmup_rounds=1, iterations=1)
        if benchmark.stats is not None:  # None when timing is disabled (no --benchmark)
            median = benchmark.stats.stats.median
            benchmark.extra_info.update(gflops_per_s=flops / median / 1e9, gb_per_s=nbytes / median / 1e9)
    finally:
        torch.set_num_threads(previous_threads)

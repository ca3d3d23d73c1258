"""CPU benchmarks of PQ assignment (group ``assign-cpu``) and of the fused training forward
``pq_assign_gather`` (group ``assign-gather-cpu``).

``assign-cpu`` backends, all on the same fp32 data and the same thread count (``THREADS``):

* ``ext``: the C++ extension's fused kernel (``torch.ops.equss_C.pq_assign``; AVX2/FMA where available).
* ``sgemm``: ``torch.mm`` of ``[N, D] × [D, K]`` fp32 (MKL/OpenBLAS), the same FLOPs as the assignment
  (N·D·K multiply-adds): the machine's matrix-multiply rate, the yardstick of the ext kernel.
* ``torch_ref``: :func:`equss.ops.reference.pq_assign_ref` (bmm + min over the materialised distances).
* ``faiss``: ``faiss.ProductQuantizer(D, M, 8).compute_codes`` with the same centroids (l2 only: faiss
  encodes with L2; it returns uint8 codes and no distances, so it does a little less work than the others).

The ``ext`` case also times every other backend *interleaved* with itself (``COMPARE_ROUNDS`` rounds, each
round runs every backend once, in a rotating order) and records the medians and the ratios in
``extra_info``, so one run gives ext-vs-sgemm (``ratio_vs_sgemm`` = ext GFLOP/s / sgemm GFLOP/s),
ext-vs-torch and ext-vs-faiss speed-ups measured in the same seconds of machine time (on a shared machine
the load changes between test cases), plus the load average before and after.

``assign-gather-cpu``: ``ext_fused`` (``torch.ops.equss_C.pq_assign_gather``, one pass), ``ext_composite``
(the same results from the separate ext ops: ``pq_assign`` + ``pq_gather`` + the squared error in torch +
``pq_cluster_stats``) and ``torch_ref`` (:func:`equss.ops.reference.pq_assign_gather_ref`), on EQUSS-like
inputs (unit rows and codewords for the distances, raw codewords gathered, raw rows summed). The
``ext_fused`` case records interleaved medians of all three and of ``pq_assign`` alone.

Run with ``pytest benchmarks/test_bench_assign_cpu.py --benchmark`` (without ``--benchmark`` every case
runs once as a smoke test, the interleaved comparisons one round). ``extra_info`` also holds FLOPs
(N·D·K·2), bytes moved (read x and codebooks, write codes and distances), GFLOP/s, GB/s and the thread
count.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from benchmarks.shapes import CPU_SHAPES, PQShape
from equss import backends
from equss.ops.reference import pq_assign_gather_ref, pq_assign_ref

THREADS = 2
ROUNDS = 7
COMPARE_ROUNDS = 7
BACKENDS = ["ext", "sgemm", "torch_ref", "faiss"]
FUSED_BACKENDS = ["ext_fused", "ext_composite", "torch_ref"]


def _data(shape: PQShape) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape.N, shape.M, shape.Ds, generator=g)
    codebooks = torch.randn(shape.M, shape.K, shape.Ds, generator=g)
    return x, codebooks


def _need_ext() -> None:
    info = backends.info("ext")
    if not info.loaded:
        pytest.skip(f"ext backend not loaded: {info.detail}")


def _faiss_unavailable(metric: str) -> str | None:
    if importlib.util.find_spec("faiss") is None:
        return "faiss not installed (pip install faiss-cpu)"
    if metric != "l2":
        return "faiss.ProductQuantizer encodes with the L2 distance only"
    return None


def _runner(backend: str, x: torch.Tensor, codebooks: torch.Tensor, metric: str):
    """A zero-argument callable that assigns all of x (sgemm: the same FLOPs as one matrix product), and the
    bytes it writes per (row, subspace)."""
    N, M, Ds = x.shape
    K = codebooks.shape[1]
    if backend == "torch_ref":
        return (lambda: pq_assign_ref(x, codebooks, metric)), 8
    if backend == "ext":
        _need_ext()
        op = torch.ops.equss_C.pq_assign
        return (lambda: op(x, codebooks, metric)), 8
    if backend == "sgemm":
        a = x.reshape(N, M * Ds)
        b = torch.randn(M * Ds, K, generator=torch.Generator().manual_seed(1))
        return (lambda: torch.mm(a, b)), 4 * K / M  # writes the [N, K] product
    reason = _faiss_unavailable(metric)
    if reason is not None:
        pytest.skip(reason)
    import faiss

    faiss.omp_set_num_threads(THREADS)
    assert K == 256, "ProductQuantizer(D, M, 8) has 2^8 = 256 centroids per subspace"
    pq = faiss.ProductQuantizer(M * Ds, M, 8)
    faiss.copy_array_to_vector(codebooks.numpy().ravel(), pq.centroids)
    flat = x.reshape(N, M * Ds).numpy()
    return (lambda: pq.compute_codes(flat)), 1


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Median and minimum seconds of each callable over ``rounds`` rounds; every round calls each one
    once, starting one further along each round, so slow drifts of the machine's load hit all alike."""
    names = list(fns)
    for name in names:  # warm-up: allocator, faiss/torch thread pools, page faults
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(t), "min": min(t)} for n, t in times.items()}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield THREADS
    torch.set_num_threads(previous)


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_assign_cpu(benchmark, threads, backend, shape, metric):
    benchmark.group = "assign-cpu"
    x, codebooks = _data(shape)
    fn, out_bytes_per_code = _runner(backend, x, codebooks, metric)
    flops = 2 * shape.N * shape.D * shape.K
    nbytes = x.numel() * 4 + codebooks.numel() * 4 + int(shape.N * shape.M * out_bytes_per_code)
    benchmark.extra_info.update(
        backend=backend, shape=str(shape), metric=metric, threads=threads, flops=flops, bytes=nbytes,
        dtype="float32", load_before=_load(),
    )
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    timed = benchmark.stats is not None  # None when timing is disabled (no --benchmark)
    if timed:
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(gflops_per_s=flops / median / 1e9, gb_per_s=nbytes / median / 1e9)
    if backend == "ext":
        others = ["sgemm", "torch_ref"] + ([] if _faiss_unavailable(metric) else ["faiss"])
        fns = {"ext": fn, **{name: _runner(name, x, codebooks, metric)[0] for name in others}}
        res = _interleaved(fns, COMPARE_ROUNDS if timed else 1)
        info = {f"{name}_gflops_per_s": flops / r["median"] / 1e9 for name, r in res.items()}
        info["ratio_vs_sgemm"] = res["sgemm"]["median"] / res["ext"]["median"]
        info["ratio_vs_sgemm_min"] = res["sgemm"]["min"] / res["ext"]["min"]
        info["speedup_vs_torch_ref"] = res["torch_ref"]["median"] / res["ext"]["median"]
        if "faiss" in res:
            info["speedup_vs_faiss"] = res["faiss"]["median"] / res["ext"]["median"]
        info["compare_rounds"] = COMPARE_ROUNDS if timed else 1
        benchmark.extra_info.update(info)
    benchmark.extra_info["load_after"] = _load()


# ------------------------------------------------------------------------------ fused training forward
def _fused_data(shape: PQShape):
    """EQUSS-like inputs: unit rows assigned to unit codewords, raw codewords gathered, raw rows summed."""
    g = torch.Generator().manual_seed(0)
    raw_x = torch.randn(shape.N, shape.M, shape.Ds, generator=g)
    raw_cb = torch.randn(shape.M, shape.K, shape.Ds, generator=g)
    x = torch.nn.functional.normalize(raw_x, dim=-1)
    unit = torch.nn.functional.normalize(raw_cb, dim=-1)
    return x, unit, raw_cb, raw_x


def _fused_runner(backend: str, x, cb, cb_out, stats_x, metric: str):
    if backend == "torch_ref":
        return lambda: pq_assign_gather_ref(x, cb, cb_out, metric, stats_x)
    _need_ext()
    ops = torch.ops.equss_C
    if backend == "ext_fused":
        return lambda: ops.pq_assign_gather(x, cb, cb_out, metric, stats_x)
    if backend == "ext_assign":
        return lambda: ops.pq_assign(x, cb, metric)
    K = cb.shape[1]

    def composite():
        codes, min_dist = ops.pq_assign(x, cb, metric)
        quantized = ops.pq_gather(codes, cb_out)
        sq_err = (x.float() - quantized.float()).square().sum(-1)
        kept = torch.where(torch.isnan(min_dist), torch.full((), -1, dtype=codes.dtype), codes)
        counts, sums = ops.pq_cluster_stats(stats_x, kept, K)
        return codes, min_dist, quantized, sq_err, counts, sums

    return composite


@pytest.mark.parametrize("metric", ["dot", "l2"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bench_assign_gather_cpu(benchmark, threads, backend, shape, metric):
    benchmark.group = "assign-gather-cpu"
    x, cb, cb_out, stats_x = _fused_data(shape)
    fn = _fused_runner(backend, x, cb, cb_out, stats_x, metric)
    flops = 2 * shape.N * shape.D * shape.K
    # Read x, stats_x and both codebooks; write codes, min_dist, sq_err, quantized; counts and sums.
    nbytes = (
        3 * x.numel() * 4 + 2 * cb.numel() * 4 + 12 * shape.N * shape.M + 4 * shape.M * shape.K * (shape.Ds + 1)
    )
    benchmark.extra_info.update(
        backend=backend, shape=str(shape), metric=metric, threads=threads, flops=flops, bytes=nbytes,
        dtype="float32", load_before=_load(),
    )
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    timed = benchmark.stats is not None
    if timed:
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(gflops_per_s=flops / median / 1e9, gb_per_s=nbytes / median / 1e9)
    if backend == "ext_fused":
        names = ["ext_fused", "ext_composite", "ext_assign", "torch_ref"]
        res = _interleaved(
            {n: _fused_runner(n, x, cb, cb_out, stats_x, metric) for n in names}, COMPARE_ROUNDS if timed else 1
        )
        benchmark.extra_info.update(
            {f"{n}_median_s": r["median"] for n, r in res.items()},
            speedup_vs_composite=res["ext_composite"]["median"] / res["ext_fused"]["median"],
            speedup_vs_torch_ref=res["torch_ref"]["median"] / res["ext_fused"]["median"],
            fused_over_assign=res["ext_fused"]["median"] / res["ext_assign"]["median"],
            compare_rounds=COMPARE_ROUNDS if timed else 1,
        )
    benchmark.extra_info["load_after"] = _load()

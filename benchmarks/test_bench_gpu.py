"""GPU benchmarks of the PQ hot path: our Triton kernels, our C++/CUDA extension, the PyTorch reference,
the authors' per-subspace formulation and vector-quantize-pytorch, in one session on one device.

Groups (pytest-benchmark ``group``):

* ``assign``: assignment + gather of the quantized vectors (forward only). ``triton-fused`` is the single
  launch of :func:`equss.pq_assign_gather`; ``triton``/``ext``/``torch`` run
  ``equss.pq_assign`` + ``equss.pq_gather`` under that backend; ``authors`` is the per-subspace loop with
  its full N×K distances and softmax.
* ``train_step``: assign + gather + straight-through + commitment loss + backward + EMA update
  (:mod:`benchmarks.baselines`); ``vqp`` is vector-quantize-pytorch's ``VectorQuantize`` with one
  codebook per head doing the same.
* ``ema_update``: statistics + EMA of one step (``equss.pq_ema_update_`` per backend; ``authors`` is
  F.one_hot counts + one_hot matmul sums).

Shapes: :data:`benchmarks.shapes.GPU_SHAPES`. Every case: first call untimed (JIT compile), CUDA
synchronised inside the timed function, ``extra_info`` with the bytes and FLOPs of the work, achieved
GB/s and TFLOP/s, the roofline time from the peak HBM bandwidth (a large device copy) and matmul rate
(``torch.mm``, same dtype and TF32 setting as the case) measured in this session, the percentage of that
roofline reached, the peak memory of one call above what was allocated before it, the device, versions
and the kernel configurations used. A case that runs out of memory (the authors' loop and vqp
materialise N×K per subspace) is skipped with that reason.

Run on a GPU: ``scripts/bench_gpu.sh`` or ``pytest benchmarks/test_bench_gpu.py --benchmark
--benchmark-json=out.json``. Without CUDA every case skips.
"""

from __future__ import annotations

import functools
import importlib
import platform

import pytest
import torch

import equss
from benchmarks import baselines as B
from benchmarks.shapes import GPU_SHAPES, PQShape

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need a CUDA device")

DEVICE = torch.device("cuda")
BETA, DECAY, EPS = 0.25, 0.99, 1e-5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sync() -> None:
    torch.cuda.synchronize()


def _time_ms(fn, reps: int = 20) -> float:
    fn()
    _sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    _sync()
    return start.elapsed_time(end) / reps


@functools.cache
def measured_peaks(dtype_name: str) -> dict[str, float]:
    """Peak HBM bandwidth (device copy of 1 GiB) and matmul rate (8192³ ``torch.mm`` in ``dtype``, TF32 off)."""
    buffers = [torch.empty(1 << 28, dtype=torch.float32, device=DEVICE) for _ in range(2)]  # 2 × 1 GiB
    copy_ms = _time_ms(lambda: buffers[1].copy_(buffers[0]), reps=10)
    bw = 2 * buffers[0].numel() * 4 / (copy_ms * 1e-3)
    buffers.clear()
    n = 8192
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPES[dtype_name])
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPES[dtype_name])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        mm_ms = _time_ms(lambda: torch.mm(a, b), reps=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"hbm_GBps": bw / 1e9, "mm_TFLOPs": 2 * n**3 / (mm_ms * 1e-3) / 1e12}


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "not installed"
    if B.vqp_unavailable_reason() is None:
        from importlib.metadata import version

        out["vector_quantize_pytorch"] = version("vector-quantize-pytorch")
    return out


def _kernel_configs(shape: PQShape, dtype: torch.dtype) -> dict[str, str]:
    """The configurations the Triton launchers pick for ``shape`` and ``dtype`` (their own ``pick_config``)."""
    try:
        kc = importlib.import_module("equss.kernels._config")
        assign = importlib.import_module("equss.kernels.pq_assign")
        gather = importlib.import_module("equss.kernels.pq_gather")
        segment = importlib.import_module("equss.kernels.pq_segment_sum")
    except Exception:
        return {}
    precision = kc.resolve_precision(None)
    return {
        "pq_assign": assign.pick_config(dtype, shape.Ds, precision, False).describe(),
        "pq_assign_gather": assign.pick_config(dtype, shape.Ds, precision, True).describe(),
        "pq_gather": gather.pick_config(dtype, shape.Ds).describe(),
        "segment_sum": segment.pick_config(dtype, shape.Ds).describe(),
    }


def _require(backend: str) -> None:
    if backend in ("triton", "triton-fused", "ext", "torch"):
        name = "triton" if backend.startswith("triton") else backend
        if not equss.backends.available(name, DEVICE):
            pytest.skip(f"backend {name!r} not available on cuda: {equss.backends.info(name).detail}")
    if backend == "vqp" and B.vqp_unavailable_reason() is not None:
        pytest.skip(B.vqp_unavailable_reason())


def _run(
    benchmark,
    fn,
    *,
    bytes_moved: float,
    flops: float,
    dtype_name: str,
    shape: PQShape,
    backend: str,
    rounds: int,
):
    """Warm up (untimed), record peak memory of one call, time ``rounds`` synchronised calls, fill extra_info."""
    try:
        fn()  # JIT compilation, cuBLAS heuristics, caching allocator warm-up
        _sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _sync()
        peak = torch.cuda.max_memory_allocated() - before
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        pytest.skip(f"{backend} on {shape}: out of memory ({str(exc).splitlines()[0]})")

    def timed():
        fn()
        _sync()

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    peaks = measured_peaks(dtype_name)
    roofline_s = max(bytes_moved / (peaks["hbm_GBps"] * 1e9), flops / (peaks["mm_TFLOPs"] * 1e12))
    info = benchmark.extra_info
    info.update(
        backend=backend,
        shape=str(shape),
        dtype=dtype_name,
        bytes=bytes_moved,
        flops=flops,
        peak_memory_bytes=peak,
        device=torch.cuda.get_device_name(DEVICE),
        versions=_versions(),
        measured_peak_hbm_GBps=round(peaks["hbm_GBps"], 1),
        measured_peak_mm_TFLOPs=round(peaks["mm_TFLOPs"], 2),
        roofline_s=roofline_s,
        kernel_configs=_kernel_configs(shape, DTYPES[dtype_name]) if backend.startswith("triton") else {},
        triton_precision=importlib.import_module("equss.kernels._config").resolve_precision()
        if backend.startswith("triton")
        else "",
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        t = stats.stats.median
        info.update(GBps=bytes_moved / t / 1e9, TFLOPs=flops / t / 1e12, pct_of_roofline=100 * roofline_s / t)
        try:  # short kernels: also the median of triton's do_bench (L2 flushed between calls)
            import triton.testing

            info["do_bench_median_ms"] = triton.testing.do_bench(fn, return_mode="median")
        except Exception as exc:
            info["do_bench_median_ms"] = f"unavailable: {type(exc).__name__}"


def _inputs(shape: PQShape, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(shape.N, shape.M, shape.Ds, device=DEVICE, generator=g).to(dtype)
    cb = torch.randn(shape.M, shape.K, shape.Ds, device=DEVICE, generator=g).to(dtype)
    return x, cb


def _assign_bytes(s: PQShape, elem: int) -> float:
    # read x and the codebooks, write codes + min_dist (int32 + fp32) and the quantized vectors
    return s.N * s.D * elem + s.M * s.K * s.Ds * elem + s.N * s.M * 8 + s.N * s.D * elem


def _flops(s: PQShape) -> float:
    return 2.0 * s.N * s.M * s.K * s.Ds


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["triton-fused", "triton", "ext", "torch", "authors"])
def test_assign(benchmark, backend, shape, dtype_name):
    benchmark.group = f"assign-{shape.name}-{dtype_name}"
    _require(backend)
    if backend == "authors" and shape.N * shape.K > 1 << 30:
        pytest.skip(
            "the authors' loop holds N×K distances and their softmax per subspace: too large for this shape"
        )
    dtype = DTYPES[dtype_name]
    x, cb = _inputs(shape, dtype)

    if backend == "triton-fused":
        fn = lambda: equss.pq_assign_gather(x, cb, "l2")
    elif backend == "authors":
        fn = lambda: B.authors_assign(x, cb)
    else:

        def fn():
            with equss.use_backend(backend):
                codes, _ = equss.pq_assign(x, cb, "l2")
                return equss.pq_gather(codes, cb, check_range=False)

    _run(
        benchmark,
        fn,
        bytes_moved=_assign_bytes(shape, x.element_size()),
        flops=_flops(shape),
        dtype_name=dtype_name,
        shape=shape,
        backend=backend,
        rounds=20 if shape.N < 10**6 else 5,
    )


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["triton-fused", "triton", "ext", "torch", "authors", "vqp"])
def test_train_step(benchmark, backend, shape):
    benchmark.group = f"train_step-{shape.name}"
    _require(backend)
    x0, cb = _inputs(shape, torch.float32, seed=1)
    x = x0.clone().requires_grad_(True)
    if backend == "vqp":
        vq = B.make_vqp(shape.M, shape.K, shape.Ds, DEVICE, DECAY, EPS, BETA).train()
        with torch.no_grad():
            B.vqp_codebooks(vq).copy_(cb)

        def fn():
            x.grad = None
            return B.vqp_train_step(vq, x)
    else:
        cluster_size = torch.zeros(shape.M, shape.K, device=DEVICE)
        embed_sum = torch.zeros(shape.M, shape.K, shape.Ds, device=DEVICE)

        def fn():
            x.grad = None
            if backend == "authors":
                return B.authors_train_step(x, cb, cluster_size, embed_sum, BETA, DECAY, EPS)
            with equss.use_backend("triton" if backend.startswith("triton") else backend):
                return B.equss_train_step(
                    x, cb, cluster_size, embed_sum, BETA, DECAY, EPS, fused=backend == "triton-fused"
                )

    elem = 4
    # assign + gather, then loss/backward (read x, q, write grad: 3·N·D) and the EMA statistics (read x, codes)
    bytes_moved = (
        _assign_bytes(shape, elem)
        + 3 * shape.N * shape.D * elem
        + shape.N * shape.D * elem
        + shape.N * shape.M * 4
    )
    _run(
        benchmark,
        fn,
        bytes_moved=bytes_moved,
        flops=_flops(shape),
        dtype_name="float32",
        shape=shape,
        backend=backend,
        rounds=10 if shape.N < 10**6 else 3,
    )


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "ext", "torch", "authors"])
def test_ema_update(benchmark, backend, shape):
    benchmark.group = f"ema_update-{shape.name}"
    _require(backend)
    x, cb = _inputs(shape, torch.float32, seed=2)
    codes = torch.randint(0, shape.K, (shape.N, shape.M), device=DEVICE, dtype=torch.int32)
    cluster_size = torch.zeros(shape.M, shape.K, device=DEVICE)
    embed_sum = torch.zeros(shape.M, shape.K, shape.Ds, device=DEVICE)

    if backend == "authors":
        fn = lambda: B.authors_ema_update_(x, codes, cluster_size, embed_sum, cb, DECAY, EPS)
    else:

        def fn():
            with equss.use_backend(backend):
                return equss.pq_ema_update_(x, codes, cluster_size, embed_sum, cb, DECAY, EPS)

    # read x and codes; read-modify-write cluster_size, embed_sum, codebooks
    bytes_moved = shape.N * shape.D * 4 + shape.N * shape.M * 4 + 5 * shape.M * shape.K * shape.Ds * 4
    _run(
        benchmark,
        fn,
        bytes_moved=bytes_moved,
        flops=2.0 * shape.N * shape.D,
        dtype_name="float32",
        shape=shape,
        backend=backend,
        rounds=20 if shape.N < 10**6 else 5,
    )

"""What every GPU benchmark case shares (``benchmarks/test_bench_gpu.py``, ``benchmarks/test_bench_module.py``):
the device, the timing protocol, the roofline at the precision the case computes in, peak memory, the
checks of the results against the reference, and the ``extra_info`` that ``benchmarks/report.py`` reads.

Protocol of :func:`run_case`: one untimed call whose output is *validated* (against float64 or the PyTorch
reference; a wrong result fails the case after it is recorded, ``extra_info["validation"]``), one call
that measures the peak memory above what was allocated before it, then the timing: at the EQUSS shape
``triton.testing.do_bench``'s median (CUDA events, L2 flushed between calls) plus a few synchronised
pytest-benchmark rounds; at the large shape (each call ≥ tens of ms) the median of 3 synchronised rounds
only, so that the slow rows cost 5 calls in all. On CPU (the rehearsal, ``EQUSS_BENCH_DEVICE=cpu``) the
same steps run with 1 round and no do_bench (it needs CUDA events); the numbers mean nothing there.

Roofline: ``max(bytes / HBM bandwidth, flops / matmul rate)`` where the rate is that of the arithmetic
the case's distance products actually run in (:func:`matmul_precision`): fp32 FMAs (Triton ``ieee``, the
CUDA extension, the fp32 PyTorch paths with TF32 off), TF32 or 3×TF32 tensor cores (Triton ``tf32`` /
``tf32x3``), 3×bf16 tensor cores (Triton ``exact``, the default), bf16 tensor cores (Triton and the authors' matmul on bf16 inputs; the PyTorch reference
upcasts bf16 to fp32). Bandwidth and rates are measured in the same session (a device copy, ``torch.mm``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import platform
import time

import pytest
import torch

import equss
from benchmarks import baselines as B
from benchmarks.shapes import LARGE_LIKE, PQShape

_FORCED = os.environ.get("EQUSS_BENCH_DEVICE", "").strip()
DEVICE = torch.device(_FORCED or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_CUDA = DEVICE.type == "cuda"
# Rows checked in float64 per case (all rows of the small shapes).
VALIDATE_ROWS = 1024
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def is_large(shape: PQShape) -> bool:
    return shape.name in LARGE_LIKE


# ----------------------------------------------------------------------------------------- rooflines
def _time_s(fn, reps: int) -> float:
    fn()
    sync()
    if ON_CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        sync()
        return start.elapsed_time(end) / reps / 1e3
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


@functools.cache
def hbm_bandwidth() -> float:
    """Bytes/s of a large device copy (read + write): 1 GiB on CUDA, 8 MiB on CPU."""
    n = (1 << 28) if ON_CUDA else (1 << 21)
    src = torch.empty(n, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    t = _time_s(lambda: dst.copy_(src), reps=10)
    return 2 * n * 4 / t


@functools.cache
def matmul_rate(precision: str) -> float:
    """FLOP/s of ``torch.mm`` in ``precision``: ``fp32`` (TF32 off), ``tf32``, ``tf32x3`` (a third of tf32), ``bf16``,
    ``bf16x3`` (a third of bf16: the Triton ``exact`` default's three split products)."""
    if precision == "tf32x3":
        return matmul_rate("tf32") / 3
    if precision == "bf16x3":
        return matmul_rate("bf16") / 3
    n = 8192 if ON_CUDA else 256
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=generator(99))
    b = torch.randn(n, n, device=DEVICE, dtype=dtype, generator=generator(98))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        t = _time_s(lambda: torch.mm(a, b), reps=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n**3 / t


def triton_precision() -> str:
    try:
        return importlib.import_module("equss.kernels._config").resolve_precision()
    except Exception:
        return "exact"


def matmul_precision(backend: str, dtype_name: str) -> str:
    """The arithmetic of the case's distance products (module docstring)."""
    if backend.startswith("triton"):
        if dtype_name in ("bfloat16", "float16"):
            return "bf16"
        return {"exact": "bf16x3", "ieee": "fp32", "tf32": "tf32", "tf32x3": "tf32x3"}[triton_precision()]
    if backend == "authors" and dtype_name in ("bfloat16", "float16"):
        return "bf16"  # their matmul runs in the input dtype
    if backend in ("torch", "authors", "vqp") and ON_CUDA and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"  # the CUDA extension's FMAs; the reference upcasts to fp32


# ------------------------------------------------------------------------------------------ metadata
def versions() -> dict[str, str]:
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


def device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if ON_CUDA else f"cpu ({platform.processor() or platform.machine()})"


def kernel_configs(shape: PQShape, dtype: torch.dtype) -> dict[str, str]:
    """The configurations the Triton launchers pick for ``shape`` and ``dtype`` (their own ``pick_config``)."""
    try:
        kc = importlib.import_module("equss.kernels._config")
        assign = importlib.import_module("equss.kernels.pq_assign")
        gather = importlib.import_module("equss.kernels.pq_gather")
        segment = importlib.import_module("equss.kernels.pq_segment_sum")
        precision = kc.resolve_precision(None)
        arch = kc.device_arch(DEVICE)
        return {
            "pq_assign": assign.pick_config(dtype, shape.Ds, precision, False, K=shape.K, arch=arch).describe(),
            "pq_assign_gather": assign.pick_config(dtype, shape.Ds, precision, True, K=shape.K, arch=arch).describe(),
            "pq_gather": gather.pick_config(dtype, shape.Ds).describe(),
            "segment_sum": segment.pick_config(dtype, shape.Ds).describe(),
        }
    except Exception as exc:  # the launchers' API is not this suite's: record, do not fail
        return {"unavailable": f"{type(exc).__name__}: {exc}"}


def require(backend: str) -> None:
    """Skip (with the reason :mod:`equss.backends` recorded) a row that cannot run on this device."""
    if backend in ("triton", "triton-fused", "ext", "torch"):
        name = "triton" if backend.startswith("triton") else backend
        if not equss.backends.available(name, DEVICE):
            pytest.skip(f"backend {name!r} not available on {DEVICE.type}: {equss.backends.info(name).detail}")
    if backend == "vqp" and B.vqp_unavailable_reason() is not None:
        pytest.skip(B.vqp_unavailable_reason())


def backend_ctx(backend: str):
    """``equss.use_backend`` for our rows (``triton-fused`` runs the fused op under ``triton``)."""
    return equss.use_backend("triton" if backend.startswith("triton") else backend)


# ---------------------------------------------------------------------------------------- validation
class ValidationError(AssertionError):
    pass


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValidationError(message)


def check_codes(x: torch.Tensor, cb: torch.Tensor, codes: torch.Tensor, quantized: torch.Tensor | None,
                tolerance: tuple[float, float]) -> str:
    """Codes near-optimal in float64 on the first rows, mostly equal to the float64 argmin, and
    ``quantized`` exactly the chosen codewords. Returns a one-line summary."""
    rtol, min_agree = tolerance
    n = min(x.shape[0], VALIDATE_ROWS)
    xs = x[:n].double().transpose(0, 1)  # [M, n, Ds]
    cs = cb.double()  # [M, K, Ds]
    d = (xs * xs).sum(-1, keepdim=True) + (cs * cs).sum(-1).unsqueeze(1) - 2 * torch.bmm(xs, cs.transpose(1, 2))
    best, arg = d.min(-1)  # [M, n]
    c = codes[:n].long().t()  # [M, n]
    check(bool(((c >= 0) & (c < cb.shape[1])).all()), "codes out of [0, K)")
    ours = d.gather(-1, c.unsqueeze(-1)).squeeze(-1)
    scale = (xs * xs).sum(-1) + (cs * cs).sum(-1).max(-1).values.unsqueeze(-1)
    excess = ((ours - best) / scale).max().item()
    agree = (c == arg).double().mean().item()
    check(excess <= rtol, f"a code is {excess:.2e} (relative) worse than the float64 optimum (tolerance {rtol:g})")
    check(agree >= min_agree, f"only {agree:.4f} of the codes equal the float64 argmin (need {min_agree:g})")
    if quantized is not None:
        m_idx = torch.arange(cb.shape[0], device=cb.device).unsqueeze(0).expand(n, -1)
        want = cb[m_idx, codes[:n].long()]
        check(torch.equal(quantized[:n].to(want.dtype), want), "quantized is not the chosen codewords")
    return f"codes of {n} rows: {agree:.4%} equal the float64 argmin, worst excess {excess:.1e}"


def codes_tolerance(backend: str, dtype_name: str) -> tuple[float, float]:
    """``(relative excess over the float64 optimum, minimum fraction equal to the float64 argmin)``: fp32
    products (and bf16 inputs with exact products, fp32 sums) are near-exact; one TF32 product loses ~10⁻³;
    the authors' bf16 matmul rounds the distances themselves to bf16 (2⁻⁸)."""
    if backend == "authors" and dtype_name != "float32":
        return 3e-2, 0.5
    if matmul_precision(backend, dtype_name) == "tf32":
        return 4e-3, 0.9
    return 2e-5, 0.99


def mostly_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float,
                 max_frac: float = 0.0) -> str:
    """``got ≈ want`` except for a fraction ≤ ``max_frac`` of the elements (rows whose code flipped at a
    near-tie between fp32 implementations change completely)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    check(got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    bad = ~torch.isclose(got, want, rtol=rtol, atol=atol)
    frac = bad.double().mean().item() if bad.numel() else 0.0
    check(frac <= max_frac, f"{name}: {frac:.2e} of the elements differ from the reference (allowed {max_frac:g})")
    return f"{name} {1 - frac:.4%} close"


# -------------------------------------------------------------------------------------------- the case
def run_case(benchmark, fn, validate, *, op: str, backend: str, shape: PQShape, dtype_name: str,
             bytes_moved: float, flops: float) -> None:
    """The protocol of the module docstring; ``validate(output_of_first_call) -> str`` raises on a wrong result."""
    benchmark.group = f"{op}-{shape.name}-{dtype_name}"
    info = benchmark.extra_info
    info.update(op=op, backend=backend, shape=str(shape), shape_name=shape.name, dtype=dtype_name,
                device=device_name(), versions=versions())
    validation_error = None
    try:
        out = fn()  # JIT compilation, cuBLAS heuristics, allocator warm-up
        sync()
        try:
            info["validation"] = validate(out)
        except ValidationError as exc:
            validation_error = str(exc)
            info["validation"] = "FAILED: " + validation_error
        del out
        peak = None
        if ON_CUDA:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            sync()
            peak = torch.cuda.max_memory_allocated() - before
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        pytest.skip(f"{backend} on {shape}: out of memory ({str(exc).splitlines()[0]})")
    info["validated"] = validation_error is None

    def timed():
        fn()
        sync()

    large = is_large(shape)
    rounds = (3 if large else 5) if ON_CUDA else 1
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median = stats.median if stats is not None else None
    timer = f"median of {rounds} synchronised calls"
    if not large and median is not None:
        import triton.testing

        do_bench_kw = dict(warmup=25, rep=100, return_mode="median")
        if ON_CUDA:
            median = triton.testing.do_bench(fn, **do_bench_kw) / 1e3
            timer = "triton.testing.do_bench median (L2 flushed)"
            info["do_bench_median_ms"] = median * 1e3  # the key scripts/kernel_model.py --calibrate reads
        else:  # it needs CUDA events: on CPU only check that this triton takes the call
            inspect.signature(triton.testing.do_bench).bind(fn, **do_bench_kw)
    precision = matmul_precision(backend, dtype_name)
    bw, rate = hbm_bandwidth(), matmul_rate(precision)
    roofline_s = max(bytes_moved / bw, flops / rate)
    info.update(
        median_s=median,
        timer=timer,
        bytes=bytes_moved,
        flops=flops,
        peak_memory_bytes=peak,
        matmul_precision=precision,
        measured_peak_hbm_GBps=round(bw / 1e9, 1),
        measured_peak_mm_TFLOPs=round(rate / 1e12, 2),
        roofline_s=roofline_s,
        kernel_configs=kernel_configs(shape, DTYPES.get(dtype_name, torch.float32)) if backend.startswith("triton") else {},
        triton_precision=triton_precision() if backend.startswith("triton") else "",
    )
    if median:
        info.update(GBps=bytes_moved / median / 1e9, TFLOPs=flops / median / 1e12,
                    pct_of_roofline=100 * roofline_s / median)
    if validation_error is not None:
        raise ValidationError(f"{backend} {op} on {shape}: {validation_error}")

"""Tests specific to the C++/CUDA op library ``equss._C`` (the "ext" backend).

The op contracts are tested on every backend, ext included, in ``tests/test_pq_*.py``. This file covers
what only the extension has: that a built library actually loads (no silent fallback to the reference),
that it registers the devices it claims, both CPU kernels (AVX2/FMA and the portable one, picked with
``EQUSS_CPU_KERNEL``) on shapes that straddle their tiles (6-row micro-tiles, 16-codeword tiles,
192-row chunks, L1-sized K-blocks), the EQUSS tile shape, exact ties across lanes/tiles/blocks and
NaN/inf rows per kernel, thread-count independence and determinism, and the argument checks of the C++
ops themselves.

Ops are called as ``torch.ops.equss_C.*`` so the extension is tested directly, on the inputs it is
contracted to receive (contiguous, one float dtype).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from helpers import (
    ALL_FLOAT_DTYPES,
    METRICS,
    TIE_COPIES,
    TIE_IDS,
    assert_assign_contract,
    gen,
    shape_id,
    tied_data,
)

from equss import backends
from equss.ops import reference as ref

EXT = backends.info("ext")
needs_ext = pytest.mark.skipif(not EXT.loaded, reason=f"ext backend not loaded: {EXT.detail}")

# N: 1, a prime below one 6-row micro-tile multiple, a prime above one 192-row chunk.
# K: 1, 3 and 17 (partial 16-codeword tiles), 257 (17 tiles: 3 L1 K-blocks when Ds = 33).
# Ds: 1, 5 and 33 (not multiples of any vector width).
ASSIGN_SHAPES = [(N, 2, K, Ds) for N, K, Ds in itertools.product([1, 13, 197], [1, 3, 17, 257], [1, 5, 33])]


def _ops():
    return torch.ops.equss_C


def _cuda_usable() -> bool:
    return torch.cuda.is_available() and EXT.loaded and "cuda" in EXT.devices


def _has_avx2() -> bool:
    old = os.environ.get("EQUSS_CPU_KERNEL")
    os.environ["EQUSS_CPU_KERNEL"] = "avx2"
    try:
        _ops().pq_assign(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), "l2")
        return True
    except RuntimeError as exc:
        assert "lacks AVX2" in str(exc), exc
        return False
    finally:
        if old is None:
            del os.environ["EQUSS_CPU_KERNEL"]
        else:
            os.environ["EQUSS_CPU_KERNEL"] = old


@pytest.fixture(
    params=[
        ("cpu", "scalar"),
        ("cpu", "avx2"),
        pytest.param(("cuda", "auto"), marks=pytest.mark.cuda),
    ],
    ids=["cpu-scalar", "cpu-avx2", "cuda"],
)
def kernel(request, monkeypatch):
    """``(device, EQUSS_CPU_KERNEL)``: each CPU kernel this machine can run, and the CUDA kernels."""
    if not EXT.loaded:
        pytest.skip(f"ext backend not loaded: {EXT.detail}")
    device, name = request.param
    if device == "cuda" and not _cuda_usable():
        pytest.skip("no CUDA device or ext built without CUDA")
    if name == "avx2" and not _has_avx2():
        pytest.skip("this CPU lacks AVX2/FMA: only the portable kernel runs here")
    monkeypatch.setenv("EQUSS_CPU_KERNEL", name)
    return device, name


# ------------------------------------------------------------------------------------------ loading
def test_built_library_is_loaded():
    """Guard against a silent fallback: if equss/_C*.so exists, the ext backend must have loaded it."""
    path = backends.extension_library_path()
    if path is None:
        pytest.skip("equss/_C*.so is not built (pip install --no-build-isolation -e .)")
    if os.environ.get("EQUSS_DISABLE_EXT", "0") == "1":
        pytest.skip("EQUSS_DISABLE_EXT=1 disables the extension on purpose")
    assert EXT.loaded, f"{path} exists but the ext backend did not load it: {EXT.detail}"
    assert "cpu" in EXT.devices


@needs_ext
def test_has_cuda_matches_registered_kernels():
    has_cuda = bool(_ops().has_cuda())
    assert ("cuda" in EXT.devices) == has_cuda
    for op in backends.OP_NAMES:  # the ext backend takes every op from the library
        name = f"equss_C::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == has_cuda, name


@needs_ext
def test_cpu_kernel_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("EQUSS_CPU_KERNEL", "avx512-please")
    with pytest.raises(RuntimeError, match="EQUSS_CPU_KERNEL must be auto, avx2 or scalar"):
        _ops().pq_assign(torch.zeros(2, 1, 3), torch.zeros(1, 4, 3), "l2")


# ----------------------------------------------------------------------------- assign, per kernel
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", ASSIGN_SHAPES, ids=shape_id)
def test_kernel_assign_is_optimal_on_tile_straddling_shapes(kernel, shape, dtype):
    device, name = kernel
    N, M, K, Ds = shape
    x = torch.randn(N, M, Ds, generator=gen(1)).to(dtype)
    cb = torch.randn(M, K, Ds, generator=gen(2)).to(dtype)
    for metric in METRICS:
        codes, min_dist = _ops().pq_assign(x.to(device), cb.to(device), metric)
        label = f"{name}/{metric}"
        # Judged on the values the op received: the dtype-rounded inputs, as fp32 (the op's precision).
        assert_assign_contract(x.float(), cb.float(), metric, codes, min_dist, label, "ext")
        _, ref_dist = ref.pq_assign_ref(x, cb, metric)
        # Against the reference: both are within ε of the exact distance (checked above); at Ds = 33 with
        # unit-variance data ε ≲ 3e-4 and |d| ≈ 66, so 1e-4 + 1e-5·|d| ≈ 8e-4 ≥ 2ε.
        torch.testing.assert_close(min_dist.cpu(), ref_dist, rtol=1e-5, atol=1e-4, msg=label)


def test_kernel_equss_tile_shape_gives_exact_codes(kernel):
    """The EQUSS tile shape (Ds = 32, K = 256: two L1 K-blocks) on well-separated data: exact codes."""
    device, name = kernel
    N, M, K, Ds = 389, 3, 256, 32
    g = gen(3)
    cb = torch.randn(M, K, Ds, generator=g)
    truth = torch.randint(0, K, (N, M), generator=g)
    x = cb[torch.arange(M), truth] + 0.01 * torch.randn(N, M, Ds, generator=g)
    codes, min_dist = _ops().pq_assign(x.to(device), cb.to(device), "l2")
    assert torch.equal(codes.cpu().long(), truth), name
    exact = ((x - cb[torch.arange(M), truth]) ** 2).sum(-1)
    # min_dist ≈ 32·1e-4 = 3e-3 comes out of ||c||² − 2x·c + ||x||² with terms ~32–64 (the expanded form
    # cancels ~1e4×): its fp32 error is ≲ (Ds + 4)·U·128 ≈ 3e-4 absolute (helpers.assign_error_bounds).
    torch.testing.assert_close(min_dist.cpu(), exact, rtol=1e-3, atol=2e-3, msg=name)
    assert_assign_contract(x, cb, "l2", codes, min_dist, name, "ext")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("copies", TIE_COPIES, ids=TIE_IDS)
def test_kernel_exact_ties_pick_lowest_index(kernel, copies, metric):
    """Bit-identical codewords at indices that fall in different lanes, vectors, tiles and K-blocks
    (K = 257, Ds = 33: 16-codeword tiles, 7 tiles per L1 block): the lowest index must win."""
    device, name = kernel
    x, cb = tied_data(copies)
    codes, _ = _ops().pq_assign(x.to(device), cb.to(device), metric)
    assert torch.all(codes.cpu() == min(copies)), (name, codes)


def test_kernel_all_equal_distances_give_code_zero(kernel):
    device, name = kernel
    x = torch.randn(20, 3, 7, generator=gen(5))
    for metric in METRICS:
        for cb in (torch.zeros(3, 40, 7), torch.ones(3, 40, 7)):
            codes, _ = _ops().pq_assign(x.to(device), cb.to(device), metric)
            assert torch.all(codes.cpu() == 0), (name, metric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_kernel_nan_inf_rows(kernel, dtype):
    """Invalid rows get code 0 and min_dist NaN; every other row is bit-identical to a clean run."""
    device, name = kernel
    N, M, K, Ds = 23, 3, 37, 9
    x = torch.randn(N, M, Ds, generator=gen(6))
    cb = torch.randn(M, K, Ds, generator=gen(7))
    bad = torch.zeros(N, M, dtype=torch.bool)
    for n, m, value, where in [
        (0, 0, float("nan"), slice(3, 4)),
        (5, 1, float("nan"), slice(None)),
        (7, 2, float("inf"), slice(None)),
        (8, 0, float("-inf"), slice(0, 1)),
        (21, 1, float("inf"), slice(2, 3)),
    ]:
        x[n, m, where] = value
        bad[n, m] = True
    x[13, 2, 0], x[13, 2, 1] = float("inf"), float("-inf")
    bad[13, 2] = True
    x, cb = x.to(dtype), cb.to(dtype)
    clean = torch.where(bad.unsqueeze(-1), torch.zeros_like(x), x)
    for metric in METRICS:
        codes, min_dist = _ops().pq_assign(x.to(device), cb.to(device), metric)
        codes, min_dist = codes.cpu(), min_dist.cpu()
        label = f"{name}/{metric}"
        assert torch.all(codes[bad] == 0) and torch.isnan(min_dist[bad]).all(), (label, min_dist[bad])
        clean_codes, clean_dist = _ops().pq_assign(clean.to(device), cb.to(device), metric)
        assert torch.equal(codes[~bad], clean_codes.cpu()[~bad]), label
        assert torch.equal(min_dist[~bad], clean_dist.cpu()[~bad]), label


@needs_ext
@pytest.mark.parametrize("name", ["scalar", "auto"])
def test_assign_independent_of_thread_count(monkeypatch, name):
    """Rows never interact, so codes and min_dist are bit-identical for 1 and 2 threads."""
    monkeypatch.setenv("EQUSS_CPU_KERNEL", name)
    x = torch.randn(401, 4, 32, generator=gen(8))
    cb = torch.randn(4, 256, 32, generator=gen(9))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ops().pq_assign(x, cb, "l2")
        torch.set_num_threads(2)
        two = _ops().pq_assign(x, cb, "l2")
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]), name
    finally:
        torch.set_num_threads(threads)


@needs_ext
def test_scatter_add_is_deterministic_across_thread_counts():
    """CPU sums are owned per (subspace, Ds slice) and added in row order: bit-identical for any thread
    count, also when M < threads splits Ds."""
    N, K = 3001, 7
    threads = torch.get_num_threads()
    try:
        for M, Ds in [(1, 9), (5, 4)]:
            x = torch.randn(N, M, Ds, generator=gen(14)) * 100
            codes = torch.randint(0, K, (N, M), generator=gen(15), dtype=torch.int32)
            results = []
            for t in (1, 2):
                torch.set_num_threads(t)
                results.append(
                    (_ops().pq_gather_backward(x, codes, K), *_ops().pq_cluster_stats(x, codes, K))
                )
            for a, b in zip(*results):
                assert torch.equal(a, b), (M, Ds)
            # ... and equal to a sequential index_add_ in row order (the reference).
            assert torch.equal(results[0][0], ref.pq_gather_backward_ref(x, codes, K))
            assert torch.equal(results[0][2], ref.pq_cluster_stats_ref(x, codes, K)[1])
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- raw argument checks
@needs_ext
def test_assign_argument_checks():
    ops = _ops()
    x, cb = torch.randn(5, 2, 3), torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="metric must be"):
        ops.pq_assign(x, cb, "cosine")
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.pq_assign(x, cb.double(), "l2")
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.pq_assign(torch.randn(2, 5, 3).transpose(0, 1), cb, "l2")
    with pytest.raises(RuntimeError, match=r"does not match codebooks"):
        ops.pq_assign(x, torch.randn(3, 4, 3), "l2")
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        ops.pq_assign(x.long(), cb.long(), "l2")


@needs_ext
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64], ids=str)
def test_raw_ops_never_read_out_of_range_codes(code_dtype):
    """The library ops themselves (no Python range check in front) gather a zero vector for a code
    outside [0, K) and leave it out of the gradient and the statistics (the contract of reference.py)."""
    ops = _ops()
    cb, x = torch.randn(2, 5, 3), torch.randn(4, 2, 3)
    good = torch.zeros(4, 2, dtype=code_dtype)
    for bad in (5, -1, 2**31 - 1 if code_dtype == torch.int32 else 2**40):
        codes = good.clone()
        codes[3, 1] = bad
        out = ops.pq_gather(codes, cb)
        assert torch.equal(out[3, 1], torch.zeros(3)) and torch.equal(out[:3], ops.pq_gather(good, cb)[:3])
        grad = ops.pq_gather_backward(x, codes, 5)
        assert torch.equal(grad, ref.pq_gather_backward_ref(x, codes, 5)), bad
        assert torch.equal(grad[1, 1:], torch.zeros(4, 3)), bad  # nothing landed on another codeword
        counts, sums = ops.pq_cluster_stats(x, codes, 5)
        assert counts[1, 0] == 3 and counts.sum() == 7, bad
        assert torch.equal(sums, ref.pq_cluster_stats_ref(x, codes, 5)[1]), bad


@needs_ext
def test_raw_ops_argument_checks():
    ops = _ops()
    cb, x = torch.randn(2, 5, 3), torch.randn(4, 2, 3)
    codes = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="codes must be int32 or int64"):
        ops.pq_gather(codes.float(), cb)
    with pytest.raises(RuntimeError, match=r"codes has M=3 subspaces, expected M=2"):
        ops.pq_gather(torch.zeros(4, 3, dtype=torch.int32), cb)
    with pytest.raises(RuntimeError, match=r"codes has N=3 rows, expected N=4"):
        ops.pq_cluster_stats(x, codes[:3], 5)
    with pytest.raises(RuntimeError, match="K must be >= 1"):
        ops.pq_cluster_stats(x, codes, 0)
    with pytest.raises(RuntimeError, match="codes must be contiguous"):
        ops.pq_gather(torch.zeros(2, 4, dtype=torch.int32).t(), cb)


@needs_ext
def test_assign_gather_argument_checks():
    ops = _ops()
    x, cb = torch.randn(4, 2, 8), torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match=r"codebooks_out \[2, 6, 8\] must match codebooks \[2, 5, 8\]"):
        ops.pq_assign_gather(x, cb, torch.randn(2, 6, 8), "l2", None)
    with pytest.raises(RuntimeError, match=r"stats_x \[4, 2, 7\] must have the shape of x \[4, 2, 8\]"):
        ops.pq_assign_gather(x, cb, cb, "l2", torch.randn(4, 2, 7))
    with pytest.raises(RuntimeError, match="metric must be"):
        ops.pq_assign_gather(x, cb, cb, "cosine", None)
    with pytest.raises(RuntimeError, match="codebooks_out must be contiguous"):
        ops.pq_assign_gather(x, cb, torch.randn(2, 8, 5).transpose(1, 2), "l2", None)


@needs_ext
def test_ema_apply_argument_checks():
    ops = _ops()
    M, K, Ds = 2, 3, 4
    z = lambda *s: torch.zeros(*s)
    with pytest.raises(RuntimeError, match=r"cluster_size must have shape \[2, 3\]"):
        ops.pq_ema_apply_(z(M, K), z(M, K, Ds), z(M, K + 1), z(M, K, Ds), z(M, K, Ds), 0.9, 1e-5)
    with pytest.raises(RuntimeError, match="embed_sum must be float32"):
        ops.pq_ema_apply_(z(M, K), z(M, K, Ds), z(M, K), z(M, K, Ds).double(), z(M, K, Ds), 0.9, 1e-5)
    with pytest.raises(RuntimeError, match="sums must be contiguous"):
        ops.pq_ema_apply_(z(M, K), z(M, Ds, K).transpose(1, 2), z(M, K), z(M, K, Ds), z(M, K, Ds), 0.9, 1e-5)

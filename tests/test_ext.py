"""Tests specific to the C++/CUDA op library ``equss._C`` (the "ext" backend).

The op contracts are tested on every backend, ext included, in ``tests/test_pq_*.py``. This file covers
what only the extension has: that a built library actually loads (no silent fallback to the reference),
that it registers the devices it claims, both CPU kernels (AVX2/FMA and the portable one, picked with
``EQUSS_CPU_KERNEL``) on shapes that straddle their tiles (24-row micro-tiles of 3 × 8 lanes, 4-codeword
tiles, 192-row chunks, K-blocks of 128 codeword tiles), the EQUSS tile shape, exact ties across
lanes/tiles/blocks and NaN/inf rows per kernel, the one-pass CPU ``pq_assign_gather`` against the
separate ops (bit for bit: same assignment kernel, sums in row order), every output of pq_assign,
pq_assign_gather and pq_cluster_stats equal to the ``*_ref`` twins of ``equss/ops/reference.py`` on
integer-valued data (exact in any fp32 order, poisoned rows and codewords included), invalid codewords
never winning, bit-exact gathers, thread-count independence and determinism, and the argument checks of
the C++ ops themselves.

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
    unambiguous_rows,
)

from equss import backends
from equss.ops import reference as ref

EXT = backends.info("ext")
needs_ext = pytest.mark.skipif(not EXT.loaded, reason=f"ext backend not loaded: {EXT.detail}")

# N: 1, one row short of and one row past a 24-row micro-tile, a prime above one 192-row chunk.
# K: 1, 3 and 5 (a partial 4-codeword tile alone or after a full one), 257 (65 tiles, the last partial).
# Ds: 1 and 3 (only the tail of the 4-step unrolling and of the 4×4 transposing pack), 33 (8 steps + 1).
ASSIGN_SHAPES = [(N, 2, K, Ds) for N, K, Ds in itertools.product([1, 23, 25, 197], [1, 3, 5, 257], [1, 3, 33])]


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
        ref_codes, ref_dist = ref.pq_assign_ref(x, cb, metric)
        # Against the reference: both are within ε of the exact distance (checked above); at Ds = 33 with
        # unit-variance data ε ≲ 3e-4 and |d| ≈ 66, so 1e-4 + 1e-5·|d| ≈ 8e-4 ≥ 2ε.
        torch.testing.assert_close(min_dist.cpu(), ref_dist, rtol=1e-5, atol=1e-4, msg=label)
        # Rows whose winner is clear beyond both backends' rounding: the reference's code, exactly.
        _, clear = unambiguous_rows(x.float(), cb.float(), metric)
        assert torch.equal(codes.cpu()[clear], ref_codes[clear]), label


def test_kernel_equss_tile_shape_gives_exact_codes(kernel):
    """The EQUSS tile shape (Ds = 32, K = 256: 64 codeword tiles, one K-block) on well-separated data: exact
    codes."""
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
    """Bit-identical codewords at indices that fall in different positions of the 4-codeword tiles and in
    different tiles (K = 257, Ds = 33; ties across K-blocks: test_kernel_several_k_blocks): the lowest
    index must win."""
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


@pytest.mark.parametrize("metric", METRICS)
def test_kernel_several_k_blocks(kernel, metric):
    """K = 1031 is 258 codeword tiles, three K-blocks of the AVX2 kernel (each row resolves its winner at
    the end of every block): random data is optimal, and exact ties across blocks go to the lowest index."""
    device, name = kernel
    if device != "cpu":
        pytest.skip("the CPU kernel's K-blocks")
    N, M, K, Ds = 53, 2, 1031, 8
    x = torch.randn(N, M, Ds, generator=gen(20))
    cb = torch.randn(M, K, Ds, generator=gen(21))
    codes, min_dist = _ops().pq_assign(x.to(device), cb.to(device), metric)
    assert_assign_contract(x, cb, metric, codes, min_dist, f"{name}/{metric}", "ext")
    for copies in [(3, 520, 1030), (700, 1000), (1030,)]:
        xt, cbt = tied_data(copies, N=31, M=2, K=K, Ds=Ds)
        codes, _ = _ops().pq_assign(xt.to(device), cbt.to(device), metric)
        assert torch.all(codes.cpu() == min(copies)), (name, copies, codes)


# (N, M, K, Ds) for the fused op: partial tiles everywhere; 197 rows span two chunks; M = 5 > 2 threads
# runs one subspace group per item, M = 1 the rows-parallel path with the statistics in a second pass.
FUSED_EXT_SHAPES = [(197, 3, 37, 9), (61, 5, 17, 33), (130, 1, 300, 4)]


def _fused_vs_separate(x, cb, cb_out, metric, stats_x, label):
    """The one-pass CPU op against pq_assign + pq_gather + pq_cluster_stats of the same library, bit for
    bit (the assignment kernel is shared; counts and sums are both fp32 sums in row order)."""
    ops = _ops()
    codes, min_dist, q, sq_err, counts, sums = ops.pq_assign_gather(x, cb, cb_out, metric, stats_x)
    plain_codes, plain_dist = ops.pq_assign(x, cb, metric)
    assert torch.equal(codes, plain_codes), label
    torch.testing.assert_close(min_dist, plain_dist, rtol=0, atol=0, equal_nan=True, msg=label)
    assert torch.equal(q, ops.pq_gather(plain_codes, cb_out)), label
    exact = (x.float() - q.float()).square().sum(-1)
    torch.testing.assert_close(sq_err, exact, rtol=1e-5, atol=1e-6, equal_nan=True, msg=label)
    kept = torch.where(torch.isnan(plain_dist), -1, plain_codes)
    ref_counts, ref_sums = ops.pq_cluster_stats(x if stats_x is None else stats_x, kept, cb.shape[1])
    assert torch.equal(counts, ref_counts), label
    assert torch.equal(sums, ref_sums if stats_x is not None else ref_sums[..., :0]), label


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", FUSED_EXT_SHAPES, ids=shape_id)
def test_kernel_assign_gather_equals_separate_ops(kernel, shape, dtype):
    device, name = kernel
    if device != "cpu":
        pytest.skip("the one-pass CPU op (CUDA sums add with atomics in a varying order)")
    N, M, K, Ds = shape
    x = torch.randn(N, M, Ds, generator=gen(30)).to(dtype)
    cb = torch.randn(M, K, Ds, generator=gen(31)).to(dtype)
    cb_out = torch.randn(M, K, Ds, generator=gen(32)).to(dtype)
    stats_x = torch.randn(N, M, Ds, generator=gen(33)) * 3
    x[5, 0, 1] = float("nan")  # an invalid row of x: code 0, in no count or sum
    stats_x[7, M - 1] = float("inf")  # an invalid row of stats_x: its code stays, in no count or sum
    for metric in METRICS:
        for s in (None, stats_x, stats_x.half()):  # stats_x may have its own dtype
            _fused_vs_separate(x, cb, cb_out, metric, s, f"{name}/{metric}/{dtype}/{s is None}")


@needs_ext
@pytest.mark.parametrize("M", [1, 2, 7])
def test_assign_gather_independent_of_thread_count(M):
    """1 thread (one subspace group per item) and 2 threads (groups, or for M = 1 the rows-parallel path
    with a second statistics pass): every output bit-identical."""
    N, K, Ds = 389, 29, 12
    x = torch.randn(N, M, Ds, generator=gen(34))
    cb, cb_out = torch.randn(M, K, Ds, generator=gen(35)), torch.randn(M, K, Ds, generator=gen(36))
    stats_x = torch.randn(N, M, Ds, generator=gen(37)) * 100
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(_ops().pq_assign_gather(x, cb, cb_out, "l2", stats_x))
        for a, b in zip(*results):
            assert torch.equal(a, b), M
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------- rows-in-lanes kernel paths against the reference
# Ties inside one 4-codeword tile, across a tile boundary, a whole tile, and the lone codeword of the
# partial last tile (K = 257), on row counts that leave the last 24-row tile partial.
TILE_TIE_COPIES = [(5, 6), (4, 7), (3, 4), (6, 7, 8), (8, 9, 10, 11), (1, 2, 3), (255, 256)]


@pytest.mark.parametrize("N", [1, 25, 49])
@pytest.mark.parametrize("metric", METRICS)
def test_kernel_ties_in_four_codeword_tiles_pick_lowest_index(kernel, metric, N):
    device, name = kernel
    for copies in TILE_TIE_COPIES:
        x, cb = tied_data(copies, N=N)
        codes, _ = _ops().pq_assign(x.to(device), cb.to(device), metric)
        assert torch.all(codes.cpu() == min(copies)), (name, copies, codes)
        fused = _ops().pq_assign_gather(x.to(device), cb.to(device), cb.to(device), metric, None)
        assert torch.equal(fused[0].cpu(), codes.cpu()), (name, copies)


@pytest.mark.parametrize("K", [3, 5, 257])
@pytest.mark.parametrize("metric", METRICS)
def test_kernel_invalid_codeword_never_wins(kernel, metric, K):
    """Every row is an exact copy of codeword j, but codeword j is poisoned (one NaN, one inf, or finite
    values whose fp32 ||c||² overflows): it must never be chosen, at any position of a 4-codeword tile;
    the codes are the reference's on the rows whose winner among the valid codewords is clear. A subspace
    with no valid codeword gives code 0 and min_dist +inf."""
    device, name = kernel
    N, M, Ds = 29, 3, 7
    g = gen(50)
    for j in sorted({0, 1, 2, K - 1, min(4, K - 1)}):
        for poison in ("nan", "inf", "overflow"):
            cb = torch.randn(M, K, Ds, generator=g)
            x = cb[:, j].unsqueeze(0).repeat(N, 1, 1) + 0.01 * torch.randn(N, M, Ds, generator=g)
            if poison == "overflow":
                cb[:, j] = 1e20
            else:
                cb[:, j, Ds // 2] = float(poison)
            cb[M - 1] = float("nan")  # the last subspace has no valid codeword at all
            label = f"{name}/{metric}/K{K}/j{j}/{poison}"
            codes, min_dist = _ops().pq_assign(x.to(device), cb.to(device), metric)
            codes, min_dist = codes.cpu(), min_dist.cpu()
            assert torch.all(codes[:, : M - 1] != j), label
            assert_assign_contract(x, cb, metric, codes, min_dist, label, "ext")
            ref_codes, ref_dist = ref.pq_assign_ref(x, cb, metric)
            assert torch.equal(codes[:, M - 1], ref_codes[:, M - 1]) and torch.all(codes[:, M - 1] == 0), label
            assert torch.all(min_dist[:, M - 1] == float("inf")) and torch.equal(min_dist[:, M - 1], ref_dist[:, M - 1])
            # Unambiguity judged without the poisoned codeword (it is +inf for both backends).
            valid = torch.cat([cb[: M - 1, :j], cb[: M - 1, j + 1 :]], dim=1)
            shifted, clear = unambiguous_rows(x[:, : M - 1], valid, metric)
            assert torch.equal(codes[:, : M - 1][clear], ref_codes[:, : M - 1][clear]), label
            assert torch.equal(ref_codes[:, : M - 1][clear], (shifted + (shifted >= j).long())[clear].int())


def _int_data(N, M, K, Ds, dtype, seed):
    """Small integer-valued x, codebooks, codebooks_out and stats_x: every product, distance, squared
    error, count and sum is an integer below 2^24, so any fp32 evaluation order gives the same bits and
    every output must equal the reference's exactly (ties included: both take the lowest index).

    Poisoned on purpose: invalid rows of x (NaN, ±inf, a finite row whose fp32 ||x||² overflows) at the
    first and last lane of a row vector and of a 24-row tile and at the last row; a NaN codeword that is
    an exact copy of a row (so it would win if it were not excluded) and an inf codeword; invalid rows of
    stats_x, some on rows whose x is invalid too."""
    g = gen(seed)
    x = torch.randint(-4, 5, (N, M, Ds), generator=g).float()
    cb = torch.randint(-4, 5, (M, K, Ds), generator=g).float()
    cb_out = torch.randint(-100, 101, (M, K, Ds), generator=g).float()
    stats_x = torch.randint(-50, 51, (N, M, Ds), generator=g).float()
    for n, m, value in [(0, 0, float("nan")), (7, M - 1, float("inf")), (23, 0, -float("inf")),
                        (24, M - 1, 1e20), (N - 1, 0, float("nan"))]:
        if n < N:
            x[n, m, (n + m) % Ds] = value
    if K >= 3:
        cb[0, 1] = x[min(3, N - 1), 0]
        cb[0, 1, 0] = float("nan")
        cb[M - 1, K - 1, Ds - 1] = float("inf")
    for n, m, value in [(2, 0, float("nan")), (7, M - 1, float("inf")), (N - 2, M - 1, 1e20)]:
        if 0 <= n < N:
            stats_x[n, m, 0] = value
    return x.to(dtype), cb.to(dtype), cb_out.to(dtype), stats_x


# (N, M, K, Ds): M = 1 runs the rows-parallel path with the statistics in a second pass, M = 2 and 5 one
# subspace group per item (2 threads); N off the 24-row tiles, 197 and 203 span two 192-row chunks.
INT_SHAPES = [
    (1, 1, 1, 1),
    (23, 2, 3, 3),
    (25, 1, 5, 33),
    (49, 5, 257, 3),
    (197, 2, 257, 33),
    (197, 1, 5, 1),
    (203, 5, 3, 33),
    (61, 2, 1, 3),
]


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", INT_SHAPES, ids=shape_id)
def test_kernel_integer_data_equals_reference_exactly(kernel, shape, dtype):
    """pq_assign, pq_assign_gather (every output) and pq_cluster_stats equal the ``*_ref`` twins of
    equss/ops/reference.py exactly on integer-valued data; quantized is a bit-exact gather."""
    device, name = kernel
    if device != "cpu":
        pytest.skip("exact sums need the CPU's row-order accumulation")
    x, cb, cb_out, stats_x = _int_data(*shape, dtype, seed=60 + shape[0])
    K = shape[2]
    for metric in METRICS:
        codes, min_dist = _ops().pq_assign(x, cb, metric)
        ref_codes, ref_dist = ref.pq_assign_ref(x, cb, metric)
        label = f"{name}/{metric}/{dtype}"
        assert torch.equal(codes, ref_codes), label
        torch.testing.assert_close(min_dist, ref_dist, rtol=0, atol=0, equal_nan=True, msg=label)
        for s in (None, stats_x, stats_x.to(dtype)):
            got = _ops().pq_assign_gather(x, cb, cb_out, metric, s)
            want = ref.pq_assign_gather_ref(x, cb, cb_out, metric, s)
            sub = f"{label}/stats={None if s is None else s.dtype}"
            assert torch.equal(got[0], want[0]), sub
            for i, what in [(1, "min_dist"), (3, "sq_err"), (4, "counts"), (5, "sums")]:
                assert got[i].dtype == want[i].dtype and got[i].shape == want[i].shape, (sub, what)
                torch.testing.assert_close(got[i], want[i], rtol=0, atol=0, equal_nan=True, msg=f"{sub}/{what}")
            assert got[2].dtype == cb_out.dtype and torch.equal(_bits(got[2]), _bits(want[2])), sub
        # pq_cluster_stats of the same library on the reference's codes (invalid rows left out via -1).
        kept = torch.where(torch.isnan(ref_dist), -1, ref_codes)
        got_c, got_s = _ops().pq_cluster_stats(stats_x, kept, K)
        want_c, want_s = ref.pq_cluster_stats_ref(stats_x, kept, K)
        assert torch.equal(got_c, want_c) and torch.equal(got_s, want_s), label


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (NaN payloads and signed zeros compare too)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@needs_ext
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64], ids=str)
def test_gather_is_bit_exact(dtype, code_dtype):
    """pq_gather and the quantized output of pq_assign_gather copy codewords bit for bit: NaN payloads,
    -0.0, ±inf and subnormals included (against pq_gather_ref, compared as raw bits)."""
    M, K, Ds, N = 3, 7, 5, 53
    cb = torch.randn(M, K, Ds, generator=gen(70)).to(dtype)
    bits = _bits(cb)
    special = torch.tensor([float("-0.0"), float("inf"), -float("inf"), torch.finfo(dtype).tiny / 4], dtype=dtype)
    cb[0, 2, :4] = special
    bits[1, 3, 0] = _bits(torch.tensor(float("nan"), dtype=dtype)) | 1  # a NaN with a non-default payload
    bits[2, 6, 1] = _bits(-torch.tensor(float("nan"), dtype=dtype))
    codes = torch.randint(0, K, (N, M), generator=gen(71), dtype=code_dtype)
    codes[0] = torch.tensor([2, 3, 6])
    out = _ops().pq_gather(codes, cb)
    assert out.dtype == dtype and torch.equal(_bits(out), _bits(ref.pq_gather_ref(codes, cb)))
    x = torch.randn(N, M, Ds, generator=gen(72)).to(dtype)
    assign_cb = torch.randn(M, K, Ds, generator=gen(73)).to(dtype)
    got = _ops().pq_assign_gather(x, assign_cb, cb, "dot", None)
    assert torch.equal(_bits(got[2]), _bits(ref.pq_gather_ref(got[0], cb)))


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

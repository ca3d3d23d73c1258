"""The CUDA device code of ``csrc/cuda`` run on the CPU by the emulator of ``csrc/cuda/emu`` (its README).

Without a GPU nothing else executes the CUDA kernels: this file builds the emulation library (the real
kernel headers compiled as C++, one block at a time, its threads as fibers) and checks the assign tile
kernel, the fused assign + gather + statistics epilogue and the segment sums against the contract:
exact codes on well-separated data, ties to the lowest index, NaN / inf codewords never chosen, NaN / inf
rows as the CPU kernel treats them (code 0, ``min_dist`` NaN, left out of the statistics), shapes that
straddle the 128-codeword tiles and the 32-dim pipeline stages (K = 1, 130, 257; Ds = 1, 3, 32, 33, 70),
both shared-memory layouts (pipelined and single-buffer), the generic and the sm_90 (vector atomics)
branches, and exact counts and sums on integer-valued data.

It says nothing about speed, races, cp.async or alignment (the README): those need a GPU. Building the
two emulation libraries takes a few minutes on a small machine (then they are reused), hence ``slow``.
Skipped with the reason when no C++ compiler is found.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

import pytest
import torch
from helpers import (
    METRICS,
    TIE_COPIES,
    TIE_IDS,
    assert_assign_contract,
    assert_segment_sum,
    counts64,
    dist64,
    gen,
    separated,
    shape_id,
    sums64,
    tied_data,
    unambiguous_rows,
)

from equss.ops import reference as ref

pytestmark = pytest.mark.slow

EMU_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "emu"
PIPELINED = 227 * 1024  # EMU_SMEM_OPTIN: an H100's opt-in limit, the double-buffered layout
SINGLE = 60000  # below the pipelined layout's 66.5 KiB: the single-buffer layout


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH): the CUDA emulator cannot be built"
    return None


@pytest.fixture(scope="module", params=[False, True], ids=["generic", "sm90"])
def emu(request):
    """The emulated ops (``torch.ops.equss_emu`` / ``equss_emu90``), built on first use."""
    reason = _compiler_missing()
    if reason:
        pytest.skip(reason)
    sys.path.insert(0, str(EMU_DIR))
    try:
        import emu_build
    finally:
        sys.path.remove(str(EMU_DIR))
    emu_build.build(variant=request.param)
    return getattr(torch.ops, emu_build.name(request.param))


@pytest.fixture(params=[PIPELINED, SINGLE], ids=["pipelined", "single-buffer"])
def layout(request, monkeypatch):
    monkeypatch.setenv("EMU_SMEM_OPTIN", str(request.param))  # read by emu_ops.cpp at every call
    return request.param


def _poison_rows(x: torch.Tensor) -> torch.Tensor:
    """NaN / ±inf entries and an fp32-overflowing norm in some rows of ``x`` (in place); returns the mask."""
    bad = torch.zeros(x.shape[:2], dtype=torch.bool)
    N, M, _ = x.shape
    for n, m, value, where in [
        (0, 0, float("nan"), slice(0, 1)),
        (3, M - 1, float("nan"), slice(None)),
        (min(5, N - 1), 0, float("inf"), slice(None)),
        (min(8, N - 1), M - 1, float("-inf"), slice(-1, None)),
        (N - 1, 0, 1e20, slice(0, 1)),  # finite, but ||x||² overflows fp32
    ]:
        x[n, m, where] = value
        bad[n, m] = True
    return bad


# Shapes (N, M, K, Ds): K = 1, partial and several 128-codeword tiles; Ds = 1, 3 (padded to 8), 32 (one
# full stage), 33 (two stages, the second 8 wide), 70 (three stages); N across two 128-row blocks.
ASSIGN_SHAPES = [
    (20, 2, 1, 3),
    (150, 2, 130, 1),
    (131, 2, 257, 3),
    (129, 1, 200, 32),
    (97, 2, 129, 33),
    (40, 1, 131, 70),
]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", ASSIGN_SHAPES, ids=shape_id)
def test_assign_separated_exact(emu, layout, shape, metric):
    N, M, K, Ds = shape
    if K == 1:
        x, cb = torch.randn(N, M, Ds, generator=gen(1)), torch.randn(M, K, Ds, generator=gen(2))
        truth, clear = torch.zeros(N, M, dtype=torch.long), torch.ones(N, M, dtype=torch.bool)
    elif Ds == 1:  # helpers.separated needs Ds > 1: distinct scalar codewords, rows near one of them
        g = gen(30 + N)
        cb = (torch.stack([torch.randperm(K, generator=g) for _ in range(M)]).float() - K / 2).unsqueeze(-1)
        pick = torch.randint(0, K, (N, M), generator=g)
        x = cb[torch.arange(M), pick] + 0.05 * torch.randn(N, M, 1, generator=g)
        truth, clear = unambiguous_rows(x, cb, metric)
        assert clear.float().mean() > 0.9 and (metric == "dot" or clear.all())
    else:
        x, cb, truth = separated(N, M, K, Ds, metric, seed=30 + N)
        clear = torch.ones(N, M, dtype=torch.bool)
    codes, min_dist = emu.pq_assign(x, cb, metric)
    assert torch.equal(codes.long()[clear], truth[clear]), (codes.long() != truth)[clear].sum()
    assert_assign_contract(x, cb, metric, codes, min_dist, backend="ext")
    cpu_codes, _ = torch.ops.equss_C.pq_assign(x, cb, metric) if _has_cpu_ext() else (codes, None)
    assert torch.equal(codes, cpu_codes)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_assign_random_contract(emu, dtype, metric):
    """Random data, every input dtype (converted to fp32 on load): optimal within the ext error bound."""
    N, M, K, Ds = 70, 3, 257, 33
    x = torch.randn(N, M, Ds, generator=gen(3)).to(dtype)
    cb = torch.randn(M, K, Ds, generator=gen(4)).to(dtype)
    codes, min_dist = emu.pq_assign(x, cb, metric)
    assert_assign_contract(x.float(), cb.float(), metric, codes, min_dist, backend="ext")


@pytest.mark.parametrize("Ds", [1, 32, 33])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("copies", TIE_COPIES, ids=TIE_IDS)
def test_ties_go_to_lowest_index(emu, layout, copies, metric, Ds):
    # Copies 0..255 across the 16 codeword groups of a thread tile (tc·4 + {0..3, 64..67}) and both k-tiles.
    x, cb = tied_data(copies, Ds=Ds, N=140 if Ds == 32 else 31)
    codes, _ = emu.pq_assign(x, cb, metric)
    if Ds == 1:  # every normalised codeword is ±3: exact ties everywhere, the float64 first argmin wins
        assert torch.equal(codes.long(), dist64(x, cb, metric).argmin(-1))
    else:
        assert torch.all(codes == min(copies)), codes


@pytest.mark.parametrize("metric", METRICS)
def test_integer_ties_and_all_equal(emu, metric):
    """Integer data: exact ties everywhere; codes must equal the float64 first argmin."""
    M, K, Ds = 2, 300, 4
    g = gen(5)
    cb = torch.randint(-3, 4, (M, K, Ds), generator=g).float()
    x = torch.randint(-4, 5, (150, M, Ds), generator=g).float()
    codes, _ = emu.pq_assign(x, cb, metric)
    assert torch.equal(codes.long(), dist64(x, cb, metric).argmin(-1))
    for same in (torch.zeros(M, K, Ds), torch.ones(M, K, Ds)):
        codes, _ = emu.pq_assign(x, same, metric)
        assert torch.all(codes == 0)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("Ds", [3, 33])
def test_invalid_codewords_never_win(emu, metric, Ds):
    N, M, K = 60, 2, 140
    g = gen(6)
    x = torch.randn(N, M, Ds, generator=g).abs() + 0.1
    cb = torch.randn(M, K, Ds, generator=g)
    # The best codeword of every row (a large positive one), made invalid: NaN, inf, -inf, fp32 overflow.
    cb[:, 0] = 10.0
    cb[0, 0, 1] = float("nan")
    cb[1, 0, 0] = float("inf")
    cb[:, 129] = 10.0
    cb[0, 129, 0] = float("-inf")
    cb[1, 129, :] = 3e19  # ||c||² overflows fp32
    codes, min_dist = emu.pq_assign(x, cb, metric)
    assert not torch.any((codes == 0) | (codes == 129))
    assert_assign_contract(x, cb, metric, codes, min_dist, backend="ext")
    all_bad = torch.full((1, 5, Ds), float("nan"))
    codes, min_dist = emu.pq_assign(x[:, :1].contiguous(), all_bad, metric)
    assert torch.all(codes == 0) and torch.all(min_dist == float("inf"))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("Ds", [1, 3, 32, 33])
def test_invalid_rows_like_cpu(emu, layout, metric, Ds):
    N, M, K = 140, 2, 130
    x = torch.randn(N, M, Ds, generator=gen(7))
    cb = torch.randn(M, K, Ds, generator=gen(8))
    bad = _poison_rows(x)
    codes, min_dist = emu.pq_assign(x, cb, metric)
    assert torch.all(codes[bad] == 0) and torch.all(torch.isnan(min_dist[bad]))
    assert not torch.isnan(min_dist[~bad]).any()
    assert_assign_contract(x, cb, metric, codes, min_dist, backend="ext")
    if _has_cpu_ext():
        cpu_codes, cpu_min = torch.ops.equss_C.pq_assign(x, cb, metric)
        assert torch.equal(torch.isnan(cpu_min), torch.isnan(min_dist))
        assert torch.equal(cpu_codes[bad], codes[bad])


# ------------------------------------------------------------------------------- fused epilogue
@pytest.mark.parametrize("stats", [False, True], ids=["no-stats", "stats"])
@pytest.mark.parametrize(
    "shape", [(150, 2, 130, 1), (131, 2, 257, 3), (140, 1, 130, 32), (97, 2, 129, 33)], ids=shape_id
)
def test_fused_exact_on_integers(emu, layout, shape, stats):
    """Integer-valued x, codebooks and stats_x: distances, gathers, squared errors, counts and sums are all
    exact in fp32, so every output must equal the float64 definition exactly (bad rows left out)."""
    N, M, K, Ds = shape
    g = gen(9 + Ds)
    cb = torch.randint(-3, 4, (M, K, Ds), generator=g).float()
    cb_out = torch.randint(-50, 50, (M, K, Ds), generator=g).to(torch.float16)
    x = torch.randint(-4, 5, (N, M, Ds), generator=g).float()
    bad = _poison_rows(x)
    sx = None
    keep = ~bad
    if stats:
        sx = torch.randint(-1000, 1000, (N, M, Ds), generator=g).float()
        sx[2, 0, 0] = float("nan")  # an invalid stats row drops the row from counts and sums
        keep = keep.clone()
        keep[2, 0] = False
    codes, min_dist, quantized, sq_err, counts, sums = emu.pq_assign_gather(x, cb, cb_out, "l2", sx)
    x_clean = torch.where(bad.unsqueeze(-1), 0.0, x)
    want = dist64(x_clean, cb, "l2").argmin(-1)
    want[bad] = 0
    assert torch.equal(codes.long(), want)
    assert torch.all(torch.isnan(min_dist[bad])) and not torch.isnan(min_dist[~bad]).any()
    assert torch.equal(quantized, ref.pq_gather_ref(codes, cb_out))
    q64 = quantized.double()
    se64 = ((x.double() - q64) ** 2).sum(-1)
    assert torch.equal(sq_err[~bad].double(), se64[~bad])
    assert torch.equal(counts.double(), counts64(codes, K, keep))
    if stats:
        assert torch.equal(sums.double(), sums64(sx, codes, K, keep))
    else:
        assert sums.shape == (M, K, 0)
    rc, rmd, rq, rse, rcounts, rsums = ref.pq_assign_gather_ref(x, cb, cb_out, "l2", sx)
    assert torch.equal(codes, rc) and torch.equal(quantized, rq) and torch.equal(counts, rcounts)
    assert torch.equal(sums, rsums)


def test_fused_random_dot(emu, layout):
    N, M, K, Ds = 129, 2, 257, 33
    x = torch.randn(N, M, Ds, generator=gen(11))
    cb = torch.randn(M, K, Ds, generator=gen(12))
    sx = torch.randn(N, M, Ds, generator=gen(13))
    codes, min_dist, quantized, sq_err, counts, sums = emu.pq_assign_gather(x, cb, cb, "dot", sx)
    assert_assign_contract(x, cb, "dot", codes, min_dist, backend="ext")
    assert torch.equal(quantized, ref.pq_gather_ref(codes, cb))
    assert torch.equal(counts.double(), counts64(codes, K))
    assert_segment_sum(sums, sx, codes, K)


# --------------------------------------------------------------------------------- segment sums
# K·Ds·4 + K·4 <= 48 KiB: privatised shared-memory sums; above (K = 400, Ds = 33): global atomics.
@pytest.mark.parametrize(
    "shape", [(300, 2, 130, 1), (300, 2, 257, 3), (200, 2, 100, 32), (200, 2, 400, 33)], ids=shape_id
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_segment_sums_exact(emu, shape, dtype):
    N, M, K, Ds = shape
    g = gen(14 + K)
    x = torch.randint(-100, 100, (N, M, Ds), generator=g).to(dtype)
    codes = torch.randint(-2, K + 2, (N, M), generator=g)  # some out of range: they enter nothing
    x[4, 1, 0] = float("nan")
    x[7, 0, :] = float("inf")
    counts, sums = emu.pq_cluster_stats(x, codes, K)
    rcounts, rsums = ref.pq_cluster_stats_ref(x, codes, K)
    assert torch.equal(counts, rcounts) and torch.equal(sums, rsums)
    grad = emu.pq_gather_backward(x, codes, K)
    want = ref.pq_gather_backward_ref(x, codes, K)
    assert grad.dtype == want.dtype
    if dtype == torch.float32:  # exact integers: the bad rows' NaN / inf enter the gradient as they are
        assert torch.equal(torch.nan_to_num(grad, 7.0, 8.0, -8.0), torch.nan_to_num(want, 7.0, 8.0, -8.0))


def test_segment_sum_float64_gradient(emu):
    N, M, K, Ds = 200, 2, 130, 5
    g = gen(15)
    x = torch.randn(N, M, Ds, generator=g, dtype=torch.float64)
    codes = torch.randint(0, K, (N, M), generator=g)
    grad = emu.pq_gather_backward(x, codes, K)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, ref.pq_gather_backward_ref(x, codes, K), rtol=1e-12, atol=1e-12)


def test_gather_exact(emu):
    for Ds, dtype in [(1, torch.float16), (3, torch.float32), (8, torch.bfloat16), (32, torch.float32)]:
        cb = torch.randn(2, 130, Ds, generator=gen(16)).to(dtype)
        codes = torch.randint(0, 130, (77, 2), generator=gen(17))
        assert torch.equal(emu.pq_gather(codes, cb), ref.pq_gather_ref(codes, cb))


def _has_cpu_ext() -> bool:
    try:
        from equss import backends

        return backends.info("ext").loaded
    except Exception:
        return False

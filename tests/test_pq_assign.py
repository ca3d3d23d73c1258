"""Contract tests of ``equss.pq_assign`` on every backend (``backend`` fixture, tests/conftest.py).

The contract (``equss/ops/reference.py``): int32 codes in ``[0, K)`` of the nearest codeword (l2) or the
largest inner product (dot), ties to the lowest index, ``min_dist`` float32; invalid rows (non-finite fp32
``||x||²``) get code 0 and ``min_dist`` NaN, invalid codewords never win. Every backend, the reference
included, is judged against float64 brute force with the worst-case fp32 bound of
``helpers.assign_error_bounds``.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    ALL_FLOAT_DTYPES,
    FLOAT_DTYPES,
    METRICS,
    SHAPES,
    TIE_COPIES,
    TIE_IDS,
    assert_assign_contract,
    dist64,
    gen,
    separated,
    shape_id,
    tied_data,
    unambiguous_rows,
)

import equss
from equss.ops import reference as ref


# --------------------------------------------------------------------------------------- random data
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_random_data_is_optimal(backend, shape, dtype, metric):
    N, M, K, Ds = shape
    x = torch.randn(N, M, Ds, generator=gen(10)).to(dtype)
    cb = torch.randn(M, K, Ds, generator=gen(11)).to(dtype)
    codes, min_dist = equss.pq_assign(backend.to(x), backend.to(cb), metric)
    # Judged on the values the op received: the dtype-rounded inputs, as fp32 (every backend's precision;
    # float64 is assigned in fp32 like the reference).
    assert_assign_contract(x.float(), cb.float(), metric, codes, min_dist, backend=backend.name)
    # Where the exact winner is ahead of every other codeword by more than the rounding bound, every
    # backend must return exactly it (so in particular the reference's code).
    exact, clear = unambiguous_rows(x.float(), cb.float(), metric)
    assert clear.float().mean() > 0.5  # the check below is not vacuous
    assert torch.equal(codes.cpu().long()[clear], exact[clear])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(211, 2, 23, 8), (131, 3, 100, 7), (67, 2, 37, 45)], ids=shape_id)
def test_well_separated_is_exact(backend, shape, dtype, metric):
    """Rows drawn near known codewords (checked unambiguous in float64) must get exactly those codes."""
    x, cb, truth = separated(*shape, metric=metric, seed=12 + shape[0], dtype=dtype)
    codes, min_dist = equss.pq_assign(backend.to(x), backend.to(cb), metric)
    assert torch.equal(codes.cpu().long(), truth), (codes.cpu() != truth).sum()
    assert_assign_contract(x.float(), cb.float(), metric, codes, min_dist, backend=backend.name)


# --------------------------------------------------------------------------------------------- ties
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("copies", TIE_COPIES, ids=TIE_IDS)
def test_ties_go_to_lowest_index(backend, copies, metric):
    x, cb = tied_data(copies)
    codes, _ = equss.pq_assign(backend.to(x), backend.to(cb), metric)
    assert torch.all(codes.cpu() == min(copies)), codes


@pytest.mark.parametrize("metric", METRICS)
def test_exact_integer_ties_match_float64_argmin(backend, metric):
    """Integer-valued data: every product and sum is exact in fp32, so ties are exact ties and every
    code must equal the float64 argmin (first minimum, like torch.argmin) on every row."""
    M, K, Ds = 2, 150, 4
    g = gen(3)
    cb = torch.randint(-3, 4, (M, K, Ds), generator=g).float()
    dup = cb[:, 5].clone()
    for k in (9, 64, 70, 149):  # same tile as 5, first codeword of the 2nd tile, inside it, last of the 3rd
        cb[:, k] = dup
    x = torch.stack([3 * dup, dup, -dup, torch.zeros(M, Ds)], dim=0)  # [4, M, Ds]
    codes, _ = equss.pq_assign(backend.to(x), backend.to(cb), metric)
    assert torch.equal(codes.cpu().long(), dist64(x, cb, metric).argmin(-1))
    if metric == "l2":  # rows 0 and 1 are nearest to the duplicated codeword: the lowest copy wins
        assert (codes.cpu()[1] == 5).all()


@pytest.mark.parametrize("metric", METRICS)
def test_all_equal_distances_give_code_zero(backend, metric):
    x = torch.randn(20, 3, 7, generator=gen(5))
    for cb in (torch.zeros(3, 40, 7), torch.ones(3, 40, 7)):  # every distance ties: the first codeword wins
        codes, _ = equss.pq_assign(backend.to(x), backend.to(cb), metric)
        assert torch.all(codes.cpu() == 0), (metric, codes)


# --------------------------------------------------------------------------------- non-finite contract
def _poison_rows(x: torch.Tensor) -> torch.Tensor:
    """Invalid rows ``bad [N, M]`` written into ``x`` in place: NaN, ±inf, inf and -inf together, whole
    rows, and a finite row whose fp32 squared norm overflows (1e20² > fp32 max)."""
    bad = torch.zeros(x.shape[:2], dtype=torch.bool)
    for n, m, value, where in [
        (0, 0, float("nan"), slice(3, 4)),
        (5, 1, float("nan"), slice(None)),
        (7, 2, float("inf"), slice(None)),
        (8, 0, float("-inf"), slice(0, 1)),
        (21, 1, float("inf"), slice(2, 3)),
        (66, 2, 1e20, slice(1, 2)),
    ]:
        x[n, m, where] = value
        bad[n, m] = True
    x[13, 2, 0], x[13, 2, 1] = float("inf"), float("-inf")
    bad[13, 2] = True
    return bad


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, Triton interpreter
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
def test_invalid_rows_get_code_zero_and_nan(backend, dtype, metric):
    N, M, K, Ds = 70, 3, 67, 9  # N spans two Triton row blocks, K two codeword tiles
    x = torch.randn(N, M, Ds, generator=gen(6))
    cb = torch.randn(M, K, Ds, generator=gen(7))
    clean = x.clone()
    bad = _poison_rows(x)
    x, cb, clean = x.to(dtype), cb.to(dtype), clean.to(dtype)
    codes, min_dist = equss.pq_assign(backend.to(x), backend.to(cb), metric)
    codes, min_dist = codes.cpu(), min_dist.cpu()
    assert torch.equal(codes[bad], torch.zeros(int(bad.sum()), dtype=torch.int32))
    assert torch.isnan(min_dist[bad]).all(), min_dist[bad]
    assert_assign_contract(x.float(), cb.float(), metric, codes, min_dist, backend=backend.name)
    exact, clear = unambiguous_rows(clean.float(), cb.float(), metric)
    assert torch.equal(codes.long()[clear & ~bad], exact[clear & ~bad])
    # Rows never interact: every other row is bit-identical to a run without the invalid rows.
    clean_codes, clean_dist = equss.pq_assign(backend.to(clean), backend.to(cb), metric)
    assert torch.equal(codes[~bad], clean_codes.cpu()[~bad])
    assert torch.equal(min_dist[~bad], clean_dist.cpu()[~bad])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
def test_invalid_codewords_never_win(backend, dtype, metric):
    """NaN, +inf and overflowing codewords are skipped; each would win if it were taken at face value:
    the +inf coordinate gives -inf (dot) for rows with x_0 > 0, the 1e20 codeword points along the rows
    (dot: -x·c ≈ -1e20) and the NaN codewords can never compare smaller. Subspace 2 has no
    valid codeword at all: its valid rows get code 0 and min_dist +inf."""
    N, M, K, Ds = 40, 3, 70, 6
    g = gen(8)
    x = torch.randn(N, M, Ds, generator=g).abs() + 0.1  # x_0 > 0 everywhere
    cb = torch.randn(M, K, Ds, generator=g)
    cb[0, 3] = float("nan")
    cb[0, 5, 0] = float("inf")
    cb[1, 0] = 1e20
    cb[1, 66, 2] = float("nan")
    cb[1, 67, :] = float("-inf")
    cb[2] = float("nan")
    cb[2, 1, 0] = float("inf")
    x, cb = x.to(dtype), cb.to(dtype)
    codes, min_dist = equss.pq_assign(backend.to(x), backend.to(cb), metric)
    codes, min_dist = codes.cpu(), min_dist.cpu()
    for m, k in [(0, 3), (0, 5), (1, 0), (1, 66), (1, 67)]:
        assert not (codes[:, m] == k).any(), (m, k)
    assert torch.all(codes[:, 2] == 0) and torch.all(min_dist[:, 2] == float("inf"))
    assert_assign_contract(x.float(), cb.float(), metric, codes, min_dist, backend=backend.name)


def test_all_infinite_distances_give_code_zero(backend):
    """A valid row whose fp32 distance to every valid codeword overflows to +inf gets code 0 and
    min_dist +inf: ||x||² = 2.25e38 and ||c||² ≤ 3.24e38 are finite, 2x·c = -4.5e38·(1 + k/10) is not."""
    x = torch.tensor([[[1.5e19]], [[1.0]]])  # [N=2, M=1, Ds=1]; row 1 is an ordinary row
    cb = -1.5e19 * (1 + torch.arange(3.0) / 10).view(1, 3, 1)
    codes, min_dist = equss.pq_assign(backend.to(x), backend.to(cb), "l2")
    assert codes.cpu().tolist() == [[0], [0]]
    assert min_dist.cpu()[0, 0] == float("inf") and math.isfinite(float(min_dist.cpu()[1, 0]))


# --------------------------------------------------------------------------------------------- layouts
def test_non_contiguous_inputs(backend):
    g = gen(16)
    big = torch.randn(3, 40, 2, 5, generator=g)  # x as a transposed, sliced view: [N=40, M=3, Ds=5]
    x = backend.to(big)[:, :, 1, :].transpose(0, 1)
    cb_big = torch.randn(5, 11, 3, generator=g)  # codebooks [M=3, K=11, Ds=5] from a permuted view
    cb = backend.to(cb_big).permute(2, 1, 0)
    assert not x.is_contiguous() and not cb.is_contiguous()
    codes, dist = equss.pq_assign(x, cb)
    codes_c, dist_c = equss.pq_assign(x.contiguous(), cb.contiguous())
    assert torch.equal(codes, codes_c) and torch.equal(dist, dist_c)
    assert_assign_contract(x.float(), cb.float(), "l2", codes, dist, backend=backend.name)


def test_empty_n(backend):
    codes, dist = equss.pq_assign(backend.to(torch.randn(0, 4, 3)), backend.to(torch.randn(4, 5, 3)))
    assert codes.shape == (0, 4) and dist.shape == (0, 4)
    assert codes.dtype == torch.int32 and dist.dtype == torch.float32
    assert codes.device.type == backend.device


@pytest.mark.parametrize(
    "x_dtype,cb_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.float64)],
    ids=str,
)
def test_mixed_dtypes_promote(backend, x_dtype, cb_dtype):
    """x and codebooks are promoted to a common dtype (fp16 + bf16 → fp32), exactly as if the caller had."""
    x = torch.randn(17, 2, 6, generator=gen(17)).to(x_dtype)
    cb = torch.randn(2, 9, 6, generator=gen(18)).to(cb_dtype)
    codes, dist = equss.pq_assign(backend.to(x), backend.to(cb))
    common = torch.promote_types(x_dtype, cb_dtype)
    codes_p, dist_p = equss.pq_assign(backend.to(x, common), backend.to(cb, common))
    assert torch.equal(codes, codes_p) and torch.equal(dist, dist_p)
    assert_assign_contract(x.float(), cb.float(), "l2", codes, dist, backend=backend.name)


# ------------------------------------------------------------------------------ reference row chunking
def test_reference_assign_chunks_rows(monkeypatch):
    """The reference processes N in chunks (never the full N×M×K tensor); chunked == unchunked."""
    x = torch.randn(1000, 3, 4, generator=gen(2))
    cb = torch.randn(3, 10, 4, generator=gen(3))
    full = ref.pq_assign_ref(x, cb, "l2")
    monkeypatch.setattr(ref, "_MAX_DISTANCES_PER_CHUNK", 3 * 10 * 7)  # 7 rows per chunk, 143 chunks
    assert ref.assign_chunk_rows(3, 10) == 7
    chunked = ref.pq_assign_ref(x, cb, "l2")
    assert torch.equal(full[0], chunked[0])
    torch.testing.assert_close(full[1], chunked[1])  # BLAS blocking differs with the chunk size
    assert_assign_contract(x, cb, "l2", *chunked, backend="torch")


def test_reference_chunk_bound_for_large_n():
    # N = 10^6, M·K = 32·256: at most 2^24 distances (64 MiB) per chunk instead of 33 GB.
    rows = ref.assign_chunk_rows(32, 256)
    assert rows * 32 * 256 <= 1 << 24 and rows >= 1024
    assert ref.assign_chunk_rows(1, 1) == 1 << 24
    assert ref.assign_chunk_rows(1 << 30, 1) == 1
    assert math.isclose(ref.assign_chunk_rows(32, 256) * 32 * 256, 1 << 24)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors_name_the_shapes():
    x = torch.randn(5, 4, 3)
    cb = torch.randn(4, 6, 3)
    with pytest.raises(ValueError, match=r"\[N, M, Ds\].*\(5, 4\)"):
        equss.pq_assign(torch.randn(5, 4), cb)
    with pytest.raises(ValueError, match=r"\(5, 4, 3\).*\(4, 6, 2\)"):
        equss.pq_assign(x, torch.randn(4, 6, 2))  # Ds mismatch
    with pytest.raises(ValueError, match=r"\(5, 4, 3\).*\(3, 6, 3\)"):
        equss.pq_assign(x, torch.randn(3, 6, 3))  # M mismatch
    with pytest.raises(TypeError, match="int64"):
        equss.pq_assign(x.long(), cb)
    with pytest.raises(TypeError, match="complex64"):
        equss.pq_assign(x.to(torch.complex64), cb)
    with pytest.raises(ValueError, match=r"K, Ds >= 1.*\(4, 0, 3\)"):
        equss.pq_assign(x, torch.randn(4, 0, 3))
    with pytest.raises(ValueError, match="metric"):
        equss.pq_assign(x, cb, "cosine-ish")
    with pytest.raises(TypeError, match="torch.Tensor"):
        equss.pq_assign(x.numpy(), cb)
    with pytest.raises(ValueError, match="one device"):
        equss.pq_assign(x, cb.to("meta"))


# -------------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(backend, metric):
    """Schema, fake tensor, autograd registration and AOT-dispatch contracts of ``equss::pq_assign``."""
    x = backend.to(torch.randn(19, 3, 5, generator=gen(40)))
    cb = backend.to(torch.randn(3, 7, 5, generator=gen(41)))
    result = torch.library.opcheck(torch.ops.equss.pq_assign, (x, cb, metric))
    assert set(result.values()) == {"SUCCESS"}, result

"""Contract tests of ``equss.pq_cluster_stats`` on every backend.

``counts [M, K]`` (exact: integers below 2²⁴) and ``sums [M, K, Ds]`` (fp32 accumulation of the
fp32-rounded rows, within ``helpers.segment_sum_bound``) of the rows assigned to each codeword; invalid
rows (non-finite fp32 ``||x||²``) and out-of-range codes (only with ``check_range=False``) enter neither
(``equss/ops/reference.py``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ALL_FLOAT_DTYPES,
    CODE_DTYPES,
    SEGMENT_EXTRA_ULPS,
    SHAPES,
    assert_segment_sum,
    counts64,
    gen,
    shape_id,
    valid_vectors,
)

import equss


def _check(backend, x, codes, K, counts, sums, keep=None):
    counts, sums = counts.cpu(), sums.cpu()
    M, Ds = x.shape[1], x.shape[2]
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    assert counts.shape == (M, K) and sums.shape == (M, K, Ds)
    assert torch.equal(counts.double(), counts64(codes, K, keep))  # integers < 2^24 are exact in fp32
    # Every backend adds x.float() (float64 rows are rounded first, like the reference).
    assert_segment_sum(sums, x.float(), codes, K, keep, SEGMENT_EXTRA_ULPS[backend.name])


# int32 codes on every odd shape, int64 on the long-sum shapes (both index the same way once loaded).
STATS_CASES = [(s, torch.int32) for s in SHAPES] + [
    ((300, 2, 70, 45), torch.int64),
    ((131, 3, 100, 7), torch.int64),
]


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,code_dtype", STATS_CASES, ids=[f"{shape_id(s)}-{str(c)[6:]}" for s, c in STATS_CASES]
)
def test_matches_float64(backend, shape, dtype, code_dtype):
    N, M, K, Ds = shape
    x = torch.randn(N, M, Ds, generator=gen(30)).to(dtype)
    # A skewed code distribution (long sums for a few codewords, none for others) and one subspace that
    # uses a single code.
    codes = (torch.randint(0, K, (N, M), generator=gen(31)) % max(1, K // 2)).to(code_dtype)
    if M > 2:
        codes[:, 2] = K - 1
    counts, sums = equss.pq_cluster_stats(backend.to(x), backend.to(codes), K)
    _check(backend, x, codes, K, counts, sums)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, Triton interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_invalid_rows_are_excluded(backend, dtype):
    """Rows with NaN, ±inf or an overflowing fp32 squared norm enter no count and no sum; the codewords
    they point at (and their 64-codeword tile neighbours) stay finite."""
    N, M, K, Ds = 131, 3, 70, 5
    x = torch.randn(N, M, Ds, generator=gen(32))
    codes = torch.randint(0, K, (N, M), generator=gen(33))
    x[0, 0, 1] = float("nan")
    x[64, 1] = float("inf")
    x[65, 1, 0] = -float("inf")
    x[100, 2, 3] = 1e20  # finite, but 1e40 overflows fp32
    x[101, 2, :2] = torch.tensor([float("inf"), -float("inf")])
    x = x.to(dtype)
    keep = valid_vectors(x)
    assert int((~keep).sum()) == 5
    counts, sums = equss.pq_cluster_stats(backend.to(x), backend.to(codes), K)
    assert torch.isfinite(sums.cpu()).all()
    _check(backend, x, codes, K, counts, sums, keep)


@pytest.mark.parametrize("code_dtype", CODE_DTYPES, ids=str)
def test_out_of_range_codes_are_excluded(backend, code_dtype):
    """With check_range=False, codes outside [0, K) (negative, K, far beyond, ±2^32 and 2^40 for int64,
    which wrap to 0 if truncated to int32) add nothing."""
    N, M, K, Ds = 131, 2, 70, 4
    x = torch.randn(N, M, Ds, generator=gen(34))
    codes = torch.randint(0, K, (N, M), generator=gen(35)).to(code_dtype)
    far = [-1, K, 2**31 - 1] if code_dtype == torch.int32 else [-1, K, 2**32, 2**40, -(2**32)]
    for i, bad in enumerate(far):
        codes[10 + 20 * i, i % M] = bad
    counts, sums = equss.pq_cluster_stats(backend.to(x), backend.to(codes), K, check_range=False)
    assert torch.isfinite(sums.cpu()).all()
    _check(backend, x, codes, K, counts, sums, valid_vectors(x))
    assert counts.sum() == N * M - len(far)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, Triton interpreter
def test_large_codebook(backend):
    """K·Ds too large for a per-block copy of the sums (the CUDA kernel then adds straight into global
    memory: K·Ds·4 = 51 kB > 48 kB), with skewed codes and an invalid row."""
    N, M, K, Ds = 96, 2, 1600, 8
    x = torch.randn(N, M, Ds, generator=gen(36))
    codes = (torch.randint(0, K, (N, M), generator=gen(37)) % 40) * 37  # 40 codewords spread over [0, K)
    x[5, 1, 2] = float("nan")
    counts, sums = equss.pq_cluster_stats(backend.to(x), backend.to(codes), K)
    _check(backend, x, codes, K, counts, sums, valid_vectors(x))


def test_empty_n(backend):
    counts, sums = equss.pq_cluster_stats(
        backend.to(torch.randn(0, 2, 3)), backend.to(torch.zeros(0, 2, dtype=torch.long)), 4
    )
    assert torch.equal(counts.cpu(), torch.zeros(2, 4)) and torch.equal(sums.cpu(), torch.zeros(2, 4, 3))


def test_opcheck(backend):
    g = gen(40)
    N, M, K, Ds = 19, 3, 7, 5
    x = backend.to(torch.randn(N, M, Ds, generator=g))
    codes = backend.to(torch.randint(0, K, (N, M), generator=g, dtype=torch.int32))
    for args in [(x, codes, K), (x.half(), codes.long(), K)]:
        result = torch.library.opcheck(torch.ops.equss.pq_cluster_stats, args)
        assert set(result.values()) == {"SUCCESS"}, result


def test_bad_input():
    x, codes = torch.randn(5, 2, 3), torch.zeros(5, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"N=4 rows but x has N=5"):
        equss.pq_cluster_stats(x, codes[:4], 4)
    with pytest.raises(ValueError, match=r"x must be \[N, M, Ds\]"):
        equss.pq_cluster_stats(x[0], codes, 4)
    with pytest.raises(ValueError, match="K must be >= 1"):
        equss.pq_cluster_stats(x, codes, 0)
    with pytest.raises(IndexError, match=r"\[0, K=4\).*\[0, 4\]"):
        equss.pq_cluster_stats(x, codes + 4 * (torch.arange(2) == 1), 4)
    with pytest.raises(TypeError, match="int32 or int64"):
        equss.pq_cluster_stats(x, codes.float(), 4)
    with pytest.raises(ValueError, match="one device"):
        equss.pq_cluster_stats(x, codes.to("meta"), 4)

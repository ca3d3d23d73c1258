"""Contract tests of ``equss.pq_ema_update_`` / ``equss.pq_ema_apply_`` (the EMA codebook step) on every backend.

The update (``pq_ema_apply_ref_`` in ``equss/ops/reference.py``): decay the statistics, Laplace-smooth the
cluster sizes, renormalise the codebooks, in place; a subspace with nothing ever assigned keeps its
codebook bit for bit; ``eps <= 0`` is rejected. Judged against the float64 formula of ``helpers.ema64``
with the fp32 bounds of ``helpers.ema_bounds``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    SEGMENT_EXTRA_ULPS,
    counts64,
    ema64,
    ema_bounds,
    gen,
    segment_sum_bound,
    valid_vectors,
)

import equss


def _ema_inputs(M, K, Ds, seed, empty_subspace=True):
    g = gen(seed)
    counts = torch.randint(0, 5, (M, K), generator=g).float()
    sums = torch.randn(M, K, Ds, generator=g) * counts.unsqueeze(-1)
    cluster_size = torch.rand(M, K, generator=g) * 3
    embed_sum = torch.randn(M, K, Ds, generator=g)
    codebooks = torch.randn(M, K, Ds, generator=g)
    if empty_subspace:  # nothing ever assigned in subspace 0: n_tot = 0 keeps its codebook
        counts[0] = 0
        sums[0] = 0
        cluster_size[0] = 0
    return counts, sums, cluster_size, embed_sum, codebooks


def _assert_within(got, exact, bound, what, mask=None):
    err = (got.detach().cpu().double() - exact).abs()
    if mask is not None:
        err, bound = err[mask], bound[mask]
    assert torch.all(err <= bound + 1e-30), (
        f"{what}: max excess {(err - bound).max():.3e} over the fp32 bound"
    )


# ------------------------------------------------------------------------------------------ ema_apply_
@pytest.mark.parametrize("decay", [0.0, 0.99])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 37, 7), (2, 300, 45)], ids=str)
def test_apply_fp32_against_float64(backend, shape, decay):
    M, K, Ds = shape
    eps = 1e-5
    counts, sums, cs, es, cb = _ema_inputs(M, K, Ds, seed=18, empty_subspace=M > 1)
    exp_cs, exp_es, exp_cb, n_tot = ema64(counts, sums, cs, es, cb, decay, eps)
    cs_bound, es_bound, cb_bound = ema_bounds(counts, sums, cs, es, decay, eps)
    bufs = [backend.to(t.clone()) for t in (cs, es, cb)]
    equss.pq_ema_apply_(backend.to(counts), backend.to(sums), *bufs, decay=decay, eps=eps)
    _assert_within(bufs[0], exp_cs, cs_bound, "cluster_size")
    _assert_within(bufs[1], exp_es, es_bound, "embed_sum")
    live = (n_tot.squeeze(1) > 0).view(M, 1, 1).expand(M, K, Ds)
    _assert_within(bufs[2], exp_cb, cb_bound, "codebooks", live)
    if M > 1:
        assert not live[0].any()
        assert torch.equal(bufs[2][0].cpu(), cb[0])  # the empty subspace kept its codebook bit for bit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_apply_codebook_dtypes_round_the_fp32_result(backend, dtype):
    """Other codebook dtypes get the fp32 result (validated above) rounded once to their dtype; an empty
    subspace keeps its codebook exactly in every dtype."""
    M, K, Ds = 3, 37, 7
    counts, sums, cs, es, cb = _ema_inputs(M, K, Ds, seed=19)
    fp32 = [backend.to(t.clone()) for t in (cs, es, cb)]
    bufs = [backend.to(t.clone()) for t in (cs, es, cb.to(dtype))]
    equss.pq_ema_apply_(backend.to(counts), backend.to(sums), *fp32, decay=0.9, eps=1e-5)
    equss.pq_ema_apply_(backend.to(counts), backend.to(sums), *bufs, decay=0.9, eps=1e-5)
    assert bufs[2].dtype == dtype
    # The fp32 statistics buffers do not depend on the codebook dtype.
    assert torch.equal(bufs[0], fp32[0]) and torch.equal(bufs[1], fp32[1])
    expected = fp32[2][1:].cpu()
    got = bufs[2][1:].cpu()
    if backend.name == "triton" and dtype == torch.bfloat16 and backend.device == "cpu":
        # The interpreter converts fp32 → bf16 by truncation (it ignores fp_downcast_rounding); GPUs round
        # to nearest even like torch. Truncation is within one bf16 ulp (2⁻⁷ relative) and toward zero.
        got = got.float()
        assert ((expected - got).abs() <= 2.0**-7 * expected.abs()).all() and (
            got.abs() <= expected.abs()
        ).all()
    else:
        assert torch.equal(got, expected.to(dtype))
    assert torch.equal(bufs[2][0].cpu(), cb[0].to(dtype))


def test_apply_keeps_codebook_when_nothing_assigned(backend):
    M, K, Ds = 2, 5, 3
    cb = backend.to(torch.randn(M, K, Ds, generator=gen(34)))
    before = cb.clone()
    cs, es = backend.to(torch.zeros(M, K)), backend.to(torch.zeros(M, K, Ds))
    zeros_k, zeros_kd = backend.to(torch.zeros(M, K)), backend.to(torch.zeros(M, K, Ds))
    equss.pq_ema_apply_(zeros_k, zeros_kd, cs, es, cb, 0.99, 1e-5)
    assert torch.equal(cb, before)
    assert torch.equal(cs.cpu(), torch.zeros(M, K)) and torch.equal(es.cpu(), torch.zeros(M, K, Ds))


# ----------------------------------------------------------------------------------------- ema_update_
@pytest.mark.parametrize("decay,eps", [(0.99, 1e-5), (0.9, 1e-3)])
@pytest.mark.parametrize("codebook_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_update_matches_float64(backend, codebook_dtype, decay, eps):
    N, M, K, Ds = 157, 4, 13, 6
    g = gen(32)
    x = torch.randn(N, M, Ds, generator=g)
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.int32)
    codes[:, 1] = 3  # subspace 1 uses a single code: the other 12 must still be smoothed, not NaN
    cs = torch.rand(M, K, generator=g) * 5
    es = torch.randn(M, K, Ds, generator=g)
    cb = torch.randn(M, K, Ds, generator=g).to(codebook_dtype)
    exact_sums, sums_bound = segment_sum_bound(x, codes, K, extra_ulps=SEGMENT_EXTRA_ULPS[backend.name])
    exp_cs, exp_es, exp_cb, _ = ema64(counts64(codes, K), exact_sums, cs, es, cb, decay, eps)
    bufs = [backend.to(t.clone()) for t in (cs, es, cb)]
    counts = equss.pq_ema_update_(backend.to(x), backend.to(codes), *bufs, decay=decay, eps=eps)
    assert counts.dtype == torch.float32 and torch.equal(counts.cpu().double(), counts64(codes, K))
    # cluster_size: the counts are exact, so only the EMA's own roundings (helpers.ema_bounds); embed_sum
    # and codebooks also carry the fp32 error of this step's sums (sums_bound).
    cs_bound, es_bound, cb_bound = ema_bounds(counts64(codes, K), exact_sums, cs, es, decay, eps, sums_bound)
    _assert_within(bufs[0], exp_cs, cs_bound, "cluster_size")
    torch.testing.assert_close(bufs[0].cpu().double(), exp_cs, rtol=1e-6, atol=1e-5)
    _assert_within(bufs[1], exp_es, es_bound, "embed_sum")
    torch.testing.assert_close(bufs[1].cpu().double(), exp_es, rtol=1e-5, atol=1e-5)
    # codebooks: the fp32 result, then one rounding to the codebook dtype: bf16 keeps 8 significant bits
    # (2⁻⁸ relative, round to nearest; 2⁻⁷ under the Triton interpreter, which truncates: see
    # test_apply_codebook_dtypes_round_the_fp32_result).
    if codebook_dtype == torch.float32:
        _assert_within(bufs[2], exp_cb, cb_bound, "codebooks")
    else:
        rel = 2.0**-7 if (backend.name, backend.device) == ("triton", "cpu") else 2.0**-8
        _assert_within(bufs[2], exp_cb, cb_bound * (1 + rel) + rel * exp_cb.abs(), "bf16 codebooks")
    tol = 1e-4 if codebook_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(bufs[2].cpu().double(), exp_cb.to(codebook_dtype).double(), rtol=tol, atol=tol)


def test_decay_zero_gives_batch_means(backend):
    N, M, K, Ds = 64, 2, 4, 3
    x = torch.randn(N, M, Ds, generator=gen(33))
    codes = (torch.arange(N) % K).unsqueeze(1).expand(N, M).contiguous()
    cs, es, cb = (backend.to(torch.zeros(*s)) for s in ((M, K), (M, K, Ds), (M, K, Ds)))
    # eps = 1e-9 (> 0 is required): smoothed = (n_k + eps)/(N + K·eps)·N differs from n_k by < 1e-9
    # relative, far below the fp32 rounding of the 16-term sums and the division.
    equss.pq_ema_update_(backend.to(x), backend.to(codes), cs, es, cb, decay=0.0, eps=1e-9)
    means = torch.stack([x[codes[:, 0] == k].mean(0) for k in range(K)], dim=1)  # [M, K, Ds]
    # 16-term fp32 sums of |x| ≲ 4 (≤ 17·U·Σ|x| ≈ 6e-5 absolute, /16 after the division) and a few
    # roundings of the division: far inside rtol 1e-5 + atol 1e-6 for means of magnitude ~0.3.
    torch.testing.assert_close(cb.cpu(), means, rtol=1e-5, atol=1e-6)
    assert torch.equal(cs.cpu(), torch.full((M, K), 16.0))


def test_empty_n_only_decays(backend):
    M, K, Ds = 2, 5, 3
    cs, es, cb = (
        backend.to(torch.ones(M, K)),
        backend.to(torch.ones(M, K, Ds)),
        backend.to(torch.zeros(M, K, Ds)),
    )
    x, codes = backend.to(torch.randn(0, M, Ds)), backend.to(torch.zeros(0, M, dtype=torch.int32))
    counts = equss.pq_ema_update_(x, codes, cs, es, cb, 0.5, 1e-5)
    assert torch.equal(counts.cpu(), torch.zeros(M, K))
    torch.testing.assert_close(cs.cpu(), torch.full((M, K), 0.5))
    torch.testing.assert_close(es.cpu(), torch.full((M, K, Ds), 0.5))
    # Equal cluster sizes: smoothed = (0.5 + eps)/(5·0.5 + 5·eps)·2.5 = 0.5 for any eps, so each codeword
    # is 0.5/0.5 = 1 up to a few fp32 roundings.
    torch.testing.assert_close(cb.cpu(), torch.ones(M, K, Ds))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, Triton interpreter
def test_one_nan_row_leaves_codebooks_finite(backend):
    """A NaN in one input row: that (row, subspace) enters no statistic, so every buffer stays finite, the
    result equals a run where that pair is dropped (an out-of-range code), and the other subspaces are
    exactly as in a run on the clean input."""
    N, M, K, Ds = 131, 3, 70, 5
    g = gen(36)
    x = torch.randn(N, M, Ds, generator=g)
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.int32)
    cs, es, cb = (
        torch.rand(M, K, generator=g),
        torch.randn(M, K, Ds, generator=g),
        torch.randn(M, K, Ds, generator=g),
    )
    bad = x.clone()
    bad[40, 1, 2] = float("nan")

    def run(xs, cs_codes, check_range=True):
        bufs = [backend.to(t.clone()) for t in (cs, es, cb)]
        counts = equss.pq_ema_update_(
            backend.to(xs), backend.to(cs_codes), *bufs, decay=0.9, eps=1e-5, check_range=check_range
        )
        return [counts.cpu()] + [t.cpu() for t in bufs]

    got = run(bad, codes)
    for t in got:
        assert torch.isfinite(t).all()
    dropped = codes.clone()
    dropped[40, 1] = K  # out of range: the pair enters nothing
    clean = run(x, codes)
    for a, b, c in zip(got, run(x, dropped, check_range=False), clean):
        if backend.deterministic:
            assert torch.equal(a, b)
            assert torch.equal(a[[0, 2]], c[[0, 2]])  # subspaces 0 and 2 never saw the NaN
        else:  # CUDA atomics: a varying summation order, within the fp32 sum bound
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a[[0, 2]], c[[0, 2]])
    assert got[0][1, codes[40, 1]] == clean[0][1, codes[40, 1]] - 1
    assert torch.equal(got[0].double(), counts64(codes, K, valid_vectors(bad)))


# ------------------------------------------------------------------------------------------- rejection
def test_eps_must_be_positive():
    M, K, Ds = 2, 4, 3
    x, codes = torch.randn(5, M, Ds), torch.zeros(5, M, dtype=torch.int32)
    cs, es, cb = torch.zeros(M, K), torch.zeros(M, K, Ds), torch.zeros(M, K, Ds)
    for eps in (0.0, -1e-5):
        with pytest.raises(ValueError, match=r"eps must be > 0"):
            equss.pq_ema_update_(x, codes, cs, es, cb, decay=0.9, eps=eps)
        with pytest.raises(ValueError, match=r"eps must be > 0"):
            equss.pq_ema_apply_(torch.zeros(M, K), torch.zeros(M, K, Ds), cs, es, cb, 0.9, eps)
    assert torch.equal(cs, torch.zeros(M, K))  # rejected before anything was written


def test_bad_buffers():
    x, codes = torch.randn(5, 2, 3), torch.zeros(5, 2, dtype=torch.int32)
    cs, es, cb = torch.zeros(2, 4), torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"cluster_size must have shape \(2, 4\)"):
        equss.pq_ema_update_(x, codes, torch.zeros(2, 5), es, cb)
    with pytest.raises(TypeError, match="float32"):
        equss.pq_ema_update_(x, codes, cs.half(), es, cb)
    with pytest.raises(ValueError, match="contiguous"):
        equss.pq_ema_update_(x, codes, cs, torch.zeros(2, 3, 4).transpose(1, 2), cb)
    with pytest.raises(ValueError, match="contiguous"):
        equss.pq_ema_update_(x, codes, cs, es, torch.zeros(2, 3, 4).transpose(1, 2))
    with pytest.raises(ValueError, match="decay"):
        equss.pq_ema_update_(x, codes, cs, es, cb, decay=1.5)
    with pytest.raises(IndexError):
        equss.pq_ema_update_(x, codes + 4, cs, es, cb)
    with pytest.raises(ValueError, match=r"does not match codebooks"):
        equss.pq_ema_update_(torch.randn(5, 2, 4), codes, cs, es, cb)
    with pytest.raises(ValueError, match=r"counts must have shape \(2, 4\)"):
        equss.pq_ema_apply_(torch.zeros(2, 5), torch.zeros(2, 4, 3), cs, es, cb)
    with pytest.raises(TypeError, match="sums must be float32"):
        equss.pq_ema_apply_(torch.zeros(2, 4), torch.zeros(2, 4, 3, dtype=torch.float64), cs, es, cb)


# -------------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("codebook_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, codebook_dtype):
    g = gen(40)
    N, M, K, Ds = 19, 3, 7, 5
    x = backend.to(torch.randn(N, M, Ds, generator=g))
    codes = backend.to(torch.randint(0, K, (N, M), generator=g, dtype=torch.int32))
    cb = backend.to(torch.randn(M, K, Ds, generator=g), codebook_dtype)
    counts, sums = equss.pq_cluster_stats(x, codes, K)
    for op, args in [
        (
            torch.ops.equss.pq_ema_apply_,
            (
                counts,
                sums,
                backend.to(torch.rand(M, K)),
                backend.to(torch.randn(M, K, Ds)),
                cb.clone(),
                0.9,
                1e-5,
            ),
        ),
        (
            torch.ops.equss.pq_ema_update_,
            (
                x,
                codes,
                backend.to(torch.rand(M, K)),
                backend.to(torch.randn(M, K, Ds)),
                cb.clone(),
                0.9,
                1e-5,
            ),
        ),
    ]:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)

"""Cross-backend tests of the public PQ ops: every available backend against the reference, and the
reference against float64 brute force. Backends that are not available on CPU are skipped with the
reason (Triton runs here under TRITON_INTERPRET=1, set by the root conftest.py when there is no GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

import equss
from equss import backends
from equss.ops import reference as ref

DEVICE = "cpu"
BACKENDS = ["torch", "ext", "triton"]
# Odd shapes: N = 1, prime N, K and Ds that are not powers of two or multiples of any vector width.
SHAPES = [(1, 1, 1, 1), (7, 3, 5, 3), (97, 2, 17, 5), (131, 4, 33, 16), (37, 5, 257, 33)]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_unless_available(name: str) -> None:
    if not backends.available(name, DEVICE):
        pytest.skip(f"backend {name!r} not available on {DEVICE}: {backends.info(name).detail}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    _skip_unless_available(request.param)
    with equss.use_backend(request.param):
        yield request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dist64(x: torch.Tensor, codebooks: torch.Tensor, metric: str) -> torch.Tensor:
    """Brute-force float64 distances [N, M, K] straight from the definition (no expansion)."""
    x64, c64 = x.double(), codebooks.double()
    if metric == "l2":
        return ((x64.unsqueeze(2) - c64.unsqueeze(0)) ** 2).sum(-1)
    return -(x64.unsqueeze(2) * c64.unsqueeze(0)).sum(-1)


def _assert_codes_optimal(x, codebooks, metric, codes, min_dist, rtol=1e-5, atol=1e-5):
    """The chosen code's exact distance equals the exact minimum within fp32 rounding of the expanded
    form (|x|², |c|², 2x·c each carry ~1e-7 relative error), so near-ties can never make this flaky."""
    d = _dist64(x, codebooks, metric)
    N, M, K = d.shape
    assert codes.dtype == torch.int32 and codes.shape == (N, M)
    assert int(codes.min()) >= 0 and int(codes.max()) < K
    chosen = d.gather(2, codes.long().unsqueeze(-1)).squeeze(-1)
    best = d.min(-1).values
    scale = d.abs().amax(-1) + (x.double() ** 2).sum(-1) + (codebooks.double() ** 2).sum(-1).amax(-1)
    tol = atol + rtol * scale
    assert torch.all(chosen - best <= tol), f"max excess {(chosen - best - tol).max().item()}"
    assert min_dist.dtype == torch.float32
    torch.testing.assert_close(min_dist.double(), best, rtol=0, atol=float(tol.max()))


# ------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_assign_matches_float64_brute_force(shape, metric):
    N, M, K, Ds = shape
    x = torch.randn(N, M, Ds, generator=_gen(0))
    cb = torch.randn(M, K, Ds, generator=_gen(1))
    codes, min_dist = ref.pq_assign_ref(x, cb, metric)
    _assert_codes_optimal(x, cb, metric, codes, min_dist)


def test_reference_assign_chunks_rows(monkeypatch):
    """The reference processes N in chunks (never the full N×M×K tensor); chunked == unchunked."""
    x = torch.randn(1000, 3, 4, generator=_gen(2))
    cb = torch.randn(3, 10, 4, generator=_gen(3))
    full = ref.pq_assign_ref(x, cb, "l2")
    monkeypatch.setattr(ref, "_MAX_DISTANCES_PER_CHUNK", 3 * 10 * 7)  # 7 rows per chunk, 143 chunks
    assert ref.assign_chunk_rows(3, 10) == 7
    chunked = ref.pq_assign_ref(x, cb, "l2")
    assert torch.equal(full[0], chunked[0])
    torch.testing.assert_close(full[1], chunked[1])  # BLAS blocking differs with the chunk size


def test_reference_chunk_bound_for_large_n():
    # N = 10^6, M·K = 32·256: at most 2^24 distances (64 MiB) per chunk instead of 33 GB.
    rows = ref.assign_chunk_rows(32, 256)
    assert rows * 32 * 256 <= 1 << 24 and rows >= 1024


def test_reference_ema_matches_float64_formula():
    M, K, Ds, N = 3, 6, 4, 50
    g = _gen(4)
    x = torch.randn(N, M, Ds, generator=g)
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.int32)
    cs = torch.rand(M, K, generator=g)
    es = torch.randn(M, K, Ds, generator=g)
    cb = torch.randn(M, K, Ds, generator=g)
    decay, eps = 0.9, 1e-3
    exp_cs, exp_es, exp_cb = _ema_float64(x, codes, cs, es, decay, eps)
    cs_, es_, cb_ = cs.clone(), es.clone(), cb.clone()
    counts = ref.pq_ema_update_ref_(x, codes, cs_, es_, cb_, decay, eps)
    torch.testing.assert_close(counts.double(), _counts64(codes, K))
    torch.testing.assert_close(cs_.double(), exp_cs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(es_.double(), exp_es, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cb_.double(), exp_cb, rtol=1e-5, atol=1e-5)


def _counts64(codes: torch.Tensor, K: int) -> torch.Tensor:
    N, M = codes.shape
    out = torch.zeros(M, K, dtype=torch.float64)
    for n in range(N):
        for m in range(M):
            out[m, codes[n, m]] += 1
    return out


def _sums64(x: torch.Tensor, codes: torch.Tensor, K: int) -> torch.Tensor:
    N, M, Ds = x.shape
    out = torch.zeros(M, K, Ds, dtype=torch.float64)
    for n in range(N):
        for m in range(M):
            out[m, codes[n, m]] += x[n, m].double()
    return out


def _ema_float64(x, codes, cluster_size, embed_sum, decay, eps):
    """The EMA codebook update written out in float64, term by term (EQUSS_SPEC §4)."""
    K = cluster_size.shape[1]
    cs = decay * cluster_size.double() + (1 - decay) * _counts64(codes, K)
    es = decay * embed_sum.double() + (1 - decay) * _sums64(x, codes, K)
    n_tot = cs.sum(1, keepdim=True)
    smoothed = (cs + eps) / (n_tot + K * eps) * n_tot
    return cs, es, es / smoothed.unsqueeze(-1)


# -------------------------------------------------------------------------------- assign, all backends
def _shapes_for(backend_name: str):
    return SHAPES


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}M{}K{}Ds{}".format(*s))
def test_assign_random_data_is_optimal(backend, shape, dtype, metric):
    N, M, K, Ds = shape
    x = torch.randn(N, M, Ds, generator=_gen(10)).to(dtype)
    cb = torch.randn(M, K, Ds, generator=_gen(11)).to(dtype)
    codes, min_dist = equss.pq_assign(x, cb, metric)
    # Optimality is judged on the values the op actually received (the dtype-rounded inputs).
    _assert_codes_optimal(x.float(), cb.float(), metric, codes, min_dist)


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_assign_well_separated_is_exact(backend, metric):
    """Rows drawn near known codewords must get exactly those codes (no tolerance needed)."""
    M, K, Ds, N = 4, 23, 8, 211
    g = _gen(12)
    cb = torch.nn.functional.normalize(torch.randn(M, K, Ds, generator=g), dim=-1) * 4.0
    truth = torch.randint(0, K, (N, M), generator=g)
    x = cb[torch.arange(M), truth] + 0.01 * torch.randn(N, M, Ds, generator=g)
    if metric == "dot":  # max inner product = nearest only for equal-norm codewords, as built above
        pass
    codes, _ = equss.pq_assign(x, cb, metric)
    assert torch.equal(codes.long(), truth)


def test_assign_ties_go_to_lowest_index(backend):
    M, K, Ds = 2, 9, 4
    g = _gen(13)
    base = torch.randn(M, 3, Ds, generator=g)
    # Codewords 2, 5 and 7 are bit-identical copies: every row nearest to them must pick 2.
    cb = torch.randn(M, K, Ds, generator=g) * 10
    cb[:, 2] = base[:, 0]
    cb[:, 5] = base[:, 0]
    cb[:, 7] = base[:, 0]
    x = base[:, 0].unsqueeze(0).expand(13, M, Ds) + 0.001 * torch.randn(13, M, Ds, generator=g)
    for metric in ("l2", "dot"):
        c = cb if metric == "l2" else torch.nn.functional.normalize(cb, dim=-1)
        codes, _ = equss.pq_assign(x, c, metric)
        assert torch.all(codes == 2), (metric, codes)
    # All-zero codebook: every distance ties, so every code is 0.
    codes, _ = equss.pq_assign(x, torch.zeros(M, K, Ds), "l2")
    assert torch.all(codes == 0)


def test_assign_nan_and_inf_rows_stay_in_range(backend):
    N, M, K, Ds = 9, 3, 7, 5
    x = torch.randn(N, M, Ds, generator=_gen(14))
    cb = torch.randn(M, K, Ds, generator=_gen(15))
    x[1, 0, 2] = float("nan")
    x[4, 2, :] = float("inf")
    x[6, 1, 0] = float("-inf")
    codes, min_dist = equss.pq_assign(x, cb, "l2")
    assert int(codes.min()) >= 0 and int(codes.max()) < K
    bad = torch.zeros(N, M, dtype=torch.bool)
    bad[1, 0] = bad[4, 2] = bad[6, 1] = True
    assert not torch.isfinite(min_dist[bad]).any()
    # Other rows are unaffected.
    clean_codes, clean_dist = ref.pq_assign_ref(torch.nan_to_num(x, 0.0, 0.0, 0.0), cb, "l2")
    assert torch.equal(codes[~bad], clean_codes[~bad])
    torch.testing.assert_close(min_dist[~bad], clean_dist[~bad], rtol=1e-5, atol=1e-5)
    codes_dot, _ = equss.pq_assign(x, cb, "dot")
    assert int(codes_dot.min()) >= 0 and int(codes_dot.max()) < K


def test_assign_non_contiguous_inputs(backend):
    g = _gen(16)
    big = torch.randn(3, 40, 2, 5, generator=g)  # x as a transposed, sliced view: [N=40, M=3, Ds=5]
    x = big[:, :, 1, :].transpose(0, 1)
    cb_big = torch.randn(5, 11, 3, generator=g)  # codebooks [M=3, K=11, Ds=5] from a permuted view
    cb = cb_big.permute(2, 1, 0)
    assert not x.is_contiguous() and not cb.is_contiguous()
    codes, dist = equss.pq_assign(x, cb)
    codes_c, dist_c = equss.pq_assign(x.contiguous(), cb.contiguous())
    assert torch.equal(codes, codes_c)
    torch.testing.assert_close(dist, dist_c)


def test_assign_empty_n(backend):
    codes, dist = equss.pq_assign(torch.randn(0, 4, 3), torch.randn(4, 5, 3))
    assert codes.shape == (0, 4) and dist.shape == (0, 4) and codes.dtype == torch.int32


def test_assign_mixed_dtypes_promote(backend):
    x = torch.randn(17, 2, 6, generator=_gen(17)).to(torch.bfloat16)
    cb = torch.randn(2, 9, 6, generator=_gen(18))
    codes, dist = equss.pq_assign(x, cb)
    _assert_codes_optimal(x.float(), cb, "l2", codes, dist)


# --------------------------------------------------------------------------------- gather, all backends
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}M{}K{}Ds{}".format(*s))
def test_gather_bit_exact(backend, shape, dtype, code_dtype):
    N, M, K, Ds = shape
    cb = torch.randn(M, K, Ds, generator=_gen(20)).to(dtype)
    codes = torch.randint(0, K, (N, M), generator=_gen(21)).to(code_dtype)
    out = equss.pq_gather(codes, cb)
    expected = torch.stack([cb[m][codes[:, m].long()] for m in range(M)], dim=1)
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}M{}K{}Ds{}".format(*s))
def test_gather_backward_matches_float64(backend, shape):
    N, M, K, Ds = shape
    cb = torch.randn(M, K, Ds, generator=_gen(22), requires_grad=True)
    codes = torch.randint(0, K, (N, M), generator=_gen(23), dtype=torch.int32)
    grad_out = torch.randn(N, M, Ds, generator=_gen(24))
    equss.pq_gather(codes, cb).backward(grad_out)
    # fp32 atomics/partials add at most N terms per codeword: error <= N·eps32·max|g|, far below 1e-4 here.
    torch.testing.assert_close(cb.grad.double(), _sums64(grad_out, codes, K), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gather_backward_half_within_twice_reference_error(backend, dtype):
    N, M, K, Ds = 301, 3, 7, 9
    cb = torch.randn(M, K, Ds, generator=_gen(25)).to(dtype).requires_grad_()
    codes = torch.randint(0, K, (N, M), generator=_gen(26))
    grad_out = torch.randn(N, M, Ds, generator=_gen(27)).to(dtype)
    equss.pq_gather(codes, cb).backward(grad_out)
    exact = _sums64(grad_out.double(), codes, K)
    ref_err = (ref.pq_gather_backward_ref(grad_out, codes, K).to(dtype).double() - exact).abs().max()
    err = (cb.grad.double() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-12, (err, ref_err)


def test_gather_gradcheck_float64(backend):
    if backend == "triton":
        pytest.skip("Triton kernels take fp16/bf16/fp32 only; float64 gradcheck covers torch and ext")
    cb = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 5, (11, 3))
    assert torch.autograd.gradcheck(lambda c: equss.pq_gather(codes, c), (cb,))


def test_gather_non_contiguous(backend):
    cb = torch.randn(6, 4, 3, generator=_gen(28)).permute(1, 0, 2)  # [M=4, K=6, Ds=3] view
    codes = torch.randint(0, 6, (4, 19), generator=_gen(29)).t()
    assert not cb.is_contiguous() and not codes.is_contiguous()
    assert torch.equal(equss.pq_gather(codes, cb), equss.pq_gather(codes.contiguous(), cb.contiguous()))


# ------------------------------------------------------------------------------ EMA stats, all backends
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}M{}K{}Ds{}".format(*s))
def test_cluster_stats_match_float64(backend, shape, dtype):
    N, M, K, Ds = shape
    x = torch.randn(N, M, Ds, generator=_gen(30)).to(dtype)
    codes = torch.randint(0, K, (N, M), generator=_gen(31), dtype=torch.int32)
    counts, sums = equss.pq_cluster_stats(x, codes, K)
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    assert torch.equal(counts.double(), _counts64(codes, K))  # integers < 2^24 are exact in fp32
    # fp32 accumulation of at most N values of |x| <= ~5: error <= N·6e-8·5 < 1e-4 here.
    torch.testing.assert_close(sums.double(), _sums64(x, codes, K), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("codebook_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ema_update_matches_float64(backend, codebook_dtype):
    N, M, K, Ds = 157, 4, 13, 6
    g = _gen(32)
    x = torch.randn(N, M, Ds, generator=g)
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.int32)
    codes[:, 1] = 3  # subspace 1 uses a single code: the other 12 must still be smoothed, not NaN
    cs = torch.rand(M, K, generator=g) * 5
    es = torch.randn(M, K, Ds, generator=g)
    cb = torch.randn(M, K, Ds, generator=g).to(codebook_dtype)
    exp_cs, exp_es, exp_cb = _ema_float64(x, codes, cs, es, 0.99, 1e-5)
    counts = equss.pq_ema_update_(x, codes, cs, es, cb, decay=0.99, eps=1e-5)
    torch.testing.assert_close(counts.double(), _counts64(codes, K))
    torch.testing.assert_close(cs.double(), exp_cs, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(es.double(), exp_es, rtol=1e-5, atol=1e-5)
    tol = 1e-4 if codebook_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(cb.double(), exp_cb.to(codebook_dtype).double(), rtol=tol, atol=tol)


def test_ema_decay_zero_gives_batch_means(backend):
    N, M, K, Ds = 64, 2, 4, 3
    x = torch.randn(N, M, Ds, generator=_gen(33))
    codes = (torch.arange(N) % K).unsqueeze(1).expand(N, M).contiguous()
    cs, es, cb = torch.zeros(M, K), torch.zeros(M, K, Ds), torch.zeros(M, K, Ds)
    equss.pq_ema_update_(x, codes, cs, es, cb, decay=0.0, eps=0.0)
    means = torch.stack([x[codes[:, 0] == k].mean(0) for k in range(K)], dim=1)  # [M, K, Ds]
    torch.testing.assert_close(cb, means, rtol=1e-5, atol=1e-6)


def test_ema_apply_keeps_codebook_when_nothing_assigned(backend):
    M, K, Ds = 2, 5, 3
    cb = torch.randn(M, K, Ds, generator=_gen(34))
    before = cb.clone()
    cs, es = torch.zeros(M, K), torch.zeros(M, K, Ds)
    equss.pq_ema_apply_(torch.zeros(M, K), torch.zeros(M, K, Ds), cs, es, cb, 0.99, 1e-5)
    assert torch.equal(cb, before)


def test_ema_empty_n_only_decays(backend):
    M, K, Ds = 2, 5, 3
    cs, es, cb = torch.ones(M, K), torch.ones(M, K, Ds), torch.zeros(M, K, Ds)
    counts = equss.pq_ema_update_(torch.randn(0, M, Ds), torch.zeros(0, M, dtype=torch.int32), cs, es, cb, 0.5, 0.0)
    assert torch.equal(counts, torch.zeros(M, K))
    torch.testing.assert_close(cs, torch.full((M, K), 0.5))
    torch.testing.assert_close(cb, torch.ones(M, K, Ds))  # (0.5·1)/(0.5) per codeword


# ---------------------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    g = _gen(40)
    N, M, K, Ds = 19, 3, 7, 5
    x = torch.randn(N, M, Ds, generator=g)
    cb = torch.randn(M, K, Ds, generator=g)
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.int32)
    counts, sums = ref.pq_cluster_stats_ref(x, codes, K)
    return {
        "pq_assign_l2": (torch.ops.equss.pq_assign, (x, cb, "l2")),
        "pq_assign_dot": (torch.ops.equss.pq_assign, (x, cb, "dot")),
        "pq_gather": (torch.ops.equss.pq_gather, (codes, cb.clone().requires_grad_())),
        "pq_gather_backward": (torch.ops.equss.pq_gather_backward, (x, codes, K)),
        "pq_cluster_stats": (torch.ops.equss.pq_cluster_stats, (x, codes, K)),
        "pq_ema_apply_": (
            torch.ops.equss.pq_ema_apply_,
            (counts, sums, torch.rand(M, K), torch.randn(M, K, Ds), cb.clone(), 0.9, 1e-5),
        ),
        "pq_ema_update_": (
            torch.ops.equss.pq_ema_update_,
            (x, codes, torch.rand(M, K), torch.randn(M, K, Ds), cb.clone(), 0.9, 1e-5),
        ),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(backend, case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


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


def test_gather_bad_codes():
    cb = torch.randn(4, 6, 3)
    with pytest.raises(IndexError, match=r"\[0, K=6\).*\[0, 6\]"):
        equss.pq_gather(torch.tensor([[0, 1, 2, 6]]), cb)
    with pytest.raises(IndexError, match=r"\[-1, 2\]"):
        equss.pq_gather(torch.tensor([[0, 1, 2, -1]]), cb)
    with pytest.raises(TypeError, match="int32 or int64"):
        equss.pq_gather(torch.zeros(2, 4), cb)
    with pytest.raises(ValueError, match=r"M=3.*M=4"):
        equss.pq_gather(torch.zeros(2, 3, dtype=torch.long), cb)


def test_ema_bad_buffers():
    x, codes = torch.randn(5, 2, 3), torch.zeros(5, 2, dtype=torch.int32)
    cs, es, cb = torch.zeros(2, 4), torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"cluster_size must have shape \(2, 4\)"):
        equss.pq_ema_update_(x, codes, torch.zeros(2, 5), es, cb)
    with pytest.raises(TypeError, match="float32"):
        equss.pq_ema_update_(x, codes, cs.half(), es, cb)
    with pytest.raises(ValueError, match="contiguous"):
        equss.pq_ema_update_(x, codes, cs, torch.zeros(2, 3, 4).transpose(1, 2), cb)
    with pytest.raises(ValueError, match="decay"):
        equss.pq_ema_update_(x, codes, cs, es, cb, decay=1.5)
    with pytest.raises(IndexError):
        equss.pq_ema_update_(x, codes + 4, cs, es, cb)
    with pytest.raises(ValueError, match=r"N=4 rows but x has N=5"):
        equss.pq_cluster_stats(x, codes[:4], 4)


# ------------------------------------------------------------------------------------------ dispatch
def test_forcing_a_missing_backend_raises_with_fix(monkeypatch):
    missing = backends.BackendInfo("ext", False, (), "pretend it failed: undefined symbol foo", "pip install ...")
    monkeypatch.setitem(backends._infos, "ext", missing)
    with equss.use_backend("ext"), pytest.raises(RuntimeError, match="undefined symbol foo.*Fix: pip install"):
        equss.pq_assign(torch.randn(3, 1, 2), torch.randn(1, 2, 2))
    assert "pretend it failed" in equss.describe()


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("EQUSS_BACKEND", "torch")
    assert backends.select("cpu") == "torch"
    monkeypatch.setenv("EQUSS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EQUSS_BACKEND"):
        backends.select("cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        with equss.use_backend("cuda-magic"):
            pass


def test_auto_prefers_extension_on_cpu():
    expected = "ext" if backends.available("ext", "cpu") else "torch"
    with equss.use_backend("auto"):
        assert backends.select("cpu") == expected


def test_use_backend_is_scoped():
    with equss.use_backend("torch"):
        assert backends.select("cpu") == "torch"
    assert backends._requested() in ("auto", "torch", "ext", "triton")
    assert getattr(backends._forced, "name", None) is None


def test_describe_mentions_every_backend():
    text = equss.describe()
    for name in backends.BACKENDS:
        assert name in text
    assert "dispatch:" in text


def test_chunk_rows_math():
    assert ref.assign_chunk_rows(1, 1) == 1 << 24
    assert ref.assign_chunk_rows(1 << 30, 1) == 1
    assert math.isclose(ref.assign_chunk_rows(32, 256) * 32 * 256, 1 << 24)

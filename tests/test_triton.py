"""The Triton backend (``equss.kernels``) against the PyTorch reference and float64 brute force.

Without a GPU the root conftest sets ``TRITON_INTERPRET=1`` before triton is imported, so these tests
run the real kernels on CPU tensors in Triton's interpreter; with a GPU they run on CUDA. Shapes are
small and odd on purpose: N = 1, prime N, K and Ds that are not powers of two, N not a multiple of the
64-row block, Ds > 32 (the Ds-loop variant), K > 64 (several codeword tiles).

Tolerances (u = 2⁻²⁴, the fp32 unit roundoff):

* A sum of n fp32 terms accumulated in any order is within n·u·Σ|terms| of the exact sum (the
  standard recursive-summation bound γ_n·Σ|x_i|, γ_n ≈ n·u). The segment sums add one more relative
  error of 2⁻²² per term for fp32 inputs on GPU (the split-TF32 product; see pq_gather.py), so they
  are checked element-wise against float64 with ``(n + 8)·u·Σ|terms|`` where n is the number of terms
  that landed in that element. Half-precision inputs are exact in fp32, so the same bound holds.
* Assignment distances are ``||c||² − 2x·c (+ ||x||²)`` in fp32: each is within ~(Ds + 4)·u·(||x||² +
  ||c||²) of the exact value, so a chosen code must be optimal up to twice that (``_dist_tol``).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'equss[triton]')")

from equss.kernels import _config as KC  # noqa: E402

import equss  # noqa: E402
from equss.ops import reference as R  # noqa: E402

pq_assign_mod = importlib.import_module("equss.kernels.pq_assign")
pq_gather_mod = importlib.import_module("equss.kernels.pq_gather")
pq_ema_mod = importlib.import_module("equss.kernels.pq_ema")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        DEVICE == "cpu" and not KC.interpreted(),
        reason="no CUDA device and TRITON_INTERPRET is not 1 (the root conftest sets it when triton is imported after it)",
    ),
]

U = 2.0**-24
# bf16 tl.dot is only exercised natively on GPU; under the interpreter the kernels upcast it (see _config).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, M, K, Ds): N=1; prime N; K, Ds not powers of two; N not a multiple of 64; Ds > 32; K > 64.
SHAPES = [(1, 1, 1, 1), (1, 3, 5, 3), (67, 2, 37, 20), (131, 3, 100, 7), (97, 2, 70, 45)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.to(device=DEVICE, dtype=dtype if dtype is not None else t.dtype)


def _brute_dist64(x: torch.Tensor, cb: torch.Tensor, metric: str) -> torch.Tensor:
    """[N, M, K] exact distances in float64 from the (already rounded) inputs."""
    x64, c64 = x.double().cpu(), cb.double().cpu()
    if metric == "l2":
        return ((x64.unsqueeze(2) - c64.unsqueeze(0)) ** 2).sum(-1)
    return -(x64.unsqueeze(2) * c64.unsqueeze(0)).sum(-1)


def _dist_tol(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """[N, M, 1] bound on the fp32 rounding of one distance (module docstring), times 2 for a comparison."""
    Ds = x.shape[-1]
    x_sq = (x.double().cpu() ** 2).sum(-1, keepdim=True)
    c_sq = (cb.double().cpu() ** 2).sum(-1).amax(-1).unsqueeze(0).unsqueeze(-1)
    return 2 * (Ds + 4) * U * (x_sq + c_sq + 1e-30)


# -------------------------------------------------------------------------------------------- assign
def _separated(N, M, K, Ds, dtype, metric, seed):
    """Codebooks and rows = a chosen codeword + small noise, so the right code is unambiguous."""
    g = _gen(seed)
    cb = torch.randn(M, K, Ds, generator=g)
    if metric == "dot":
        cb = torch.nn.functional.normalize(cb, dim=-1)
    # Make codewords distinct even for tiny Ds: spread them along a per-subspace direction.
    cb = cb + 4.0 * torch.arange(K).view(1, K, 1) / K * (1 if Ds > 1 else 0)
    if metric == "dot":
        cb = torch.nn.functional.normalize(cb, dim=-1)
    chosen = torch.randint(0, K, (N, M), generator=g)
    x = torch.stack([cb[m, chosen[:, m]] for m in range(M)], dim=1)
    x = x + 1e-3 * torch.randn(N, M, Ds, generator=g)
    return x.to(dtype), cb.to(dtype), chosen


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_assign_matches_reference(shape, dtype, metric):
    N, M, K, Ds = shape
    x, cb = (
        torch.randn(N, M, Ds, generator=_gen(1)).to(dtype),
        torch.randn(M, K, Ds, generator=_gen(2)).to(dtype),
    )
    with equss.use_backend("triton"):
        codes, min_dist = equss.pq_assign(_to(x), _to(cb), metric)
    assert codes.dtype == torch.int32 and min_dist.dtype == torch.float32
    codes, min_dist = codes.cpu(), min_dist.cpu()
    assert codes.shape == (N, M) and int(codes.min()) >= 0 and int(codes.max()) < K
    exact = _brute_dist64(x, cb, metric)  # [N, M, K]
    best = exact.min(-1).values
    chosen = exact.gather(-1, codes.long().unsqueeze(-1)).squeeze(-1)
    tol = _dist_tol(x, cb).squeeze(-1)
    assert ((chosen - best) <= tol).all(), (
        f"chosen code not optimal by {(chosen - best - tol).max():.3e} beyond tolerance"
    )
    # min_dist is the distance of the chosen code (clamped at 0 for l2), to fp32 rounding.
    assert ((min_dist.double() - chosen).abs() <= tol).all(), (min_dist.double() - chosen).abs().max()
    # Same codes as the fp32 reference wherever the reference's winner is not a near-tie.
    ref_codes, _ = R.pq_assign_ref(x, cb, metric)
    second = exact.topk(2, dim=-1, largest=False).values[..., 1] if K > 1 else best + 1
    clear = (second - best) > 2 * tol
    assert torch.equal(codes[clear], ref_codes[clear])


@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_assign_separated_exact(dtype, metric):
    for i, (N, M, K, Ds) in enumerate([(131, 3, 100, 7), (67, 2, 37, 45)]):
        x, cb, chosen = _separated(N, M, K, Ds, dtype, metric, seed=10 + i)
        with equss.use_backend("triton"):
            codes, _ = equss.pq_assign(_to(x), _to(cb), metric)
        assert torch.equal(codes.cpu().long(), chosen), (codes.cpu() != chosen).sum()


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_assign_ties_break_to_lowest_index(metric):
    # Integer-valued data: every product and sum below is exact in fp32, so ties are exact ties.
    M, K, Ds = 2, 150, 4
    g = _gen(3)
    cb = torch.randint(-3, 4, (M, K, Ds), generator=g).float()
    dup = cb[:, 5].clone()
    for k in (9, 64, 70, 149):  # same tile as 5, first codeword of the 2nd tile, inside it, last of the 3rd
        cb[:, k] = dup
    # Make codeword 5 the unique best for row 0 apart from its duplicates: x = dup scaled up.
    x = torch.stack([3 * dup, dup, -dup, torch.zeros(M, Ds)], dim=0)  # [4, M, Ds]
    constant = torch.ones(M, K, Ds)  # every codeword equal: the first one must win
    with equss.use_backend("triton"):
        codes, _ = equss.pq_assign(_to(x), _to(cb), metric)
        codes_const, _ = equss.pq_assign(_to(x), _to(constant), metric)
    ref, _ = R.pq_assign_ref(x, cb, metric)
    assert torch.equal(codes.cpu(), ref)
    assert torch.equal(codes_const.cpu(), torch.zeros(4, M, dtype=torch.int32))
    if metric == "l2":  # rows 0 and 1 are nearest to the duplicated codeword: lowest copy wins
        assert (codes.cpu()[1] == 5).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("metric", ["l2", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_assign_nan_and_inf_rows(dtype, metric):
    N, M, K, Ds = 70, 2, 67, 5
    x = torch.randn(N, M, Ds, generator=_gen(4))
    cb = torch.randn(M, K, Ds, generator=_gen(5))
    bad = x.clone()
    bad[3, 0, 2] = float("nan")
    bad[65, 1] = float("nan")
    bad[10, 1, 0] = float("inf")
    bad[11, 0, 4] = -float("inf")
    with equss.use_backend("triton"):
        codes, dist = equss.pq_assign(_to(bad, dtype), _to(cb, dtype), metric)
        clean_codes, clean_dist = equss.pq_assign(_to(x, dtype), _to(cb, dtype), metric)
    codes, dist, clean_codes, clean_dist = codes.cpu(), dist.cpu(), clean_codes.cpu(), clean_dist.cpu()
    assert int(codes.min()) >= 0 and int(codes.max()) < K
    poisoned = torch.zeros(N, M, dtype=torch.bool)
    poisoned[3, 0] = poisoned[65, 1] = poisoned[10, 1] = poisoned[11, 0] = True
    assert not torch.isfinite(dist[poisoned]).any(), dist[poisoned]
    assert torch.equal(codes[~poisoned], clean_codes[~poisoned])
    assert torch.equal(dist[~poisoned], clean_dist[~poisoned])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 3, 5), (131, 3, 100, 7), (67, 2, 37, 45)], ids=str)
def test_assign_fused(shape, dtype):
    N, M, K, Ds = shape
    x = _to(torch.randn(N, M, Ds, generator=_gen(6)), dtype)
    raw = torch.randn(M, K, Ds, generator=_gen(7))
    unit = _to(torch.nn.functional.normalize(raw, dim=-1), dtype)  # EQUSS: assign with ĉ, output raw c
    raw = _to(raw, dtype)
    codes, min_dist, q, sq_err = pq_assign_mod.pq_assign_fused(x, unit, "dot", codebooks_out=raw)
    plain_codes, plain_dist = pq_assign_mod.pq_assign(x, unit, "dot")
    assert torch.equal(codes, plain_codes) and torch.equal(min_dist, plain_dist)
    assert q.dtype == dtype and torch.equal(q, R.pq_gather_ref(codes, raw))
    terms = (x.double() - q.double()) ** 2
    bound = (Ds + 8) * U * terms.sum(-1)
    assert ((sq_err.double() - terms.sum(-1)).abs() <= bound + 1e-30).all()
    assert pq_assign_mod.last_config["pq_assign_fused"] in pq_assign_mod.CONFIGS


def test_assign_fused_precision_choice(monkeypatch):
    x = _to(torch.randn(40, 2, 16, generator=_gen(8)))
    cb = _to(torch.randn(2, 20, 16, generator=_gen(9)))
    for precision in KC.PRECISIONS:
        codes, *_ = pq_assign_mod.pq_assign_fused(x, cb, "l2", precision=precision)
        assert pq_assign_mod.last_config["pq_assign_fused"].precision == precision
        assert int(codes.max()) < 20
    with pytest.raises(ValueError, match="precision argument='fp8'"):
        pq_assign_mod.pq_assign_fused(x, cb, "l2", precision="fp8")
    monkeypatch.setenv(KC.PRECISION_ENV, "tf32")
    pq_assign_mod.pq_assign(x, cb, "l2")
    assert pq_assign_mod.last_config["pq_assign"].precision == "tf32"
    monkeypatch.setenv(KC.PRECISION_ENV, "bogus")
    with pytest.raises(ValueError, match="EQUSS_TRITON_PRECISION='bogus'"):
        pq_assign_mod.pq_assign(x, cb, "l2")


def test_assign_fused_rejects_bad_input():
    x = _to(torch.randn(4, 2, 8))
    cb = _to(torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="share one dtype"):
        pq_assign_mod.pq_assign_fused(x, cb.half())
    with pytest.raises(ValueError, match=r"codebooks_out \(2, 6, 8\) must match codebooks \(2, 5, 8\)"):
        pq_assign_mod.pq_assign_fused(x, cb, codebooks_out=_to(torch.randn(2, 6, 8)))
    with pytest.raises(ValueError, match="metric"):
        pq_assign_mod.pq_assign_fused(x, cb, "cosine")


# -------------------------------------------------------------------------------------------- gather
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (131, 3, 100, 7), (67, 2, 37, 45)], ids=str)
def test_gather_bit_exact(shape, dtype, code_dtype):
    N, M, K, Ds = shape
    cb = torch.randn(M, K, Ds, generator=_gen(11)).to(dtype)
    codes = torch.randint(0, K, (N, M), generator=_gen(12)).to(code_dtype)
    with equss.use_backend("triton"):
        out = equss.pq_gather(_to(codes), _to(cb))
    assert out.dtype == dtype and torch.equal(out.cpu(), R.pq_gather_ref(codes, cb))


def test_gather_out_of_range_codes_read_nothing():
    cb = _to(torch.randn(2, 5, 3))
    codes = _to(torch.tensor([[0, 4], [5, -1], [2, 70000]], dtype=torch.int32))
    with equss.use_backend("triton"):
        out = equss.pq_gather(codes, cb, check_range=False).cpu()
    assert torch.equal(out[0], torch.stack([cb[0, 0], cb[1, 4]]).cpu())
    assert torch.equal(out[1], torch.zeros(2, 3)) and torch.equal(out[2, 1], torch.zeros(3))


def _segment_bound(values: torch.Tensor, codes: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 exact segment sums [M, K, Ds] and the fp32 error bound (module docstring)."""
    N, M, Ds = values.shape
    flat = R._flat_index(codes.cpu(), K)
    exact = torch.zeros(M * K, Ds, dtype=torch.float64).index_add_(
        0, flat, values.double().cpu().reshape(N * M, Ds)
    )
    abs_sum = torch.zeros(M * K, Ds, dtype=torch.float64).index_add_(
        0, flat, values.double().cpu().abs().reshape(N * M, Ds)
    )
    count = torch.bincount(flat, minlength=M * K).double().unsqueeze(-1)
    return exact.reshape(M, K, Ds), ((count + 8) * U * abs_sum).reshape(M, K, Ds)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (131, 3, 100, 7), (300, 2, 70, 45)], ids=str)
def test_gather_backward(shape, dtype):
    N, M, K, Ds = shape
    cb = _to(torch.randn(M, K, Ds, generator=_gen(13)), dtype).requires_grad_(True)
    # A skewed code distribution: a few codewords receive many rows (long sums), some none.
    codes = (torch.randint(0, K, (N, M), generator=_gen(14)) % max(1, K // 3)).to(torch.int32)
    grad = torch.randn(N, M, Ds, generator=_gen(15)).to(dtype)
    with equss.use_backend("triton"):
        out = equss.pq_gather(_to(codes), cb)
        out.backward(_to(grad))
    assert cb.grad.dtype == dtype
    exact, bound = _segment_bound(grad, codes, K)
    got = pq_gather_mod.pq_gather_backward(_to(grad), _to(codes), K).cpu()
    assert got.dtype == torch.float32
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max():.3e}, excess over bound {(err - bound).max():.3e}"
    assert torch.equal(cb.grad.cpu(), got.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 3, 5), (131, 3, 100, 7), (300, 2, 70, 45)], ids=str)
def test_cluster_stats(shape, dtype):
    N, M, K, Ds = shape
    x = torch.randn(N, M, Ds, generator=_gen(16)).to(dtype)
    codes = (torch.randint(0, K, (N, M), generator=_gen(17)) % max(1, K // 2)).to(torch.int64)
    with equss.use_backend("triton"):
        counts, sums = equss.pq_cluster_stats(_to(x), _to(codes), K)
    ref_counts, _ = R.pq_cluster_stats_ref(x, codes, K)
    assert counts.dtype == sums.dtype == torch.float32
    assert torch.equal(counts.cpu(), ref_counts)  # integers < 2^24: exact
    exact, bound = _segment_bound(x.float() if dtype == torch.float64 else x, codes, K)
    err = (sums.cpu().double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max():.3e}"


# ------------------------------------------------------------------------------------------------ EMA
def _ema_inputs(M, K, Ds, seed, empty_subspace=True):
    g = _gen(seed)
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


@pytest.mark.parametrize("decay", [0.0, 0.99])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 37, 7), (2, 300, 45)], ids=str)
def test_ema_apply_fp32_against_float64(shape, decay):
    M, K, Ds = shape
    eps = 1e-5
    counts, sums, cs, es, cb = _ema_inputs(M, K, Ds, seed=18, empty_subspace=M > 1)
    d64 = [t.double() for t in (cs, es, cb)]
    R.pq_ema_apply_ref_(counts.double(), sums.double(), *d64, decay, eps)
    bufs = [_to(t.clone()) for t in (cs, es, cb)]
    with equss.use_backend("triton"):
        equss.pq_ema_apply_(_to(counts), _to(sums), *bufs, decay=decay, eps=eps)
    cs_t, es_t, cb_t = (t.cpu().double() for t in bufs)
    # cluster_size / embed_sum: a two-term sum with ≤ 3 roundings → ≤ 3u relative to the terms' magnitudes
    # (not to the result: decay·embed_sum and (1 − decay)·sums may cancel).
    cs_terms = decay * cs.double().abs() + (1 - decay) * counts.double().abs()
    es_terms = decay * es.double().abs() + (1 - decay) * sums.double().abs()
    assert ((cs_t - d64[0]).abs() <= 3 * U * cs_terms + 1e-30).all()
    assert ((es_t - d64[1]).abs() <= 3 * U * es_terms + 1e-30).all()
    # codebooks = embed_sum / smoothed, smoothed = (cs + eps)/(n_tot + K·eps)·n_tot: n_tot is a K-term sum
    # of non-negative values (≤ K·u relative) and ~5 more roundings → smoothed within (K + 8)·u relative;
    # the division adds u, embed_sum brings its absolute error above.
    n_tot = d64[0].sum(1, keepdim=True)
    smoothed = ((d64[0] + eps) / (n_tot + K * eps) * n_tot).unsqueeze(-1)
    bound = 3 * U * es_terms / smoothed + (K + 10) * U * d64[2].abs()
    live = n_tot.squeeze(1) > 0
    err = (cb_t - d64[2]).abs()
    assert (err[live] <= bound[live] + 1e-30).all(), f"max excess {(err - bound)[live].max():.3e}"
    if M > 1:
        assert not live[0]
        assert torch.equal(bufs[2][0].cpu(), cb[0])  # the empty subspace kept its codebook bit for bit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_ema_apply_codebook_dtypes(dtype):
    """Other codebook dtypes get the fp32 result (validated above) rounded once to their dtype."""
    M, K, Ds = 3, 37, 7
    counts, sums, cs, es, cb = _ema_inputs(M, K, Ds, seed=19)
    fp32 = [_to(t.clone()) for t in (cs, es, cb)]
    bufs = [_to(t.clone()) for t in (cs, es, cb.to(dtype))]
    with equss.use_backend("triton"):
        equss.pq_ema_apply_(_to(counts), _to(sums), *fp32, decay=0.9, eps=1e-5)
        equss.pq_ema_apply_(_to(counts), _to(sums), *bufs, decay=0.9, eps=1e-5)
    assert bufs[2].dtype == dtype
    expected = fp32[2][1:].cpu()
    if dtype == torch.bfloat16 and KC.interpreted():
        # The interpreter converts fp32 → bf16 by truncation (it ignores fp_downcast_rounding); GPUs round
        # to nearest even like torch. Truncation is within one bf16 ulp (2⁻⁷ relative) and toward zero.
        got = bufs[2][1:].cpu().float()
        assert ((expected - got).abs() <= 2.0**-7 * expected.abs()).all() and (
            got.abs() <= expected.abs()
        ).all()
    else:
        assert torch.equal(bufs[2][1:].cpu(), expected.to(dtype))
    # Subspace 0 is empty (n_tot = 0) and keeps its codebook exactly. (The reference instead rounds a
    # float64 codebook of an empty subspace through float32.)
    assert torch.equal(bufs[2][0].cpu(), cb[0].to(dtype))


def test_ema_update_end_to_end_matches_reference():
    N, M, K, Ds = 131, 3, 37, 7
    x = torch.randn(N, M, Ds, generator=_gen(20))
    cb = torch.randn(M, K, Ds, generator=_gen(21))
    codes, _ = R.pq_assign_ref(x, cb)
    ref = [torch.zeros(M, K), torch.zeros(M, K, Ds), cb.clone()]
    ref_counts = R.pq_ema_update_ref_(x, codes, *ref, 0.8, 1e-5)
    bufs = [_to(torch.zeros(M, K)), _to(torch.zeros(M, K, Ds)), _to(cb.clone())]
    with equss.use_backend("triton"):
        counts = equss.pq_ema_update_(_to(x), _to(codes), *bufs, decay=0.8, eps=1e-5)
    assert torch.equal(counts.cpu(), ref_counts)
    torch.testing.assert_close(bufs[2].cpu(), ref[2])  # both fp32; the float64 bounds are checked above


# --------------------------------------------------------------------------------- configs / dispatch
def test_launchers_only_pick_precompiled_configs():
    """Every configuration a launcher can choose is in its module's CONFIGS (what the compile test builds)."""
    for Ds in list(range(1, 70)) + [128, 200, 1024]:
        for dtype in KC.KERNEL_DTYPES:
            for precision in KC.PRECISIONS:
                for fused in (False, True):
                    assert pq_assign_mod.pick_config(dtype, Ds, precision, fused) in pq_assign_mod.CONFIGS
            assert pq_gather_mod.pick_segment_sum_config(dtype, Ds) in pq_gather_mod.CONFIGS
            assert pq_gather_mod.pick_segment_sum_config(dtype, Ds) in pq_ema_mod.CONFIGS
        for dtype in KC.KERNEL_DTYPES + (torch.float64,):
            assert pq_gather_mod.pick_gather_config(dtype, Ds) in pq_gather_mod.CONFIGS
            assert pq_ema_mod.EmaConfig("codebook", dtype, pq_ema_mod._CODEBOOK_BLOCK) in pq_ema_mod.CONFIGS


def test_dispatch_runs_triton_kernels():
    import equss.kernels as kernels

    assert sorted(kernels.__all__) == sorted(equss.backends.OP_NAMES)
    pq_assign_mod.last_config.clear()
    with equss.use_backend("triton"):
        assert equss.backends.select(DEVICE) == "triton"
        equss.pq_assign(_to(torch.randn(5, 2, 3)), _to(torch.randn(2, 4, 3)))
    assert "pq_assign" in pq_assign_mod.last_config


def test_float64_assign_runs_as_float32():
    x = torch.randn(50, 2, 6, generator=_gen(22), dtype=torch.float64)
    cb = torch.randn(2, 9, 6, generator=_gen(23), dtype=torch.float64)
    with equss.use_backend("triton"):
        codes, dist = equss.pq_assign(_to(x), _to(cb))
    ref_codes, ref_dist = R.pq_assign_ref(x, cb)
    assert pq_assign_mod.last_config["pq_assign"].dtype == torch.float32
    assert torch.equal(codes.cpu(), ref_codes)
    assert math.isclose(float((dist.cpu() - ref_dist).abs().max()), 0.0, abs_tol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device: N·M·Ds > 2^31 elements (4 GiB in fp16)")
def test_int64_offsets_beyond_2_31_elements():
    """Rows past element 2^31 of x are read, assigned, gathered and summed correctly (int64 offsets)."""
    M, K, Ds = 32, 16, 32
    N = (1 << 31) // (M * Ds) + 77  # the last 77 rows start beyond element 2^31
    g = torch.Generator(device=DEVICE).manual_seed(24)
    cb = torch.randn(M, K, Ds, device=DEVICE, generator=g, dtype=torch.float16)
    x = torch.empty(N, M, Ds, device=DEVICE, dtype=torch.float16)
    x.normal_(generator=g)
    tail = slice(N - 200, N)
    with equss.use_backend("triton"):
        codes, _ = equss.pq_assign(x, cb)
        q = equss.pq_gather(codes, cb, check_range=False)
        counts, sums = equss.pq_cluster_stats(x, codes, K)
    ref_codes, _ = R.pq_assign_ref(x[tail], cb)
    clear = _clear_rows_mask(x[tail], cb)
    assert torch.equal(codes[tail][clear], ref_codes[clear])
    assert torch.equal(q[tail], R.pq_gather_ref(codes[tail], cb))
    assert torch.equal(counts.sum(1), torch.full((M,), float(N), device=DEVICE))
    ref_counts, ref_sums = R.pq_cluster_stats_ref(x, codes, K)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-4, atol=1e-2)  # ~10^5-term sums, order differs


def _clear_rows_mask(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    exact = _brute_dist64(x, cb, "l2")
    two = exact.topk(2, dim=-1, largest=False).values
    return ((two[..., 1] - two[..., 0]) > 2 * _dist_tol(x, cb).squeeze(-1)).to(x.device)


def test_opcheck_with_triton_backend():
    """The custom ops keep their schema / fake / aot contracts when the Triton backend runs them."""
    x = _to(torch.randn(37, 3, 5, generator=_gen(25)))
    cb = _to(torch.randn(3, 11, 5, generator=_gen(26)))
    codes, _ = R.pq_assign_ref(x, cb)
    cases = [
        (torch.ops.equss.pq_assign, (x, cb, "l2")),
        (torch.ops.equss.pq_gather, (codes, cb)),
        (torch.ops.equss.pq_gather_backward, (x, codes, 11)),
        (torch.ops.equss.pq_cluster_stats, (x, codes, 11)),
        (
            torch.ops.equss.pq_ema_apply_,
            (
                _to(torch.rand(3, 11)),
                _to(torch.randn(3, 11, 5)),
                _to(torch.rand(3, 11)),
                _to(torch.randn(3, 11, 5)),
                cb.clone(),
                0.9,
                1e-5,
            ),
        ),
    ]
    with equss.use_backend("triton"):
        for op, args in cases:
            result = torch.library.opcheck(
                op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
            )
            assert set(result.values()) == {"SUCCESS"}, (op, result)

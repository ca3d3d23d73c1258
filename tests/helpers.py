"""Shared helpers of the PQ-op tests: data generators, float64 ground truth and the fp32 error bounds.

Every contract test of ``tests/test_pq_*.py`` judges a backend against float64 values computed here
straight from the definitions (no expanded forms, no scatter-add), never against another backend alone.
Glossary: ``x [N, M, Ds]``, ``codebooks [M, K, Ds]``, ``codes [N, M]``.

Error bounds (``U = 2⁻²⁴``, the fp32 unit roundoff). A sum of ``n`` fp32 terms accumulated in any order
(recursive, pairwise, blocked, lane-split, FMA chains) is within ``γ_n·Σ|terms|`` of the exact sum,
``γ_n = n·U/(1 − n·U)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1 and §4.2). The
bounds below use ``(n + 1)·U`` or more for ``γ_n``: for every ``n`` here ``n·U < 10⁻⁴``, so the ``+1``
absorbs the second-order term. They are worst-case bounds, so a test can never be flaky, yet elementwise,
so a real error (a wrong index, a missed row, a lost term) exceeds them by orders of magnitude.
"""

from __future__ import annotations

import torch

U = 2.0**-24
METRICS = ("l2", "dot")

# Dtypes every op takes; kernels compute fp16/bf16 with fp32 accumulation, float64 as float32 (the
# reference accumulates in float32 too), so float64 appears where an op has a float64 contract.
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_FLOAT_DTYPES = FLOAT_DTYPES + [torch.float64]
CODE_DTYPES = [torch.int32, torch.int64]

# (N, M, K, Ds), odd on purpose: N = 1; prime N (7, 37, 67, 97, 131); K and Ds not powers of two; N not
# a multiple of the 64-row Triton block (131 spans three); Ds > 32 (the Ds-loop kernels: 45, 33); K > 64
# (several 64-codeword Triton tiles: 100, 257; 257 = 17 partial 16-codeword ext tiles).
SHAPES = [(1, 1, 1, 1), (7, 3, 5, 3), (97, 2, 17, 5), (131, 3, 100, 7), (67, 2, 37, 45), (37, 3, 257, 33)]


def shape_id(shape: tuple[int, int, int, int]) -> str:
    return "N{}M{}K{}Ds{}".format(*shape)


def gen(seed: int) -> torch.Generator:
    """A CPU generator: test data is drawn on CPU, then moved to the backend's device."""
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- assign
def valid_vectors(v: torch.Tensor) -> torch.Tensor:
    """``[..., Ds]`` → ``[...]``: the fp32 squared norm is finite (the non-finite contract of reference.py)."""
    vf = v.detach().cpu().float()
    return torch.isfinite((vf * vf).sum(-1))


def dist64(x: torch.Tensor, codebooks: torch.Tensor, metric: str) -> torch.Tensor:
    """Brute-force float64 distances ``[N, M, K]`` straight from the definition (no expansion)."""
    x64, c64 = x.detach().double().cpu(), codebooks.detach().double().cpu()
    if metric == "l2":
        return ((x64.unsqueeze(2) - c64.unsqueeze(0)) ** 2).sum(-1)
    return -(x64.unsqueeze(2) * c64.unsqueeze(0)).sum(-1)


def assign_error_bounds(x: torch.Tensor, codebooks: torch.Tensor, metric: str, backend: str | None = None):
    """``(δ [N, M, K], ε [N, M, K])``: worst-case fp32 errors of the distances a backend computes.

    The argmin runs on ``D_k = ||c_k||² − 2 x·c_k`` (l2) or ``D_k = −x·c_k`` (dot); for l2, ``||x||²`` is
    added to the winner afterwards. With ``A_k = ||c_k||²`` and ``B_k = Σ_d |x_d c_kd|`` (exact, float64):

    * reference / Triton, l2: ``||c||²`` (Ds rounded products and sums: ``γ_Ds·A``), ``x·c`` (``γ_Ds·B``,
      times an exact 2), one subtraction (``U·(A + 2B)``): ``|D̂_k − D_k| ≤ (Ds + 1)·U·(A + 2B)``;
    * ext, l2 (``backend="ext"``): ``||c||²`` (``γ_Ds·A``) is the start of one FMA chain over the Ds
      products of ``x`` with the exact ``−2c``, whose Ds roundings are each ≤ U·(A + 2B):
      ``|D̂_k − D_k| ≤ Ds·U·(2A + 2B)``;
    * dot, every backend: one Ds-term dot product scaled by an exact −1 or −2: ``γ_Ds·B``.

    ``δ_k`` is that bound with ``Ds + 2`` for ``Ds`` (absorbing γ's second-order term). A returned code
    ``c`` then satisfies ``D_c − D_best ≤ δ_c + δ_best`` exactly. ``min_dist = fl(D̂_c + fl(||x||²))`` for
    l2 (then clamped at 0, which only moves it towards the exact, non-negative value) adds ``γ_Ds·||x||²``
    and one rounding of ``|D_c| + ||x||² ≤ A_c + 2B_c + ||x||²``: ``|min_dist − d_c| ≤ ε_c = δ_c +
    2U·(A_c + 2B_c) + (Ds + 2)·U·||x||²``; for dot ``min_dist = D̂_c`` (ε = δ). fp16/bf16 inputs and their
    products are exact in fp32, so the bounds hold for the rounded values; float64 runs as float32.
    Tensor cores that truncate instead of rounding (some fp16 MMA units) double U; observed errors are
    ~√Ds·U·(A + 2B), far inside these bounds either way.
    """
    x64, c64 = x.detach().double().cpu(), codebooks.detach().double().cpu()
    Ds = x.shape[-1]
    B = (x64.abs().unsqueeze(2) * c64.abs().unsqueeze(0)).sum(-1)  # [N, M, K]
    if metric == "dot":
        delta = (Ds + 2) * U * B
        return delta, delta
    A = (c64**2).sum(-1).unsqueeze(0)  # [1, M, K]
    delta = (Ds + 2) * U * ((2 * A + 2 * B) if backend == "ext" else (A + 2 * B))
    x_sq = (x64**2).sum(-1, keepdim=True)  # [N, M, 1]
    eps = delta + 2 * U * (A + 2 * B) + (Ds + 2) * U * x_sq
    return delta, eps


def assert_assign_contract(x, codebooks, metric, codes, min_dist, label="", backend=None) -> None:
    """The full pq_assign contract (``equss/ops/reference.py``) for the inputs the op received.

    ``x`` and ``codebooks`` are the values the op computed with (cast to float32 by the caller when the
    op promotes or rounds); ``backend`` picks the error bound of :func:`assign_error_bounds`. Checks
    dtypes and shapes; invalid rows (non-finite fp32 ``||x||²``): code 0, ``min_dist`` NaN; a valid row
    of a subspace without a valid codeword: code 0, ``min_dist`` +inf; every other row: an in-range code
    of a valid codeword that is optimal within ``δ_c + δ_best``, and ``min_dist`` within ``ε_c`` of the
    chosen code's exact distance (so within ``ε_c + δ_c + δ_best`` of the exact minimum).
    """
    N, M, Ds = x.shape
    K = codebooks.shape[1]
    codes, min_dist = codes.cpu(), min_dist.cpu()
    assert codes.dtype == torch.int32 and codes.shape == (N, M), (label, codes.dtype, codes.shape)
    assert min_dist.dtype == torch.float32 and min_dist.shape == (N, M), (label, min_dist.dtype)
    if N == 0:
        return
    assert int(codes.min()) >= 0 and int(codes.max()) < K, label
    row_ok = valid_vectors(x)  # [N, M]
    cw_ok = valid_vectors(codebooks)  # [M, K]
    bad = ~row_ok
    assert torch.all(codes[bad] == 0), (label, "invalid rows must get code 0", codes[bad])
    assert torch.all(torch.isnan(min_dist[bad])), (label, "invalid rows must get min_dist NaN", min_dist[bad])
    empty = row_ok & ~cw_ok.any(-1).unsqueeze(0)  # valid rows in a subspace without a valid codeword
    assert torch.all(codes[empty] == 0) and torch.all(min_dist[empty] == float("inf")), label
    live = row_ok & ~empty
    if not live.any():
        return
    x_clean = torch.where(row_ok.unsqueeze(-1), x.detach().cpu().double(), 0.0)
    c_clean = torch.where(cw_ok.unsqueeze(-1), codebooks.detach().cpu().double(), 0.0)
    d = dist64(x_clean, c_clean, metric).masked_fill(~cw_ok.unsqueeze(0), float("inf"))
    delta, eps = assign_error_bounds(x_clean, c_clean, metric, backend)
    idx = codes.long().unsqueeze(-1)
    won = cw_ok.unsqueeze(0).expand(N, M, K).gather(2, idx).squeeze(-1)
    assert torch.all(won[live]), (label, "an invalid codeword won")
    chosen = d.gather(2, idx).squeeze(-1)
    best, best_idx = d.min(-1)
    delta_c = delta.gather(2, idx).squeeze(-1)
    delta_b = delta.gather(2, best_idx.unsqueeze(-1)).squeeze(-1)
    excess = (chosen - best - delta_c - delta_b)[live]
    assert torch.all(excess <= 0), f"{label}: chosen code not optimal, worst excess {excess.max().item():.3e}"
    eps_c = eps.gather(2, idx).squeeze(-1)
    md = min_dist.double()
    err = (md - chosen).abs()[live]
    assert torch.all(err <= eps_c[live]), (
        f"{label}: min_dist off the chosen distance by {(err - eps_c[live]).max():.3e}"
    )
    err_best = (md - best).abs()[live]
    bound_best = (eps_c + delta_c + delta_b)[live]
    assert torch.all(err_best <= bound_best), (
        f"{label}: min_dist off the minimum by {(err_best - bound_best).max():.3e}"
    )


def unambiguous_rows(x, codebooks, metric) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exact argmin [N, M], mask)``: rows whose exact winner beats every other codeword by more than
    ``δ_k + δ_best`` (:func:`assign_error_bounds`, the larger ext bound), so every backend must return
    exactly that code."""
    d = dist64(x, codebooks, metric)
    delta, _ = assign_error_bounds(x, codebooks, metric, backend="ext")
    best, best_idx = d.min(-1)
    delta_b = delta.gather(2, best_idx.unsqueeze(-1))
    margin = d - best.unsqueeze(-1) - delta - delta_b  # [N, M, K]
    margin.scatter_(2, best_idx.unsqueeze(-1), float("inf"))
    return best_idx, (margin > 0).all(-1)


def separated(N, M, K, Ds, metric, seed, dtype=torch.float32):
    """Codebooks and rows = a chosen codeword + small noise, checked (in float64, after rounding to
    ``dtype``) to be unambiguous: every backend must return exactly ``truth``.

    For "l2" the codewords are spread along a per-subspace direction so they are distinct even for tiny
    Ds; for "dot" they are random unit vectors (max inner product = nearest only for equal-norm
    codewords; spreading them first would crowd them around one direction, closer than bf16 rounding).
    """
    g = gen(seed)
    cb = torch.randn(M, K, Ds, generator=g)
    if metric == "dot":
        cb = torch.nn.functional.normalize(cb, dim=-1)
    else:
        cb = cb + 4.0 * torch.arange(K).view(1, K, 1) / K * (1 if Ds > 1 else 0)
    truth = torch.randint(0, K, (N, M), generator=g)
    x = cb[torch.arange(M), truth] + 1e-3 * torch.randn(N, M, Ds, generator=g)
    x, cb = x.to(dtype), cb.to(dtype)
    exact, clear = unambiguous_rows(x.float(), cb.float(), metric)
    assert torch.equal(exact, truth) and clear.all(), "test data is not well separated: fix the generator"
    return x, cb, truth


# Bit-identical codewords at indices in different ext lanes (8), 16-codeword ext tiles, L1 K-blocks (7
# tiles at Ds = 33) and 64-codeword Triton tiles (K = 257): the lowest index must win (used by
# test_pq_assign.py on every backend and by test_ext.py under each CPU kernel).
TIE_COPIES = [(2, 5, 7), (2, 9, 21, 130, 256), (9, 16, 130), (64, 70, 149), (200, 201, 256), (0, 255)]
TIE_IDS = [
    "same-tile",
    "lane2-vs-higher-lanes-tiles-blocks",
    "lane1-vs-lane0-next-tile",
    "triton-tiles",
    "last-block",
    "first-and-last",
]


def tied_data(copies, seed=4, N=31, M=2, K=257, Ds=33):
    """Rows near a target codeword duplicated at the indices ``copies`` (everything else random)."""
    g = gen(seed)
    target = torch.nn.functional.normalize(torch.randn(M, Ds, generator=g), dim=-1) * 3
    cb = torch.nn.functional.normalize(torch.randn(M, K, Ds, generator=g), dim=-1) * 3
    for k in copies:
        cb[:, k] = target
    x = target.unsqueeze(0) + 0.01 * torch.randn(N, M, Ds, generator=g)
    return x, cb


# ------------------------------------------------------------------------------- counts, sums and EMA
def _one_hot(codes: torch.Tensor, K: int, keep: torch.Tensor | None) -> torch.Tensor:
    """``[N, M, K]`` float64 one-hot of the in-range codes where ``keep`` holds (zero rows elsewhere)."""
    codes = codes.detach().cpu().long()
    ok = (codes >= 0) & (codes < K)
    if keep is not None:
        ok = ok & keep.cpu()
    onehot = torch.nn.functional.one_hot(torch.where(ok, codes, 0), K).double()
    return onehot * ok.unsqueeze(-1)


def counts64(codes: torch.Tensor, K: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``[M, K]`` float64: rows per codeword (in-range codes, where ``keep`` holds)."""
    return _one_hot(codes, K, keep).sum(0)


def sums64(
    values: torch.Tensor, codes: torch.Tensor, K: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``[M, K, Ds]`` float64 per-codeword sums, a one-hot contraction independent of any scatter-add.
    Rows left out (not ``keep``, or out-of-range code) are zeroed first, so their NaN/inf never enter."""
    onehot = _one_hot(codes, K, keep)
    v = values.detach().cpu().double()
    v = torch.where(onehot.sum(-1, keepdim=True) > 0, v, 0.0)
    return torch.einsum("nmk,nmd->mkd", onehot, v)


# Extra relative error per summed term, in units of U, on top of the accumulation (module docstring).
# Triton's segment sum splits fp32 values into three bfloat16 pieces before its one-hot tensor-core
# products: the pieces represent the value to 2⁻²⁴ relative on GPU and to 2⁻²¹ = 8·U under the
# interpreter, whose fp32 → bf16 conversion truncates (kernels/pq_segment_sum.py). The C++ and
# reference scatter-adds add the fp32 values themselves.
SEGMENT_EXTRA_ULPS = {"torch": 0, "ext": 0, "triton": 8}


def segment_sum_bound(
    values: torch.Tensor, codes: torch.Tensor, K: int, keep: torch.Tensor | None = None, extra_ulps: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exact [M, K, Ds], bound [M, K, Ds])`` for an fp32 segment sum of ``values`` by code.

    ``values`` are what the op adds: the caller rounds float64 to float32 first (every backend sums
    ``x.float()``, like the reference); fp16/bf16 values are exact in fp32. An element that sums ``n``
    terms is within ``(n + 1 + extra_ulps)·U·Σ|terms|`` of the exact sum (module docstring; the extra
    ulps are the representation error of :data:`SEGMENT_EXTRA_ULPS`).
    """
    exact = sums64(values, codes, K, keep)
    abs_sum = sums64(values.detach().abs(), codes, K, keep)
    n = counts64(codes, K, keep).unsqueeze(-1)
    return exact, (n + 1 + extra_ulps) * U * abs_sum


def assert_segment_sum(got: torch.Tensor, values, codes, K, keep=None, extra_ulps=0, label="") -> None:
    exact, bound = segment_sum_bound(values, codes, K, keep, extra_ulps)
    assert got.shape == exact.shape, (label, got.shape, exact.shape)
    err = (got.detach().cpu().double() - exact).abs()
    assert torch.all(err <= bound), (
        f"{label}: max error {err.max():.3e}, excess over bound {(err - bound).max():.3e}"
    )


def ema64(counts, sums, cluster_size, embed_sum, codebooks, decay: float, eps: float):
    """The EMA codebook update written out in float64, term by term (docs/method.md §4, reference.py).

    Returns ``(cluster_size, embed_sum, codebooks, n_tot)`` in float64; a subspace with ``n_tot = 0``
    keeps its codebook.
    """
    K = cluster_size.shape[1]
    cs = decay * cluster_size.double().cpu() + (1 - decay) * counts.double().cpu()
    es = decay * embed_sum.double().cpu() + (1 - decay) * sums.double().cpu()
    n_tot = cs.sum(1, keepdim=True)
    smoothed = (cs + eps) / (n_tot + K * eps) * n_tot
    new = es / smoothed.unsqueeze(-1)
    cb = torch.where((n_tot > 0).unsqueeze(-1), new, codebooks.double().cpu())
    return cs, es, cb, n_tot


def ema_bounds(counts, sums, cluster_size, embed_sum, decay: float, eps: float, sums_bound=None):
    """``(cs_bound [M, K], es_bound [M, K, Ds], cb_bound [M, K, Ds])``: fp32 error bounds of the EMA update.

    ``cluster_size`` / ``embed_sum``: a two-term sum with ≤ 3 roundings (the fp32 scalars ``decay`` and
    ``1 − decay`` are rounded once where they enter) → ≤ 3U relative to the terms' magnitudes (not to the
    result: the two terms may cancel). ``codebooks = embed_sum / smoothed`` with ``smoothed = (cs + eps)
    /(n_tot + K·eps)·n_tot``: ``n_tot`` is a K-term sum of non-negative values (≤ K·U relative) and ~5
    more roundings → smoothed within (K + 8)·U relative; the division adds U, the store ~U, and
    embed_sum brings its absolute error above: ``|Δcb| ≤ es_bound/smoothed + (K + 10)·U·|cb|``.
    ``sums_bound`` (from :func:`segment_sum_bound`, when ``sums`` are themselves computed in fp32, as in
    ``pq_ema_update_``) enters embed_sum scaled by ``1 − decay`` and the codebooks through the division.
    """
    K = cluster_size.shape[1]
    cs_terms = decay * cluster_size.double().cpu().abs() + (1 - decay) * counts.double().cpu().abs()
    es_terms = decay * embed_sum.double().cpu().abs() + (1 - decay) * sums.double().cpu().abs()
    cs_new = decay * cluster_size.double().cpu() + (1 - decay) * counts.double().cpu()
    n_tot = cs_new.sum(1, keepdim=True)
    smoothed = ((cs_new + eps) / (n_tot + K * eps) * n_tot).unsqueeze(-1)
    es_new = decay * embed_sum.double().cpu() + (1 - decay) * sums.double().cpu()
    cb_abs = (es_new / smoothed).abs()
    es_bound = 3 * U * es_terms
    if sums_bound is not None:
        es_bound = es_bound + (1 - decay) * sums_bound * (1 + 4 * U)
    return 3 * U * cs_terms, es_bound, es_bound / smoothed + (K + 10) * U * cb_abs


def sq_err_bound(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exact [N, M], bound [N, M])`` for ``sq_err = Σ_d (x − q)²`` computed in fp32.

    ``exact`` is the float64 value from the op's inputs. For fp32/fp16/bf16 inputs (exact in fp32) each
    term ``fl(fl(x − q)²)`` carries ≤ 3 roundings and the Ds-term sum of non-negative terms ``γ_Ds``:
    ``|Δ| ≤ (Ds + 4)·U·exact``. float64 inputs may be rounded to fp32 before the subtraction (the
    reference's ``x.float()``), which moves each difference by ≤ ``U·(|x| + |q|)``: that adds
    ``Σ_d 2U·|x − q|·(|x| + |q|) + 4U²·(|x| + |q|)²`` (the square of that shift, with the subtraction's
    own rounding, is ≤ (2U·(|x| + |q|))²).
    """
    x64, q64 = x.detach().cpu().double(), q.detach().cpu().double()
    diff = x64 - q64
    exact = (diff**2).sum(-1)
    Ds = x.shape[-1]
    bound = (Ds + 4) * U * exact
    if x.dtype == torch.float64 or q.dtype == torch.float64:
        mag = x64.abs() + q64.abs()
        bound = bound + (2 * U * diff.abs() * mag + 4 * U * U * mag**2).sum(-1) * (1 + 1e-6)
    return exact, bound

"""Contract tests of ``equss.pq_assign_gather`` (the fused training forward) on every backend.

The op equals ``pq_assign`` + ``pq_gather`` + the squared error + ``pq_cluster_stats`` over the valid rows
(``pq_assign_gather_ref`` in ``equss/ops/reference.py``): on each backend its codes and min_dist are
bit-identical to that backend's ``pq_assign``, quantized is a bit-exact gather from ``codebooks_out``,
sq_err is within the fp32 bound of ``helpers.sq_err_bound``, counts are exact and sums within the
segment-sum bound of ``helpers.segment_sum_bound``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ALL_FLOAT_DTYPES,
    SEGMENT_EXTRA_ULPS,
    assert_assign_contract,
    assert_segment_sum,
    counts64,
    gen,
    shape_id,
    sq_err_bound,
    valid_vectors,
)

import equss
from equss.ops import reference as ref

# N = 1; N not a multiple of 64 with K > 64; Ds > 32 (the Ds loop); prime N with K, Ds odd; the EQUSS Ds = 32
# with K > 128 (two CUDA codeword tiles; whole float4 rows for the CUDA epilogue's vector atomics).
FUSED_SHAPES = [(1, 2, 3, 5), (131, 3, 100, 7), (67, 2, 37, 45), (97, 2, 150, 32)]
# "dot" (how EQUSS assigns) on every shape, "l2" on one: the metric only changes the assignment, whose
# contract test_pq_assign.py covers on every shape.
FUSED_CASES = [(shape, "dot") for shape in FUSED_SHAPES] + [((131, 3, 100, 7), "l2")]


def _inputs(shape, dtype, seed):
    """EQUSS-like inputs: assign normalised rows to normalised codewords, output the raw codewords,
    sum the raw rows (stats_x)."""
    N, M, K, Ds = shape
    raw_x = torch.randn(N, M, Ds, generator=gen(seed)) * 2
    raw = torch.randn(M, K, Ds, generator=gen(seed + 1))
    x = torch.nn.functional.normalize(raw_x, dim=-1).to(dtype)
    unit = torch.nn.functional.normalize(raw, dim=-1).to(dtype)
    return x, unit, raw.to(dtype), raw_x.to(dtype)


def _check_against_parts(backend, x, cb, cb_out, metric, stats_x, out, label=""):
    """The fused outputs against the separate ops on the same backend and against float64."""
    codes, min_dist, q, sq_err, counts, sums = (t.cpu() for t in out)
    N, M, Ds = x.shape
    K = cb.shape[1]
    plain_codes, plain_dist = equss.pq_assign(backend.to(x), backend.to(cb), metric)
    assert torch.equal(codes, plain_codes.cpu()), label
    # Bit-equal, NaN where pq_assign has NaN (invalid rows).
    torch.testing.assert_close(min_dist, plain_dist.cpu(), rtol=0, atol=0, equal_nan=True, msg=label)
    assert_assign_contract(x.float(), cb.float(), metric, codes, min_dist, label, backend.name)
    # quantized: bit-exact codewords of codebooks_out, in its dtype.
    assert q.dtype == cb_out.dtype and q.shape == (N, M, Ds), label
    assert torch.equal(q, ref.pq_gather_ref(codes, cb_out)), label  # = pq_gather (bit-exact on every backend)
    # sq_err = Σ_d (x − quantized)² in fp32 (helpers.sq_err_bound).
    ok = valid_vectors(x)
    assert sq_err.dtype == torch.float32 and sq_err.shape == (N, M), label
    exact, bound = sq_err_bound(x, q)
    err = (sq_err.double() - exact).abs()
    assert torch.all(err[ok] <= bound[ok]), (
        f"{label}: sq_err off by {(err - bound)[ok].max():.3e} beyond the bound"
    )
    assert not torch.isfinite(sq_err[~ok]).any(), (label, sq_err[~ok])
    # Statistics over the valid rows of x (and of stats_x when given): counts exact, sums bounded.
    keep = ok if stats_x is None else ok & valid_vectors(stats_x)
    assert counts.dtype == torch.float32 and torch.equal(counts.double(), counts64(codes, K, keep)), label
    assert sums.dtype == torch.float32, label
    if stats_x is None:
        assert sums.shape == (M, K, 0), (label, sums.shape)
    else:
        values = stats_x.float()  # every backend sums the fp32-rounded stats_x, like the reference
        assert_segment_sum(sums, values, codes, K, keep, SEGMENT_EXTRA_ULPS[backend.name], label)


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,metric", FUSED_CASES, ids=[f"{shape_id(s)}-{m}" for s, m in FUSED_CASES])
def test_equals_assign_gather_and_stats(backend, shape, dtype, metric):
    _run_and_check(backend, shape, dtype, metric, with_stats=True)


@pytest.mark.parametrize("shape,metric", FUSED_CASES, ids=[f"{shape_id(s)}-{m}" for s, m in FUSED_CASES])
def test_counts_only_without_stats_x(backend, shape, metric):
    """Without stats_x: counts of the valid rows of x and sums of shape [M, K, 0] (one dtype here: the
    assignment, gather and error are those of the test above)."""
    _run_and_check(backend, shape, torch.float32, metric, with_stats=False)


def _run_and_check(backend, shape, dtype, metric, with_stats):
    x, unit, raw, raw_x = _inputs(shape, dtype, seed=6)
    stats_x = raw_x if with_stats else None
    out = equss.pq_assign_gather(
        backend.to(x),
        backend.to(unit),
        metric,
        codebooks_out=backend.to(raw),
        stats_x=None if stats_x is None else backend.to(stats_x),
    )
    _check_against_parts(backend, x, unit, raw, metric, stats_x, out, f"{shape}/{dtype}/{metric}")


def test_codebooks_out_defaults_to_codebooks(backend):
    x, unit, _, _ = _inputs((40, 2, 9, 6), torch.float32, seed=7)
    out = equss.pq_assign_gather(backend.to(x), backend.to(unit), "l2")
    _check_against_parts(backend, x, unit, unit, "l2", None, out)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, Triton interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_rows(backend, dtype):
    """Invalid rows of x: code 0, min_dist NaN, quantized = codeword 0, in no count or sum. An invalid row
    of stats_x (x valid there) keeps its code but enters no count or sum either."""
    shape = (70, 3, 67, 9)
    x, unit, raw, raw_x = _inputs(shape, dtype, seed=8)
    x[3, 0, 2] = float("nan")
    x[65, 1] = float("inf")
    x[10, 2, 0] = -float("inf")
    raw_x[20, 1, 4] = float("nan")
    raw_x[21, 0] = 1e20  # finite, but its fp32 squared norm overflows
    raw_x[3, 0] = float("inf")  # both invalid
    for stats_x in (None, raw_x):
        out = equss.pq_assign_gather(
            backend.to(x),
            backend.to(unit),
            "dot",
            codebooks_out=backend.to(raw),
            stats_x=None if stats_x is None else backend.to(stats_x),
        )
        codes, min_dist, q = (t.cpu() for t in out[:3])
        for n, m in [(3, 0), (65, 1), (10, 2)]:
            assert codes[n, m] == 0 and torch.isnan(min_dist[n, m]), (n, m)
            assert torch.equal(q[n, m], raw[m, 0])
        _check_against_parts(
            backend, x, unit, raw, "dot", stats_x, out, "stats_x" if stats_x is not None else ""
        )
        assert torch.isfinite(out[4]).all() and torch.isfinite(out[5]).all()


def test_empty_n(backend):
    M, K, Ds = 3, 5, 4
    x, cb = backend.to(torch.randn(0, M, Ds)), backend.to(torch.randn(M, K, Ds))
    for stats_x, width in ((None, 0), (x, Ds)):
        codes, min_dist, q, sq_err, counts, sums = equss.pq_assign_gather(x, cb, stats_x=stats_x)
        assert codes.shape == (0, M) and codes.dtype == torch.int32
        assert min_dist.shape == sq_err.shape == (0, M) and q.shape == (0, M, Ds)
        assert torch.equal(counts.cpu(), torch.zeros(M, K)) and torch.equal(
            sums.cpu(), torch.zeros(M, K, width)
        )


def test_mixed_dtypes_promote(backend):
    """x, codebooks and codebooks_out are promoted to one dtype, as if the caller had cast them."""
    x, unit, raw, _ = _inputs((40, 2, 9, 6), torch.float32, seed=9)
    mixed = equss.pq_assign_gather(
        backend.to(x, torch.bfloat16), backend.to(unit, torch.float16), codebooks_out=backend.to(raw)
    )
    cast = equss.pq_assign_gather(
        backend.to(x.bfloat16().float()), backend.to(unit.half().float()), codebooks_out=backend.to(raw)
    )
    assert mixed[2].dtype == torch.float32
    for a, b in zip(mixed, cast):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_wrt_codebooks_out_equals_gather(backend, dtype):
    """quantized is differentiable w.r.t. codebooks_out only, with exactly pq_gather's gradient."""
    x, unit, raw, _ = _inputs((131, 3, 100, 7), dtype, seed=10)
    grad = backend.to(torch.randn(131, 3, 7, generator=gen(11)), dtype)
    cb_out = backend.to(raw).requires_grad_(True)
    cb = backend.to(unit).requires_grad_(True)
    xs = backend.to(x).requires_grad_(True)
    codes, min_dist, q, sq_err, counts, sums = equss.pq_assign_gather(xs, cb, codebooks_out=cb_out)
    assert q.requires_grad and not any(t.requires_grad for t in (codes, min_dist, sq_err, counts, sums))
    q.backward(grad)
    assert xs.grad is None and cb.grad is None
    cb_gather = backend.to(raw).requires_grad_(True)
    equss.pq_gather(codes, cb_gather).backward(grad)
    assert cb_out.grad.dtype == dtype
    if backend.deterministic:
        assert torch.equal(cb_out.grad, cb_gather.grad)
    else:  # CUDA segment sums add with atomics in a varying order: both are within the fp32 sum bound
        torch.testing.assert_close(cb_out.grad, cb_gather.grad)


# -------------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("with_stats", [False, True], ids=["counts-only", "stats_x"])
def test_opcheck(backend, with_stats):
    x = backend.to(torch.randn(19, 3, 5, generator=gen(40)))
    cb = backend.to(torch.randn(3, 7, 5, generator=gen(41)))
    cb_out = backend.to(torch.randn(3, 7, 5, generator=gen(42)))
    stats_x = x * 2 if with_stats else None
    op = torch.ops.equss.pq_assign_gather
    result = torch.library.opcheck(op, (x, cb, cb_out, "l2", stats_x))
    assert set(result.values()) == {"SUCCESS"}, result
    # With a differentiable codebooks_out. (opcheck's AOT test sums every output into one scalar, which
    # fails for an op whose first output is integer, so it runs without requires_grad above.)
    result = torch.library.opcheck(
        op,
        (x, cb, cb_out.clone().requires_grad_(True), "l2", stats_x),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    assert set(result.values()) == {"SUCCESS"}, result


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    x, cb = torch.randn(4, 2, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"codebooks_out \(2, 6, 8\) must match codebooks \(2, 5, 8\)"):
        equss.pq_assign_gather(x, cb, codebooks_out=torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="metric"):
        equss.pq_assign_gather(x, cb, "cosine")
    with pytest.raises(ValueError, match=r"stats_x \(4, 2, 7\) must have the shape of x \(4, 2, 8\)"):
        equss.pq_assign_gather(x, cb, stats_x=torch.randn(4, 2, 7))
    with pytest.raises(TypeError, match="stats_x must be float16, bfloat16, float32 or float64"):
        equss.pq_assign_gather(x, cb, stats_x=torch.zeros(4, 2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(4, 2, 8\).*\(3, 5, 8\)"):
        equss.pq_assign_gather(x, torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="one device"):
        equss.pq_assign_gather(x, cb, codebooks_out=cb.to("meta"))
    with pytest.raises(ValueError, match="one device"):
        equss.pq_assign_gather(x, cb, stats_x=x.to("meta"))

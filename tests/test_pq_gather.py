"""Contract tests of ``equss.pq_gather`` and its backward (``equss::pq_gather_backward``) on every backend.

Forward: ``out[n, m] = codebooks[m, codes[n, m]]``, a bit-exact copy in every dtype; a code outside
``[0, K)`` (only with ``check_range=False``) gives a zero vector. Backward: the scatter-add of the output
gradient by code into ``[M, K, Ds]``, accumulated in fp32 (float64 for float64 gradients), where
out-of-range codes add nothing (``equss/ops/reference.py``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ALL_FLOAT_DTYPES,
    CODE_DTYPES,
    FLOAT_DTYPES,
    SEGMENT_EXTRA_ULPS,
    SHAPES,
    assert_segment_sum,
    gen,
    shape_id,
    sums64,
)

import equss
from equss.ops import reference as ref


def _expected(codes: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Straight indexing, subspace by subspace (independent of the reference's flat index_select)."""
    return torch.stack([cb[m][codes[:, m].long()] for m in range(cb.shape[0])], dim=1)


# -------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("code_dtype", CODE_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_bit_exact(backend, shape, dtype, code_dtype):
    N, M, K, Ds = shape
    cb = torch.randn(M, K, Ds, generator=gen(20)).to(dtype)
    codes = torch.randint(0, K, (N, M), generator=gen(21)).to(code_dtype)
    out = equss.pq_gather(backend.to(codes), backend.to(cb))
    assert out.dtype == dtype and out.shape == (N, M, Ds) and out.device.type == backend.device
    assert torch.equal(out.cpu(), _expected(codes, cb))


@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
def test_forward_copies_every_bit(backend, dtype):
    """A copy, not arithmetic: NaNs with payloads and either sign, ±0, ±inf and subnormals come out with
    the codebook's exact bit patterns (compared as integers)."""
    itype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
    M, K, Ds = 2, 6, 5
    bits = torch.randint(-(2**15), 2**15, (M, K, Ds), generator=gen(36)).to(itype)
    cb = bits.view(dtype).clone()
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0, tiny / 4, -tiny / 8])
    cb.view(-1)[: len(specials)] = specials.to(dtype)
    payload = torch.tensor(0x7F800001 if dtype == torch.float32 else (0x7C01 if dtype == torch.float16 else 0x7F81))
    if dtype == torch.float64:
        payload = torch.tensor(0x7FF0000000000001)
    cb.view(itype).view(-1)[7] = payload.to(itype)  # a signalling NaN (quiet bit clear): not canonicalised
    codes = torch.randint(0, K, (40, M), generator=gen(37))
    codes[: K, 0] = torch.arange(K)  # every codeword of subspace 0 at least once
    out = equss.pq_gather(backend.to(codes), backend.to(cb)).cpu()
    assert torch.equal(out.view(itype), _expected(codes, cb.view(itype)))


def test_non_contiguous(backend):
    cb = backend.to(torch.randn(6, 4, 3, generator=gen(28))).permute(1, 0, 2)  # [M=4, K=6, Ds=3] view
    codes = backend.to(torch.randint(0, 6, (4, 19), generator=gen(29))).t()
    assert not cb.is_contiguous() and not codes.is_contiguous()
    out = equss.pq_gather(codes, cb)
    assert torch.equal(out, equss.pq_gather(codes.contiguous(), cb.contiguous()))
    assert torch.equal(out.cpu(), _expected(codes.cpu(), cb.cpu()))


def test_empty_n(backend):
    out = equss.pq_gather(backend.to(torch.zeros(0, 4, dtype=torch.int32)), backend.to(torch.randn(4, 5, 3)))
    assert out.shape == (0, 4, 3) and out.dtype == torch.float32


@pytest.mark.parametrize("code_dtype", CODE_DTYPES, ids=str)
def test_out_of_range_codes_gather_zeros_and_no_gradient(backend, code_dtype):
    """With check_range=False, codes outside [0, K) read nothing: a zero vector, and no gradient."""
    cb = torch.randn(2, 5, 3, generator=gen(30))
    far = 70000 if code_dtype == torch.int32 else 2**40
    codes = torch.tensor(
        [[0, 4], [5, -1], [2, far], [-(2**31) if code_dtype == torch.int32 else -(2**40), 1]]
    )
    codes = codes.to(code_dtype)
    cb_t = backend.to(cb).requires_grad_(True)
    out = equss.pq_gather(backend.to(codes), cb_t, check_range=False)
    got = out.detach().cpu()
    assert torch.equal(got[0], torch.stack([cb[0, 0], cb[1, 4]]))
    assert torch.equal(got[1], torch.zeros(2, 3)) and torch.equal(got[2, 1], torch.zeros(3))
    assert torch.equal(got[2, 0], cb[0, 2]) and torch.equal(got[3, 0], torch.zeros(3))
    grad = torch.randn(4, 2, 3, generator=gen(31))
    out.backward(backend.to(grad))
    expected = torch.zeros(2, 5, 3)
    expected[0, 0], expected[1, 4], expected[0, 2], expected[1, 1] = (
        grad[0, 0],
        grad[0, 1],
        grad[2, 0],
        grad[3, 1],
    )
    assert torch.equal(cb_t.grad.cpu(), expected)  # one term per codeword: exact


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, Triton interpreter
def test_out_of_range_codes_take_no_part_in_the_gradient_sum(backend):
    """Not even a NaN/inf gradient at an out-of-range code reaches a codeword (0·NaN would be NaN)."""
    K = 70  # two 64-codeword tiles
    codes = torch.randint(0, K, (130, 2), generator=gen(34), dtype=torch.int32)
    grad = torch.randn(130, 2, 3, generator=gen(35))
    for n, value in [(3, float("nan")), (64, float("inf")), (100, -float("inf"))]:
        codes[n, 1] = K + n
        grad[n, 1] = value
    codes[7, 0], grad[7, 0] = -1, float("nan")
    got = torch.ops.equss.pq_gather_backward(backend.to(grad), backend.to(codes), K)
    assert torch.isfinite(got.cpu()).all()
    assert_segment_sum(got, grad, codes, K, extra_ulps=SEGMENT_EXTRA_ULPS[backend.name])


def test_bad_codes_error_messages():
    cb = torch.randn(4, 6, 3)
    with pytest.raises(IndexError, match=r"\[0, K=6\).*\[0, 6\]"):
        equss.pq_gather(torch.tensor([[0, 1, 2, 6]]), cb)
    with pytest.raises(IndexError, match=r"\[-1, 2\]"):
        equss.pq_gather(torch.tensor([[0, 1, 2, -1]]), cb)
    with pytest.raises(TypeError, match="int32 or int64"):
        equss.pq_gather(torch.zeros(2, 4), cb)
    with pytest.raises(ValueError, match=r"M=3.*M=4"):
        equss.pq_gather(torch.zeros(2, 3, dtype=torch.long), cb)
    with pytest.raises(ValueError, match=r"codes must be \[N, M\]"):
        equss.pq_gather(torch.zeros(2, 4, 1, dtype=torch.long), cb)
    with pytest.raises(ValueError, match="one device"):
        equss.pq_gather(torch.zeros(2, 4, dtype=torch.long), cb.to("meta"))


def test_range_check_off_cpu_is_a_device_assert():
    """Off eager CPU the range check must not sync or break graphs: it is a torch._assert_async, a no-op
    on meta tensors (equss.ops.validation.check_codes_range)."""
    cb = torch.randn(4, 6, 3, device="meta")
    out = equss.pq_gather(torch.full((2, 4), 99, dtype=torch.long, device="meta"), cb)
    assert out.shape == (2, 4, 3) and out.device.type == "meta"


# ------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_backward_matches_float64(backend, shape, dtype):
    N, M, K, Ds = shape
    cb = backend.to(torch.randn(M, K, Ds, generator=gen(22)), dtype).requires_grad_(True)
    # A skewed code distribution: a few codewords receive many rows (long sums), some none.
    codes = (torch.randint(0, K, (N, M), generator=gen(23)) % max(1, K // 3)).to(torch.int32)
    grad = torch.randn(N, M, Ds, generator=gen(24)).to(dtype)
    equss.pq_gather(backend.to(codes), cb).backward(backend.to(grad))
    assert cb.grad.dtype == dtype
    got = torch.ops.equss.pq_gather_backward(backend.to(grad), backend.to(codes), K)
    assert got.dtype == torch.float32 and got.shape == (M, K, Ds)
    # fp32 accumulation of the (exactly representable) gradients: helpers.segment_sum_bound.
    assert_segment_sum(got, grad, codes, K, extra_ulps=SEGMENT_EXTRA_ULPS[backend.name])
    if backend.deterministic:  # the autograd path runs the same op, then casts once to the codebook dtype
        assert torch.equal(cb.grad.cpu(), got.cpu().to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_half_within_twice_reference_error(backend, dtype):
    N, M, K, Ds = 301, 3, 7, 9
    cb = backend.to(torch.randn(M, K, Ds, generator=gen(25)), dtype).requires_grad_()
    codes = torch.randint(0, K, (N, M), generator=gen(26))
    grad_out = torch.randn(N, M, Ds, generator=gen(27)).to(dtype)
    equss.pq_gather(backend.to(codes), cb).backward(backend.to(grad_out))
    exact = sums64(grad_out, codes, K)
    ref_err = (ref.pq_gather_backward_ref(grad_out, codes, K).to(dtype).double() - exact).abs().max()
    err = (cb.grad.cpu().double() - exact).abs().max()
    # The fp32 sum is rounded once to the half dtype: at most the reference's rounding, plus fp32 noise.
    assert err <= 2 * ref_err + 1e-12, (err, ref_err)


def test_backward_float64(backend):
    """float64 gradients accumulate in float64 (so gradcheck is exact) and the gradient is float64."""
    N, M, K, Ds = 211, 3, 17, 5
    grad_out = torch.randn(N, M, Ds, generator=gen(12), dtype=torch.float64)
    codes = torch.randint(0, K, (N, M), generator=gen(13))
    got = torch.ops.equss.pq_gather_backward(backend.to(grad_out), backend.to(codes), K)
    assert got.dtype == torch.float64 and got.shape == (M, K, Ds)
    # float64 sums of ≤ N = 211 terms |g| ≲ 4: error ≤ 212·2⁻⁵³·Σ|g| < 1e-13.
    torch.testing.assert_close(got.cpu(), sums64(grad_out, codes, K), rtol=1e-12, atol=1e-12)


def test_gradcheck_float64(backend):
    # Small: the numerical Jacobian runs the op twice per codebook element.
    cb = backend.to(torch.randn(2, 3, 2, generator=gen(32), dtype=torch.float64)).requires_grad_(True)
    codes = backend.to(torch.randint(0, 3, (7, 2), generator=gen(33)))
    assert torch.autograd.gradcheck(lambda c: equss.pq_gather(codes, c), (cb,))


# -------------------------------------------------------------------------------------------- opcheck
def test_opcheck(backend):
    g = gen(40)
    N, M, K, Ds = 19, 3, 7, 5
    cb = backend.to(torch.randn(M, K, Ds, generator=g)).requires_grad_(True)
    codes = backend.to(torch.randint(0, K, (N, M), generator=g, dtype=torch.int32))
    grad = backend.to(torch.randn(N, M, Ds, generator=g))
    for op, args in [
        (torch.ops.equss.pq_gather, (codes, cb)),
        (torch.ops.equss.pq_gather_backward, (grad, codes, K)),
        (torch.ops.equss.pq_gather_backward, (grad, codes.long(), K)),
    ]:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)

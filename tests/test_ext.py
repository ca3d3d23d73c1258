"""Tests specific to the C++/CUDA op library ``equss._C`` (the "ext" backend).

The generic cross-backend checks live in ``tests/test_ops.py``; this file covers what only the extension
has: that a built library actually loads (no silent fallback to the reference), that it registers the
devices it claims, both CPU kernels (AVX2/FMA and the portable one, picked with ``EQUSS_CPU_KERNEL``) on
shapes that straddle its tiles (6-row micro-tiles, 16-codeword tiles, 192-row chunks, L1-sized K-blocks),
float64 inputs, int32/int64 codes, exact ties across lanes/tiles/blocks, NaN/inf rows, thread-count
independence, and the argument checks of the C++ ops themselves (bad codes must raise, never be read).

Ops are called as ``torch.ops.equss_C.*`` so the extension is tested directly, on the inputs it is
contracted to receive (contiguous, one float dtype).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from equss import backends
from equss.ops import reference as ref

EXT = backends.info("ext")
needs_ext = pytest.mark.skipif(not EXT.loaded, reason=f"ext backend not loaded: {EXT.detail}")

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
METRICS = ["l2", "dot"]
# N: 1, a prime below one 6-row micro-tile multiple, a prime above one 192-row chunk.
# K: 1, 3 and 17 (partial 16-codeword tiles), 257 (17 tiles: 3 L1 K-blocks when Ds = 33).
# Ds: 1, 5 and 33 (not multiples of any vector width).
ASSIGN_SHAPES = [(N, 2, K, Ds) for N, K, Ds in itertools.product([1, 13, 197], [1, 3, 17, 257], [1, 5, 33])]


def _cuda_usable() -> bool:
    return torch.cuda.is_available() and EXT.loaded and "cuda" in EXT.devices


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not _cuda_usable(), reason="no CUDA device or ext built without CUDA"),
        ],
    ),
]


def _ops():
    return torch.ops.equss_C


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cpu_kernels() -> list[str]:
    """The CPU kernels this machine can run: always the portable one, AVX2/FMA where the CPU has it."""
    kernels = ["scalar"]
    old = os.environ.get("EQUSS_CPU_KERNEL")
    os.environ["EQUSS_CPU_KERNEL"] = "avx2"
    try:
        _ops().pq_assign(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), "l2")
        kernels.append("avx2")
    except RuntimeError as exc:
        assert "lacks AVX2" in str(exc), exc
    finally:
        if old is None:
            del os.environ["EQUSS_CPU_KERNEL"]
        else:
            os.environ["EQUSS_CPU_KERNEL"] = old
    return kernels


def _kernels_for(device: str) -> list[str]:
    return _cpu_kernels() if device == "cpu" else ["auto"]


@pytest.fixture
def cpu_kernel(monkeypatch):
    """Run the body once per CPU kernel: ``for _ in cpu_kernel("cpu"): ...``."""

    def run(device: str):
        for name in _kernels_for(device):
            monkeypatch.setenv("EQUSS_CPU_KERNEL", name)
            yield name

    return run


def _dist64(x: torch.Tensor, codebooks: torch.Tensor, metric: str) -> torch.Tensor:
    """Brute-force float64 distances [N, M, K] from the definition (no expansion)."""
    x64, c64 = x.double().cpu(), codebooks.double().cpu()
    if metric == "l2":
        return ((x64.unsqueeze(2) - c64.unsqueeze(0)) ** 2).sum(-1)
    return -(x64.unsqueeze(2) * c64.unsqueeze(0)).sum(-1)


def _assert_optimal(x, codebooks, metric, codes, min_dist, label):
    """The chosen code's exact distance is the exact minimum up to the fp32 rounding of the expanded form
    (||x||², ||c||², 2x·c each carry ~Ds·6e-8 relative error), so near-ties cannot make this flaky."""
    d = _dist64(x, codebooks, metric)
    N, M, K = d.shape
    codes, min_dist = codes.cpu(), min_dist.cpu()
    assert codes.dtype == torch.int32 and codes.shape == (N, M), label
    assert min_dist.dtype == torch.float32 and min_dist.shape == (N, M), label
    assert int(codes.min()) >= 0 and int(codes.max()) < K, label
    chosen = d.gather(2, codes.long().unsqueeze(-1)).squeeze(-1)
    best = d.min(-1).values
    scale = (
        d.abs().amax(-1) + (x.double().cpu() ** 2).sum(-1) + (codebooks.double().cpu() ** 2).sum(-1).amax(-1)
    )
    tol = 1e-5 + 1e-5 * scale
    excess = chosen - best - tol
    assert torch.all(excess <= 0), (
        f"{label}: chosen code is not the nearest, worst excess {excess.max().item()}"
    )
    assert torch.all((min_dist.double() - best).abs() <= tol), (
        f"{label}: min_dist off by more than {tol.max()}"
    )


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
    for op in backends.OP_NAMES:
        name = f"equss_C::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == has_cuda, name


@needs_ext
def test_cpu_kernel_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("EQUSS_CPU_KERNEL", "avx512-please")
    with pytest.raises(RuntimeError, match="EQUSS_CPU_KERNEL must be auto, avx2 or scalar"):
        _ops().pq_assign(torch.zeros(2, 1, 3), torch.zeros(1, 4, 3), "l2")


# ------------------------------------------------------------------------------------------- assign
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", ASSIGN_SHAPES, ids=lambda s: "N{}M{}K{}Ds{}".format(*s))
def test_assign_matches_reference(cpu_kernel, shape, dtype, device):
    N, M, K, Ds = shape
    x = torch.randn(N, M, Ds, generator=_gen(1)).to(dtype)
    cb = torch.randn(M, K, Ds, generator=_gen(2)).to(dtype)
    for kernel in cpu_kernel(device):
        for metric in METRICS:
            codes, min_dist = _ops().pq_assign(x.to(device), cb.to(device), metric)
            label = f"{kernel}/{metric}"
            # Judged on the values the op received: the dtype-rounded inputs, as fp32 (the op's precision).
            _assert_optimal(x.float(), cb.float(), metric, codes, min_dist, label)
            _, ref_dist = ref.pq_assign_ref(x, cb, metric)
            torch.testing.assert_close(min_dist.cpu(), ref_dist, rtol=1e-5, atol=1e-4, msg=label)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_assign_equss_tile_shape_matches_reference_codes(cpu_kernel, device):
    """The EQUSS tile shape (Ds = 32, K = 256: two L1 K-blocks) on well-separated data: exact codes."""
    N, M, K, Ds = 389, 3, 256, 32
    g = _gen(3)
    cb = torch.randn(M, K, Ds, generator=g)
    truth = torch.randint(0, K, (N, M), generator=g)
    x = cb[torch.arange(M), truth] + 0.01 * torch.randn(N, M, Ds, generator=g)
    for kernel in cpu_kernel(device):
        codes, min_dist = _ops().pq_assign(x.to(device), cb.to(device), "l2")
        assert torch.equal(codes.cpu().long(), truth), kernel
        exact = ((x - cb[torch.arange(M), truth]) ** 2).sum(-1)
        torch.testing.assert_close(min_dist.cpu(), exact, rtol=1e-3, atol=2e-3, msg=kernel)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    "copies",
    [(2, 9, 21, 130, 256), (9, 16, 130), (200, 201, 256), (0, 255)],
    ids=[
        "lane2-vs-higher-lanes-tiles-blocks",
        "second-vector-lane1-vs-lane0-next-tile",
        "last-block",
        "first-and-last",
    ],
)
def test_assign_exact_ties_pick_lowest_index(cpu_kernel, copies, metric, device):
    """Bit-identical codewords at indices that fall in different lanes, vectors, tiles and K-blocks
    (K = 257, Ds = 33: 16-codeword tiles, 7 tiles per L1 block): the lowest index must win."""
    M, K, Ds, N = 2, 257, 33, 31
    g = _gen(4)
    target = torch.nn.functional.normalize(torch.randn(M, Ds, generator=g), dim=-1) * 3
    cb = torch.nn.functional.normalize(torch.randn(M, K, Ds, generator=g), dim=-1) * 3
    for k in copies:
        cb[:, k] = target
    x = target.unsqueeze(0) + 0.01 * torch.randn(N, M, Ds, generator=g)
    for kernel in cpu_kernel(device):
        codes, _ = _ops().pq_assign(x.to(device), cb.to(device), metric)
        assert torch.all(codes.cpu() == min(copies)), (kernel, codes)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_assign_all_equal_distances_give_code_zero(cpu_kernel, device):
    x = torch.randn(20, 3, 7, generator=_gen(5))
    for kernel in cpu_kernel(device):
        for metric in METRICS:
            codes, _ = _ops().pq_assign(x.to(device), torch.zeros(3, 40, 7, device=device), metric)
            assert torch.all(codes.cpu() == 0), (kernel, metric)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_assign_nan_inf_rows(cpu_kernel, dtype, device):
    """Rows holding NaN/inf keep an in-range code and a non-finite min_dist; other rows are untouched."""
    N, M, K, Ds = 23, 3, 37, 9
    x = torch.randn(N, M, Ds, generator=_gen(6))
    cb = torch.randn(M, K, Ds, generator=_gen(7))
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
    for kernel in cpu_kernel(device):
        for metric in METRICS:
            codes, min_dist = _ops().pq_assign(x.to(device), cb.to(device), metric)
            codes, min_dist = codes.cpu(), min_dist.cpu()
            label = f"{kernel}/{metric}"
            assert int(codes.min()) >= 0 and int(codes.max()) < K, label
            assert not torch.isfinite(min_dist[bad]).any(), (label, min_dist[bad])
            clean_codes, clean_dist = _ops().pq_assign(clean.to(device), cb.to(device), metric)
            assert torch.equal(codes[~bad], clean_codes.cpu()[~bad]), label
            assert torch.equal(min_dist[~bad], clean_dist.cpu()[~bad]), label


@needs_ext
def test_assign_independent_of_thread_count(cpu_kernel):
    """Rows never interact, so codes and min_dist are bit-identical for 1 and 2 threads."""
    x = torch.randn(401, 4, 32, generator=_gen(8))
    cb = torch.randn(4, 256, 32, generator=_gen(9))
    threads = torch.get_num_threads()
    try:
        for kernel in cpu_kernel("cpu"):
            torch.set_num_threads(1)
            one = _ops().pq_assign(x, cb, "l2")
            torch.set_num_threads(2)
            two = _ops().pq_assign(x, cb, "l2")
            assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]), kernel
    finally:
        torch.set_num_threads(threads)


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


# ------------------------------------------------------------------------------ gather and scatter-add
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gather_bit_exact(dtype, code_dtype, device):
    N, M, K, Ds = 53, 3, 17, 33
    cb = torch.randn(M, K, Ds, generator=_gen(10)).to(dtype)
    codes = torch.randint(0, K, (N, M), generator=_gen(11)).to(code_dtype)
    out = _ops().pq_gather(codes.to(device), cb.to(device)).cpu()
    assert out.dtype == dtype and torch.equal(out, ref.pq_gather_ref(codes, cb))


@needs_ext
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64], ids=str)
def test_bad_codes_raise_instead_of_reading_out_of_bounds(code_dtype):
    ops = _ops()
    cb, x = torch.randn(2, 5, 3), torch.randn(4, 2, 3)
    for bad in (5, -1, 2**31 - 1 if code_dtype == torch.int32 else 2**40):
        codes = torch.zeros(4, 2, dtype=code_dtype)
        codes[3, 1] = bad
        with pytest.raises(RuntimeError, match=r"outside \[0, K=5\)"):
            ops.pq_gather(codes, cb)
        with pytest.raises(RuntimeError, match=r"outside \[0, K=5\)"):
            ops.pq_gather_backward(x, codes, 5)
        with pytest.raises(RuntimeError, match=r"outside \[0, K=5\)"):
            ops.pq_cluster_stats(x, codes, 5)


def _sums64(src: torch.Tensor, codes: torch.Tensor, K: int) -> torch.Tensor:
    """Exact per-codeword sums in float64 (one_hot matmul, independent of the op's scatter-add)."""
    N, M, Ds = src.shape
    onehot = torch.nn.functional.one_hot(codes.long(), K).double()  # [N, M, K]
    return torch.einsum("nmk,nmd->mkd", onehot, src.double())


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gather_backward(dtype, code_dtype, device):
    N, M, K, Ds = 211, 3, 17, 5
    grad_out = torch.randn(N, M, Ds, generator=_gen(12)).to(dtype)
    codes = torch.randint(0, K, (N, M), generator=_gen(13)).to(code_dtype)
    grad = _ops().pq_gather_backward(grad_out.to(device), codes.to(device), K).cpu()
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert grad.dtype == expected_dtype and grad.shape == (M, K, Ds)
    exact = _sums64(grad_out, codes, K)
    if dtype == torch.float64:
        torch.testing.assert_close(grad, exact, rtol=1e-12, atol=1e-12)
    else:
        # fp32 sums of <= N terms |g| <= ~5: error <= N·6e-8·5 ≈ 6e-5.
        torch.testing.assert_close(grad.double(), exact, rtol=1e-5, atol=1e-4)


@needs_ext
def test_scatter_add_is_deterministic_across_thread_counts():
    """CPU sums are owned per (subspace, Ds slice) and added in row order: bit-identical for any thread
    count, also when M < threads splits Ds."""
    N, K = 3001, 7
    threads = torch.get_num_threads()
    try:
        for M, Ds in [(1, 9), (5, 4)]:
            x = torch.randn(N, M, Ds, generator=_gen(14)) * 100
            codes = torch.randint(0, K, (N, M), generator=_gen(15), dtype=torch.int32)
            results = []
            for t in (1, 2):
                torch.set_num_threads(t)
                results.append(
                    (_ops().pq_gather_backward(x, codes, K), *_ops().pq_cluster_stats(x, codes, K))
                )
            for a, b in zip(*results):
                assert torch.equal(a, b), (M, Ds)
    finally:
        torch.set_num_threads(threads)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("code_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cluster_stats(dtype, code_dtype, device):
    N, M, K, Ds = 199, 4, 13, 6
    x = torch.randn(N, M, Ds, generator=_gen(16)).to(dtype)
    codes = torch.randint(0, K, (N, M), generator=_gen(17)).to(code_dtype)
    codes[:, 2] = 4  # one subspace uses a single code
    counts, sums = _ops().pq_cluster_stats(x.to(device), codes.to(device), K)
    counts, sums = counts.cpu(), sums.cpu()
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    exact_counts = torch.nn.functional.one_hot(codes.long(), K).sum(0).double()  # [M, K]
    assert torch.equal(counts.double(), exact_counts)
    # Each element is rounded to fp32 before it is added (x.float() in the reference).
    torch.testing.assert_close(sums.double(), _sums64(x.float(), codes, K), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- EMA
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codebook_dtype", FLOAT_DTYPES, ids=str)
def test_ema_apply_matches_reference(codebook_dtype, device):
    M, K, Ds = 3, 37, 5
    g = _gen(18)
    counts = torch.randint(0, 9, (M, K), generator=g).float()
    sums = torch.randn(M, K, Ds, generator=g) * 3
    cluster_size = torch.rand(M, K, generator=g) * 4
    embed_sum = torch.randn(M, K, Ds, generator=g)
    codebooks = torch.randn(M, K, Ds, generator=g).to(codebook_dtype)
    # Subspace 1 never had anything assigned: n_tot = 0 there, its codebook must stay as it was.
    counts[1], sums[1], cluster_size[1], embed_sum[1] = 0, 0, 0, 0
    expected = [t.clone() for t in (cluster_size, embed_sum, codebooks)]
    ref.pq_ema_apply_ref_(counts, sums, *expected, 0.9, 1e-3)
    got = [t.clone().to(device) for t in (cluster_size, embed_sum, codebooks)]
    _ops().pq_ema_apply_(counts.to(device), sums.to(device), *got, 0.9, 1e-3)
    got = [t.cpu() for t in got]
    # cluster_size and embed_sum: the same fp32 fma per element as torch's add_(alpha=...).
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-6)
    assert got[2].dtype == codebook_dtype
    assert torch.equal(got[2][1], codebooks[1]), "codebook of a never-used subspace changed"
    # n_tot is summed in a different order than torch.sum: a few fp32 ulps, then rounded to the dtype.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(codebook_dtype, 1e-5)
    torch.testing.assert_close(got[2].double(), expected[2].double(), rtol=tol, atol=tol)


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

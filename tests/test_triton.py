"""Tests specific to the Triton backend (``equss.kernels``); the op contracts run on it in ``tests/test_pq_*.py``.

Without a GPU the root conftest sets ``TRITON_INTERPRET=1`` before triton is imported, so these tests
run the real kernels on CPU tensors in Triton's interpreter; with a GPU they run on CUDA. Covered here:
the launchers only ever pick configurations from their module's ``CONFIGS`` (what
``tests/test_triton_compile.py`` compiles ahead of time), the matmul precision choice
(``EQUSS_TRITON_PRECISION``), float64 inputs running as float32, the Triton segment sum's own error
bound (each term added once in fp32, scatter and sorted kernels), its deterministic mode
(``EQUSS_DETERMINISTIC``, ``torch.use_deterministic_algorithms``) and its independence of the grid, the
grid-stride invariant of the scatter and gather launchers, the exact default assign's tensor-core pass and
its FMA recheck (ties and TF32-level near-ties, the error bound that decides which rows are rechecked, a
test hook that disables the recheck), the fused op's in-kernel statistics and int64 offsets past 2³¹
elements (CUDA only).
"""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'equss[triton]')")

import equss.kernels as kernels  # noqa: E402
from equss.kernels import _config as KC  # noqa: E402
from helpers import (  # noqa: E402
    SEGMENT_EXTRA_ULPS,
    assert_assign_contract,
    assert_segment_sum,
    counts64,
    dist64,
    gen,
    unambiguous_rows,
    valid_vectors,
)

import equss  # noqa: E402
from equss.backends import impl_name, triton_interpreted  # noqa: E402
from equss.ops import reference as R  # noqa: E402

pq_assign_mod = importlib.import_module("equss.kernels.pq_assign")
pq_gather_mod = importlib.import_module("equss.kernels.pq_gather")
pq_segment_sum_mod = importlib.import_module("equss.kernels.pq_segment_sum")
pq_cluster_stats_mod = importlib.import_module("equss.kernels.pq_cluster_stats")
pq_ema_mod = importlib.import_module("equss.kernels.pq_ema_apply")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        DEVICE == "cpu" and not triton_interpreted(),
        reason="no CUDA device and TRITON_INTERPRET is not 1 (the root conftest sets it when triton is imported after it)",
    ),
]


def _to(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.to(device=DEVICE, dtype=dtype if dtype is not None else t.dtype)


@pytest.fixture
def picked(monkeypatch):
    """Record every configuration the launchers pick (a spy on each module's ``pick_config``)."""
    seen: dict[str, list] = {"pq_assign": [], "pq_gather": [], "pq_segment_sum": [], "pq_ema_apply": []}
    for name, mod, attr in [
        ("pq_assign", pq_assign_mod, "pick_config"),
        ("pq_gather", pq_gather_mod, "pick_config"),
        ("pq_segment_sum", pq_segment_sum_mod, "pick_config"),
        ("pq_ema_apply", pq_ema_mod, "pick_configs"),
    ]:
        original = getattr(mod, attr)

        def spy(*args, _original=original, _name=name, **kwargs):
            cfg = _original(*args, **kwargs)
            seen[_name].extend(cfg if isinstance(cfg, tuple) else [cfg])
            return cfg

        monkeypatch.setattr(mod, attr, spy)
    return seen


# --------------------------------------------------------------------------------------------- configs
def test_pick_config_only_returns_precompiled_configs():
    """Every configuration a launcher can choose is in its module's CONFIGS (what the compile test builds)."""
    compiled = {
        cfg
        for name in kernels.KERNEL_MODULES
        for cfg in importlib.import_module(f"equss.kernels.{name}").CONFIGS
    }
    for Ds in list(range(1, 70)) + [128, 200, 1024]:
        for dtype in KC.KERNEL_DTYPES:
            for precision in KC.PRECISIONS:
                for fused in (False, True):
                    assert pq_assign_mod.pick_config(dtype, Ds, precision, fused) in pq_assign_mod.CONFIGS
                    for K, metric, arch in itertools.product(
                        (1, 5, 63, 64, 65, 100, 256, 257, 512, 1000, 1024, 1025, 4096), ("l2", "dot"), (80, 86, 90, 100)
                    ):
                        cfg = pq_assign_mod.pick_config(dtype, Ds, precision, fused, K=K, metric=metric, arch=arch)
                        assert cfg in pq_assign_mod.CONFIGS, cfg
                        # an architecture-specific config only where it was compiled (sm_86 runs sm_80's)
                        assert cfg.arch in (0, 90 if arch >= 90 else 80), (arch, cfg)
                        if cfg.kernel == "tc":  # the resident kernel holds every codeword
                            assert K <= cfg.NG * cfg.BLOCK_K and Ds <= cfg.BLOCK_D
            assert pq_segment_sum_mod.pick_config(dtype, Ds) in pq_segment_sum_mod.CONFIGS
            # pq_cluster_stats runs the segment-sum kernel: its CONFIGS are that module's.
            assert pq_segment_sum_mod.pick_config(dtype, Ds) in pq_cluster_stats_mod.CONFIGS
        for dtype in KC.KERNEL_DTYPES + (torch.float64,):
            assert pq_gather_mod.pick_config(dtype, Ds) in pq_gather_mod.CONFIGS
    for dtype in KC.KERNEL_DTYPES + (torch.float64,):
        assert set(pq_ema_mod.pick_configs(dtype)) <= set(pq_ema_mod.CONFIGS)
    for mod in (pq_assign_mod, pq_gather_mod, pq_segment_sum_mod, pq_ema_mod):
        assert set(mod.CONFIGS) <= compiled, mod.__name__


def test_launchers_use_pick_config(picked):
    """Running every op through the backend goes through pick_config(s), and only picks CONFIGS members."""
    x = _to(torch.randn(70, 2, 40, generator=gen(1)))  # Ds > 32: the Ds-loop variants
    cb = _to(torch.randn(2, 9, 40, generator=gen(2)))
    with equss.use_backend("triton"):
        codes, _ = equss.pq_assign(x.half(), cb.half())
        equss.pq_assign_gather(x, cb, "dot", stats_x=x)
        cbg = cb.clone().requires_grad_(True)
        equss.pq_gather(codes, cbg).sum().backward()
        counts, sums = equss.pq_cluster_stats(x.bfloat16(), codes, 9)
        equss.pq_ema_apply_(
            counts, sums, _to(torch.zeros(2, 9)), _to(torch.zeros(2, 9, 40)), cb.clone().double()
        )
    modules = {
        "pq_assign": pq_assign_mod,
        "pq_gather": pq_gather_mod,
        "pq_segment_sum": pq_segment_sum_mod,
        "pq_ema_apply": pq_ema_mod,
    }
    for name, cfgs in picked.items():
        assert cfgs, f"{name}: the launcher did not call its pick_config"
        for cfg in cfgs:
            assert cfg in modules[name].CONFIGS, (name, cfg)
    # Ds = 40 > 32: the streaming kernel (fp16 native; fp32 exact runs as ieee there).
    assert {(c.kernel, c.dtype, c.precision, c.D_LOOP) for c in picked["pq_assign"]} == {
        ("generic", torch.float16, "native", True),
        ("generic", torch.float32, "ieee", True),
    }
    # The fused op adds its statistics in its own epilogue (no segment sum); the gather backward (fp32
    # gradients) and pq_cluster_stats (bf16) still run the segment-sum kernel.
    assert {c.dtype for c in picked["pq_segment_sum"]} == {torch.float32, torch.bfloat16}
    assert {c.dtype for c in picked["pq_ema_apply"]} == {torch.float32, torch.float64}


def test_kernels_export_one_launcher_per_op():
    for op in equss.backends.OP_NAMES:
        name = impl_name(op, "triton")
        assert name in kernels.__all__ and callable(getattr(kernels, name)), name
    with equss.use_backend("triton"):
        assert equss.backends.select(DEVICE) == "triton"
        ns = equss.backends.get_backend(DEVICE)
    for op in equss.backends.OP_NAMES:
        assert getattr(ns, op) is getattr(kernels, impl_name(op, "triton")), op


# ------------------------------------------------------------------------------------------- precision
def test_precision_from_env(monkeypatch, picked):
    x = _to(torch.randn(40, 2, 16, generator=gen(8)))
    cb = _to(torch.randn(2, 20, 16, generator=gen(9)))
    monkeypatch.delenv(KC.PRECISION_ENV, raising=False)
    with equss.use_backend("triton"):
        equss.pq_assign(x, cb)
        assert picked["pq_assign"][-1].precision == KC.DEFAULT_PRECISION == "exact"
        assert picked["pq_assign"][-1].kernel == "tc"  # the default runs on tensor cores (Ds = 16, K = 20)
        for precision in KC.PRECISIONS:
            monkeypatch.setenv(KC.PRECISION_ENV, precision)
            codes, *_ = equss.pq_assign(x, cb, "l2")
            assert picked["pq_assign"][-1].precision == precision
            assert picked["pq_assign"][-1].kernel == ("tc" if precision == "exact" else "generic")
            assert int(codes.min()) >= 0 and int(codes.max()) < 20
            codes, *_ = equss.pq_assign_gather(x, cb, "l2")  # the fused op: precision from the env only
            assert picked["pq_assign"][-1].precision == precision
            assert int(codes.min()) >= 0 and int(codes.max()) < 20
            equss.pq_assign(x.half(), cb.half())  # half precision always uses the native products
            assert picked["pq_assign"][-1].precision == "native"
            equss.pq_assign(x.bfloat16(), cb.bfloat16())
            assert picked["pq_assign"][-1].precision == "native" and picked["pq_assign"][-1].kernel == "tc"
        monkeypatch.setenv(KC.PRECISION_ENV, "bogus")
        with pytest.raises(ValueError, match="EQUSS_TRITON_PRECISION='bogus'"):
            equss.pq_assign(x, cb, "l2")
        with pytest.raises(ValueError, match="EQUSS_TRITON_PRECISION='bogus'"):
            equss.pq_assign_gather(x, cb, "l2")
    with pytest.raises(ValueError, match="precision argument='fp8'"):
        KC.resolve_precision("fp8")


# ----------------------------------------------------------------------------------------------- float64
def test_float64_runs_as_float32(picked):
    x = torch.randn(50, 2, 6, generator=gen(22), dtype=torch.float64)
    cb = torch.randn(2, 9, 6, generator=gen(23), dtype=torch.float64)
    with equss.use_backend("triton"):
        codes, dist = equss.pq_assign(_to(x), _to(cb))
        codes_g, dist_g, q, sq_err, *_ = equss.pq_assign_gather(_to(x), _to(cb))
    assert picked["pq_assign"] and all(c.dtype == torch.float32 for c in picked["pq_assign"])
    ref_codes, ref_dist = R.pq_assign_ref(x, cb)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(codes_g.cpu(), ref_codes)
    # Both are fp32 distances of Ds = 6 terms of magnitude ≲ 40: within ~2·(Ds + 4)·U·40 ≈ 5e-5 of each other.
    assert math.isclose(float((dist.cpu() - ref_dist).abs().max()), 0.0, abs_tol=1e-4)
    assert torch.equal(dist_g, dist)
    # The float64 codewords themselves are gathered bit-exactly.
    assert q.dtype == torch.float64 and torch.equal(q.cpu(), R.pq_gather_ref(ref_codes, cb))


# ------------------------------------------------------------------------------- segment-sum error bound
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_segment_sum_split_fp32_bound(dtype):
    """The launcher directly (the name is historical: the kernel used to split fp32 values into bfloat16
    pieces; it now adds each value once, in fp32, by atomics, so the (n + 1 + 8)·U bound of
    helpers.SEGMENT_EXTRA_ULPS holds with room to spare: test_segment_sum_adds_each_term_once checks
    (n + 1)·U). Values over 2^±12 of dynamic range and a skewed code distribution (long sums); counts
    are exact; float64 is summed as its fp32 rounding."""
    N, M, K, Ds = 300, 2, 70, 45
    g = gen(30)
    v = torch.randn(N, M, Ds, generator=g) * torch.exp2(
        torch.randint(-12, 13, (N, M, Ds), generator=g).float()
    )
    if dtype == torch.float16:
        v = v.clamp(-6e4, 6e4)
    v = v.to(dtype)
    codes = (torch.randint(0, K, (N, M), generator=g) % 9).to(torch.int32)
    codes[5, 0] = -1  # matches no codeword
    sums, counts = pq_segment_sum_mod.segment_sum_triton(_to(v), _to(codes), K, with_counts=True)
    assert sums.dtype == counts.dtype == torch.float32 and sums.shape == (M, K, Ds)
    assert torch.equal(counts.cpu().double(), counts64(codes, K))
    assert_segment_sum(sums, v.float(), codes, K, extra_ulps=SEGMENT_EXTRA_ULPS["triton"])
    sums_only, none = pq_segment_sum_mod.segment_sum_triton(_to(v), _to(codes), K, with_counts=False)
    assert none is None
    if DEVICE == "cpu":  # the interpreter runs the programs one after another: a fixed order
        assert torch.equal(sums_only, sums)
    else:  # GPU atomics land in a varying order
        assert_segment_sum(sums_only, v.float(), codes, K, extra_ulps=SEGMENT_EXTRA_ULPS["triton"])


def _wide_values(shape, dtype, seed):
    """Values over 2^±12 of dynamic range (so the summation order shows in the last bits)."""
    g = gen(seed)
    v = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-12, 13, shape, generator=g).float())
    return v.clamp(-6e4, 6e4).to(dtype)


# (N, M, K, Ds): Ds = 32 (the compile-time-stride variant), Ds = 45 (two column chunks), M = 3 (the grid
# stride must be a multiple of M; with 4 interpreter "SMs" 1500·3 rows need several tiles per program).
SCATTER_SHAPES = [(300, 2, 70, 32), (97, 3, 9, 45), (1500, 3, 5, 32), (211, 5, 17, 7)]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, Triton interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("deterministic", [False, True], ids=["scatter", "sorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SCATTER_SHAPES, ids=lambda s: "N{}M{}K{}Ds{}".format(*s))
def test_segment_sum_adds_each_term_once(shape, dtype, deterministic):
    """Both kernels add every value once, in fp32, in some order: an element summing n terms is within
    γ_n·Σ|terms| ≤ (n + 1)·U·Σ|terms| of the exact float64 sum (helpers module docstring), with no
    extra representation error (extra_ulps=0; the fp16/bf16 values are exact in fp32). Counts are exact.
    Statistics mode skips invalid rows (NaN, ±inf, an fp32 ‖v‖² that overflows) inside the kernel and no
    NaN reaches a sum; gradient mode adds every row with an in-range code, and codes outside [0, K)
    (negative, K, 2^31 - 1) add nothing in either."""
    N, M, K, Ds = shape
    v = _wide_values((N, M, Ds), dtype, seed=50)
    codes = (torch.randint(0, K, (N, M), generator=gen(51)) % max(1, K - 2)).to(torch.int32)
    codes[3, 0], codes[4, M - 1], codes[N - 1, 1] = -1, K, 2**31 - 1
    v_stats = v.clone()
    v_stats[1, 0, Ds - 1] = float("nan")
    v_stats[2, 1, 0] = float("inf")
    # Finite, but its fp32 squared norm overflows (fp16 cannot hold 1e20: there it is -inf).
    v_stats[N - 2, M - 1, 0] = -float("inf") if dtype == torch.float16 else 1e20
    keep = valid_vectors(v_stats)
    assert int((~keep).sum()) == 3
    sums, counts = pq_segment_sum_mod.segment_sum_triton(
        _to(v_stats), _to(codes), K, with_counts=True, deterministic=deterministic
    )
    assert torch.isfinite(sums.cpu()).all()
    assert torch.equal(counts.cpu().double(), counts64(codes, K, keep))
    assert_segment_sum(sums, v_stats.float(), codes, K, keep, extra_ulps=0, label="stats")
    grad = pq_gather_mod.pq_gather_backward_triton(_to(v), _to(codes), K) if not deterministic else None
    if grad is None:
        grad, none = pq_segment_sum_mod.segment_sum_triton(_to(v), _to(codes), K, with_counts=False, deterministic=True)
        assert none is None
    assert grad.dtype == torch.float32
    assert_segment_sum(grad, v.float(), codes, K, extra_ulps=0, label="grad")


@pytest.mark.slow
def test_segment_sum_sorted_is_independent_of_the_grid(monkeypatch):
    """The sorted (deterministic) kernel gives bit-identical sums whatever the GPU size, while the scatter's
    result moves with the row split (checked on the same data, so the comparison has power). Under the
    interpreter programs run one after another, so the "GPU size" is the number of programs the launchers
    size their grids for (_config._INTERPRETER_SMS)."""
    N, M, K, Ds = 700, 3, 4, 32
    v = _to(_wide_values((N, M, Ds), torch.float32, seed=52))
    codes = _to(torch.randint(0, K, (N, M), generator=gen(53), dtype=torch.int32))
    g64 = _to(_wide_values((N, M, Ds), torch.float32, seed=54).double())
    runs = {}
    for sms in (1, 7):
        monkeypatch.setattr(KC, "_INTERPRETER_SMS", sms)
        runs[sms] = [
            pq_segment_sum_mod.segment_sum_triton(v, codes, K, with_counts=True, deterministic=d) for d in (False, True)
        ] + [pq_gather_mod.pq_gather_backward_triton(g64, codes, K)]
    (scatter1, sorted1, f64_1), (scatter7, sorted7, f64_7) = runs[1], runs[7]
    assert torch.equal(sorted1[0], sorted7[0]) and torch.equal(sorted1[1], sorted7[1])
    assert torch.equal(f64_1, f64_7) and f64_1.dtype == torch.float64  # float64 gradients: always sorted
    if DEVICE == "cpu":  # a fixed but different order of the atomics (on a GPU the order varies anyway)
        assert not torch.equal(scatter1[0], scatter7[0]), "the row split did not change the summation order"
    assert torch.equal(scatter1[1], scatter7[1]) and torch.equal(scatter1[1], sorted1[1])  # counts: exact


def test_deterministic_mode_selection(monkeypatch, picked):
    """deterministic= argument > $EQUSS_DETERMINISTIC > torch.use_deterministic_algorithms; the launchers
    then pick the sorted configurations (members of CONFIGS)."""
    resolve = pq_segment_sum_mod.resolve_deterministic
    env = pq_segment_sum_mod.DETERMINISTIC_ENV
    monkeypatch.delenv(env, raising=False)
    assert resolve(None) is torch.are_deterministic_algorithms_enabled() is False
    monkeypatch.setenv(env, "1")
    assert resolve(None) is True and resolve(False) is False
    monkeypatch.setenv(env, "bogus")
    with pytest.raises(ValueError, match="EQUSS_DETERMINISTIC='bogus'"):
        resolve(None)
    x = _to(torch.randn(40, 2, 32, generator=gen(55)))
    codes = _to(torch.randint(0, 6, (40, 2), generator=gen(56)))
    monkeypatch.setenv(env, "1")
    with equss.use_backend("triton"):
        equss.pq_cluster_stats(x, codes, 6)
        assert picked["pq_segment_sum"][-1].sorted and picked["pq_segment_sum"][-1].stats
        monkeypatch.setenv(env, "0")
        equss.pq_cluster_stats(x, codes, 6)
        assert not picked["pq_segment_sum"][-1].sorted
        monkeypatch.delenv(env)
        torch.use_deterministic_algorithms(True)
        try:
            torch.ops.equss.pq_gather_backward(x, codes, 6)
        finally:
            torch.use_deterministic_algorithms(False)
        assert picked["pq_segment_sum"][-1].sorted and not picked["pq_segment_sum"][-1].stats
    for cfg in picked["pq_segment_sum"]:
        assert cfg in pq_segment_sum_mod.CONFIGS
    for dtype in KC.KERNEL_DTYPES + (torch.float64,):
        for stats in (False, True):
            for det in (False, True):
                for Ds in (1, 7, 32, 33, 200):
                    assert pq_segment_sum_mod.pick_config(dtype, Ds, stats, det) in pq_segment_sum_mod.CONFIGS


def test_row_tile_programs_keep_each_row_lane_in_one_subspace():
    """The scatter and gather compute a row lane's subspace once per program: the grid stride
    (programs·BLOCK_R rows) must be a multiple of M unless every program has a single tile."""
    for M in (1, 2, 3, 5, 7, 32, 48, 64, 96, 1009, 70000):
        for block_r in (32, 64):
            for n_tiles in (1, 5, 63, 64, 1000, 10**6):
                for target in (1, 32, 1056):
                    p = pq_segment_sum_mod.row_tile_programs(n_tiles, block_r, M, target)
                    assert 1 <= p <= n_tiles
                    assert p == n_tiles or (p * block_r) % M == 0, (M, block_r, n_tiles, target, p)
                    if p < n_tiles and M // math.gcd(M, block_r) <= target:
                        assert p <= target  # never more programs than can be resident


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1500, 3, 5, 32), (211, 5, 17, 7), (90, 7, 3, 40)], ids=str)
def test_gather_several_tiles_per_program(shape, dtype):
    """Shapes whose rows need several grid-stride tiles per program, with M not dividing BLOCK_R: the
    gather stays a bit-exact copy (and out-of-range codes give zeros)."""
    N, M, K, Ds = shape
    cb = torch.randn(M, K, Ds, generator=gen(57)).to(dtype)
    codes = torch.randint(0, K, (N, M), generator=gen(58), dtype=torch.int32)
    codes[5, M - 1], codes[N - 1, 0] = -1, K
    out = pq_gather_mod.pq_gather_triton(_to(codes), _to(cb)).cpu()
    assert torch.equal(out, R.pq_gather_ref(codes, cb))


# ------------------------------------------------------------------------------------ int64 offsets
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
    exact, clear = unambiguous_rows(x[tail].float().cpu(), cb.float().cpu(), "l2")
    assert torch.equal(codes[tail].cpu().long()[clear], exact[clear])
    assert torch.equal(q[tail], R.pq_gather_ref(codes[tail], cb))
    assert torch.equal(counts.sum(1), torch.full((M,), float(N), device=DEVICE))
    ref_counts, ref_sums = R.pq_cluster_stats_ref(x, codes, K)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-4, atol=1e-2)  # ~10^5-term sums, order differs


# ------------------------------------------------------- the exact default: tensor cores + FMA recheck
def _assign_debug(x, cb, metric, precision="exact", recheck=True):
    """The assign launcher with its test hook: ``(codes, min_dist, flagged-row count, config)``."""
    dbg = {"recheck": recheck}
    codes, min_dist, *_ = pq_assign_mod._launch(_to(x), _to(cb), metric, precision, _debug=dbg)
    return codes.cpu(), min_dist.cpu(), dbg["flagged"], dbg["config"]


@pytest.fixture(params=[90, 80], ids=lambda a: f"sm{a}")
def tc_arch(request, monkeypatch):
    """Run the test with the tensor-core classes of sm_90 and of sm_80 (the interpreter picks as on that GPU)."""
    monkeypatch.setattr(KC, "_INTERPRETER_ARCH", request.param)
    return request.param


@pytest.mark.parametrize("metric", ["dot", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tensor_core_ties_are_rechecked_to_the_lowest_index(metric, dtype, tc_arch):
    """Bit-identical codewords 5 and 13 share a packed-key position (a = 0 and 1 of the 8-wide thread-local
    axis), so the tensor-core pass alone, comparing packed keys of a negative distance, keeps 13; every
    row must be flagged, and the FMA recheck must return 5 (the lowest index), like the reference."""
    N, M, K, Ds = 40, 2, 64, 32
    g = gen(5)
    cb = torch.nn.functional.normalize(torch.randn(M, K, Ds, generator=g), dim=-1)
    cb[:, 13] = cb[:, 5]
    x = torch.nn.functional.normalize(cb[:, 5].unsqueeze(0) + 0.02 * torch.randn(N, M, Ds, generator=g), dim=-1)
    x, cb = x.to(dtype), cb.to(dtype)
    assert torch.all(R.pq_assign_ref(x, cb, metric)[0] == 5)
    codes, _, flagged, cfg = _assign_debug(x, cb, metric, recheck=False)
    assert cfg.kernel == "tc" and flagged == 0 and cfg.arch in (0, tc_arch)
    assert torch.all(codes == 13), codes  # the tensor-core pass alone: wrong at exact ties
    codes, min_dist, flagged, _ = _assign_debug(x, cb, metric)
    assert flagged == N * M and torch.all(codes == 5), codes
    ref_codes, ref_dist = R.pq_assign_ref(x, cb, metric)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(min_dist, ref_dist, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_streamed_class_with_padded_groups_meets_the_contract(metric, tc_arch):
    """K = 300: the K ≤ 1024 class (streamed codebook pieces, fp32 bias add), five groups, the last one
    mostly padding; a NaN codeword and a NaN row. Codes equal float64's on the unambiguous rows."""
    N, M, K, Ds = 150, 2, 300, 32
    g = gen(41)
    cb = torch.randn(M, K, Ds, generator=g)
    x = (cb[:, torch.randint(0, K, (N,), generator=g)].transpose(0, 1) + 0.3 * torch.randn(N, M, Ds, generator=g)).contiguous()
    cb[1, 7, 3] = float("nan")
    x[5, 0, 0] = float("nan")
    codes, min_dist, flagged, cfg = _assign_debug(x, cb, metric)
    assert cfg.kernel == "tc" and cfg.stream and cfg.NG * cfg.BLOCK_K >= K and cfg.arch in (0, tc_arch)
    far = cb.clone()
    far[1, 7] = 1e4 if metric == "l2" else 0.0  # the NaN codeword never wins: compare with one that cannot
    exact, clear = unambiguous_rows(x, far, metric)
    assert clear.sum() > N * M // 2
    assert torch.equal(codes.long()[clear], exact[clear])
    assert codes[5, 0] == 0 and torch.isnan(min_dist[5, 0]) and not torch.any(codes[:, 1] == 7)
    assert_assign_contract(x, cb, metric, codes, min_dist, backend="triton")


def _tf32(v: torch.Tensor) -> torch.Tensor:
    """fp32 → the nearest tf32 (10 explicit mantissa bits, ties to even), as fp32."""
    b = v.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = (b + 0xFFF + ((b >> 13) & 1)) & 0xFFFFE000
    return b.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_exact_default_equals_float64_on_near_ties_that_tf32_gets_wrong(metric, tc_arch):
    """Pairs of codewords 2e-3 apart and rows around their bisector: fp32-unambiguous rows (every backend
    must return the float64 argmin there) whose gap is below TF32 rounding. One TF32 product (inputs
    rounded to tf32, emulated in float64) picks the wrong codeword on some of them; the exact default
    flags such rows and returns the float64 codes on every one."""
    N, M, K, Ds = 200, 2, 64, 32
    g = gen(6)
    cb = torch.nn.functional.normalize(torch.randn(M, K, Ds, generator=g), dim=-1)
    for m in range(M):
        u = torch.randn(Ds, generator=g)
        u = u - (u @ cb[m, 0]) * cb[m, 0]
        cb[m, 1] = torch.nn.functional.normalize(cb[m, 0] + 2e-3 * u / u.norm(), dim=-1)
    mid = torch.nn.functional.normalize(cb[:, 0] + cb[:, 1], dim=-1)
    x = torch.nn.functional.normalize(mid.unsqueeze(0) + 0.05 * torch.randn(N, M, Ds, generator=g), dim=-1)
    exact, clear = unambiguous_rows(x, cb, metric)
    assert clear.sum() > N * M // 2
    tf32_codes = dist64(_tf32(x), _tf32(cb), metric).argmin(-1)
    assert (tf32_codes != exact)[clear].sum() >= 5  # tf32 alone gets these wrong
    codes, min_dist, flagged, cfg = _assign_debug(x, cb, metric)
    assert cfg.kernel == "tc" and flagged > 0  # the recheck really ran
    assert torch.equal(codes.long()[clear], exact[clear])
    assert_assign_contract(x, cb, metric, codes, min_dist, backend="triton")


def _emulated_split_keys(x, cb, metric, A):
    """float32 emulation of the tensor-core pass of the fp32 "exact" kernel for every (row, codeword):
    bf16 pieces of x (high piece truncated) and −2c (RN); with l2 first the three bf16 pieces of fl(||c||²) (the first truncated,
    kernels/pq_assign.py: _split3), then the three products, summed left to right in fp32 (one valid
    order); the low log2(A) bits replaced by the thread-local position."""
    def rn(v):
        b = v.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(torch.int32).view(torch.float32)

    def trunc(v):
        return (v.contiguous().view(torch.int32) & -65536).view(torch.float32)

    c2 = -2.0 * cb.float()
    xh, ch = trunc(x.float()), rn(c2)  # x's high piece is truncated (kernels/pq_assign.py: _split_trunc)
    xl, cl = rn(x.float() - xh), rn(c2 - ch)
    terms = [xh.unsqueeze(2) * ch.unsqueeze(0), xh.unsqueeze(2) * cl.unsqueeze(0), xl.unsqueeze(2) * ch.unsqueeze(0)]
    if metric == "l2":
        bias = (cb.float() ** 2).sum(-1)
        p0 = trunc(bias)
        p1 = rn(bias - p0)
        p2 = rn(bias - p0 - p1)
        shape = (x.shape[0],) + bias.shape + (1,)
        terms = [p.unsqueeze(0).unsqueeze(-1).expand(shape) for p in (p0, p1, p2)] + terms
    terms = torch.cat(terms, -1)  # [N, M, K, 3·Ds (+3)] exact products
    acc = torch.zeros(terms.shape[:-1])
    for i in range(terms.shape[-1]):  # sequential fp32 accumulation
        acc = acc + terms[..., i]
    k = torch.arange(cb.shape[1])
    a = (k % 64) // 8  # the position a of codeword k in its 64-codeword group (column = 8a + b)
    bits = acc.view(torch.int32)
    return ((bits & ~(A - 1)) | a.to(torch.int32)).view(torch.float32)


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_gap_bound_covers_the_split_products(metric):
    """The bound of ``_gap_bound`` against float64 on data built to stress it: rows and codewords over 2^±20
    of dynamic range, mixed signs, subnormal-free, K = 256 (four groups). Every emulated key must lie
    within E = gap_a·‖x‖·max‖c‖ + gap_b·max‖c‖² of the exact distance, and the bound must not be vacuous
    (the observed error uses a real share of it only for the worst rows, never more than all of it)."""
    N, M, K, Ds = 48, 2, 256, 32
    g = gen(31)
    scale = torch.exp2(torch.randint(-20, 21, (N, M, 1), generator=g).float())
    x = torch.randn(N, M, Ds, generator=g) * scale
    cb = torch.randn(M, K, Ds, generator=g) * torch.exp2(torch.randint(-3, 4, (M, K, 1), generator=g).float())
    cfg = pq_assign_mod.pick_config(torch.float32, Ds, "exact", K=K, metric=metric)
    assert cfg.kernel == "tc"
    gap_a, gap_b = pq_assign_mod._gap_bound(cfg)
    keys = _emulated_split_keys(x, cb, metric, cfg.BLOCK_K // 8).double()
    x64, c64 = x.double(), cb.double()
    exact = -2.0 * torch.einsum("nmd,mkd->nmk", x64, c64)
    if metric == "l2":
        exact = exact + (c64**2).sum(-1).unsqueeze(0)
    cmax = c64.norm(dim=-1).max(-1).values  # [M]
    E = gap_a * x64.norm(dim=-1) * cmax + gap_b * cmax**2  # [N, M]
    err = (keys - exact).abs().amax(-1)
    assert torch.all(err <= E), (err / E).max()
    assert (err / E).max() > 1e-3  # the bound is within a few orders of magnitude of the real error


def test_fused_statistics_come_from_the_assign_epilogue(monkeypatch):
    """With stats_x in x's dtype (and without stats_x) the fused op adds counts and sums in its own
    epilogue; only a half-precision x with a stats_x of another dtype falls back to the segment sum."""
    calls = []
    original = pq_assign_mod.segment_sum_triton

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(pq_assign_mod, "segment_sum_triton", spy)
    x = _to(torch.randn(70, 2, 16, generator=gen(12)))
    cb = _to(torch.randn(2, 30, 16, generator=gen(13)))
    with equss.use_backend("triton"):
        for stats_x in (None, x * 2, (x * 2).double()):
            out = equss.pq_assign_gather(x, cb, "l2", stats_x=stats_x)
            assert out[4].sum() == 70 * 2
        assert calls == []
        xb, cbb = x.bfloat16(), cb.bfloat16()
        out = equss.pq_assign_gather(xb, cbb, "l2", stats_x=x)  # fp32 stats_x for bf16 x
        assert calls == [torch.float32] and out[5].shape == (2, 30, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tensor_core_recheck_keeps_valid_codewords_above_2_127(dtype, tc_arch):
    """Valid codewords with ||c||² in (2^127, fp32 max) are not the kernel's invalid marker (2^127 in the
    keys' bias row): their keys are flagged and the FMA recheck (its own bias row, +inf only for invalid
    codewords) returns the reference's code and a finite min_dist."""
    cb = torch.stack([torch.full((4,), 8.2e18), torch.full((4,), 8.0e18), torch.full((4,), float("nan"))]).view(1, 3, 4)
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[1e18, 1e18, 1e18, 1e18]]])
    x, cb = x.to(dtype), cb.to(dtype)
    ref_codes, ref_dist = R.pq_assign_ref(x, cb, "l2")
    assert ref_codes.tolist() == [[1], [1]] and torch.isfinite(ref_dist).all()
    codes, min_dist, flagged, cfg = _assign_debug(x, cb, "l2")
    assert cfg.kernel == "tc" and flagged == 2
    assert torch.equal(codes, ref_codes.to(codes.dtype)), codes
    torch.testing.assert_close(min_dist, ref_dist, rtol=1e-5, atol=0.0)

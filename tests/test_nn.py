"""Behaviour of ``equss.nn.ProductQuantizer`` and ``equss.nn.ExpansionHead`` (single process, CPU).

Expected values come from brute force written here (einsum distances, one-hot means, explicit formulas),
never from the module's own helpers. The two-process tests live in ``test_nn_distributed.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import equss
from equss.nn import ExpansionHead, PQOutput, ProductQuantizer

# Clustered toy data: per subspace the K = 2·Ds cluster centres are ±e_i (unit vectors; any two distinct
# centres are at squared distance 2 or 4), points = centre + sigma·N(0, I).
M, DS = 4, 8
K = 2 * DS
CENTERS = torch.cat([torch.eye(DS), -torch.eye(DS)])  # [K, Ds]


def clustered(n: int, sigma: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n, M·Ds]`` and the true cluster label of every sub-vector ``[n, M]``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n, M), generator=g)
    x = CENTERS[labels] + sigma * torch.randn(n, M, DS, generator=g)
    return x.reshape(n, M * DS), labels


def brute_codes(x: torch.Tensor, codebooks: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Nearest codeword per subspace by explicit float64 distances. ``x [N, M, Ds]``, ``codebooks [M, K, Ds]``."""
    x, cb = x.double(), codebooks.double()
    if normalize:
        x, cb = F.normalize(x, dim=-1), F.normalize(cb, dim=-1)
    d = ((x.unsqueeze(2) - cb.unsqueeze(0)) ** 2).sum(-1)  # [N, M, K]
    return d.argmin(-1)


def set_codebooks(pq: ProductQuantizer, values: torch.Tensor) -> None:
    with torch.no_grad():
        pq.codebooks.copy_(values)
    pq.codebook.initialized.fill_(True)


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((30, 4, 16), {}, ValueError, "not divisible"),
        ((32, 4, 0), {}, ValueError, "codebook_size must be >= 1"),
        ((32, 0, 16), {}, ValueError, "num_subspaces must be >= 1"),
        ((32, 4, 16), {"learning": "adam"}, ValueError, "unknown learning 'adam'"),
        ((32, 4, 16), {"normalize": "z"}, ValueError, "unknown normalize"),
        ((32, 4, 16), {"init": "orthogonal"}, ValueError, "unknown init"),
        ((32, 4, 16), {"output": "soft"}, ValueError, "unknown output"),
        ((32, 4, 16), {"dead_code_seed": "split"}, ValueError, "unknown dead_code_seed"),
        ((32, 4, 16), {"decay": 1.5}, ValueError, "decay"),
        ((32, 4, 16), {"eps": 0.0}, ValueError, "eps"),
        ((32, 4, 16), {"dead_code_steps": -1}, ValueError, "dead_code_steps"),
        ((32.0, 4, 16), {}, TypeError, "dim must be an int"),
    ],
)
def test_constructor_rejects_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ProductQuantizer(*args, **kwargs)


def test_forward_rejects_wrong_channel_count_and_dtype():
    pq = ProductQuantizer(32, 4, 16, channel_dim=1)
    with pytest.raises(
        ValueError, match=r"input of shape \(2, 16, 3, 3\) has 16 channels in dim 1, expected dim=32"
    ):
        pq(torch.randn(2, 16, 3, 3))
    with pytest.raises(TypeError, match="float tensor"):
        pq(torch.ones(2, 32, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="expected num_subspaces=4"):
        pq.codes_to_output(torch.zeros(2, 5, 3, 3, dtype=torch.int32))
    assert ProductQuantizer(32, 4, 16, init="uni").codebook.init == "xavier"  # the authors' config name


def test_equss_preset_is_the_paper_setting():
    pq = ProductQuantizer.equss()  # spec §4: M 32, K 256, D 1024, l2, raw output, param, β 0.25, book 1, uni
    assert (pq.dim, pq.num_subspaces, pq.codebook_size, pq.subspace_dim) == (1024, 32, 256, 32)
    assert (pq.channel_dim, pq.normalize, pq.metric, pq.output, pq.learning) == (
        1,
        "l2",
        "dot",
        "raw",
        "param",
    )
    assert (pq.beta, pq.codebook_weight, pq.codebook.init, pq.codebook.dead_code_steps) == (0.25, 1.0, "xavier", 0)
    assert isinstance(pq.codebooks, torch.nn.Parameter)


def test_empty_input():
    pq = ProductQuantizer(32, 4, 16, learning="ema", dead_code_steps=1)
    out = pq(torch.randn(0, 32))
    assert out.quantized.shape == (0, 32) and out.codes.shape == (0, 4)
    assert out.loss.item() == 0.0 and out.stats.usage.item() == 0.0
    assert torch.isfinite(pq.codebooks).all()


def test_extra_repr_shows_configuration():
    text = repr(ProductQuantizer(64, 8, 32, learning="ema", decay=0.9, dead_code_steps=3, channel_dim=1))
    for part in (
        "dim=64",
        "num_subspaces=8",
        "codebook_size=32",
        "subspace_dim=8",
        "channel_dim=1",
        "learning='ema'",
        "decay=0.9",
        "ema_sums='raw'",
        "dead_code_steps=3",
        "metric 'dot'",
    ):
        assert part in text, (part, text)


# --------------------------------------------------------------------------------------- forward value
@pytest.mark.parametrize("normalize", ["l2", "none"])
@pytest.mark.parametrize("output", ["raw", "normalized"])
def test_output_equals_gather_of_assign(normalize, output):
    torch.manual_seed(0)
    pq = ProductQuantizer(32, 4, 16, normalize=normalize, output=output, channel_dim=1).eval()
    set_codebooks(pq, torch.randn(4, 16, 8))
    x = torch.randn(3, 32, 5, 7)
    out = pq(x)
    assert isinstance(out, PQOutput)
    flat = x.permute(0, 2, 3, 1).reshape(-1, 4, 8)
    codes = brute_codes(flat, pq.codebooks.detach(), normalize == "l2")  # [N, M]
    words = pq.codebooks.detach()[torch.arange(4), codes]  # raw c_{k*}: [N, M, Ds]
    if output == "normalized":
        words = F.normalize(words, dim=-1)
    assert torch.equal(out.codes.permute(0, 2, 3, 1).reshape(-1, 4).long(), codes)
    assert out.codes.dtype == torch.int32 and out.codes.shape == (3, 4, 5, 7)
    torch.testing.assert_close(out.quantized.permute(0, 2, 3, 1).reshape(-1, 4, 8), words, rtol=0, atol=0)
    torch.testing.assert_close(pq.codes_to_output(out.codes), out.quantized, rtol=0, atol=0)


def test_channel_dim_conventions_agree():
    torch.manual_seed(0)
    first = ProductQuantizer(32, 4, 16, channel_dim=1).eval()
    last = ProductQuantizer(32, 4, 16, channel_dim=-1).eval()
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, 32, 3, 4)
    a, b = first(x), last(x.permute(0, 2, 3, 1))
    assert torch.equal(a.quantized.permute(0, 2, 3, 1), b.quantized)
    assert torch.equal(a.codes.permute(0, 2, 3, 1), b.codes)


def test_loss_matches_formula():
    torch.manual_seed(0)
    pq = ProductQuantizer(32, 4, 16, codebook_weight=0.7, beta=0.3)
    set_codebooks(pq, torch.randn(4, 16, 8))
    x = torch.randn(50, 32)
    out = pq(x)
    xh = F.normalize(x.view(50, 4, 8).double(), dim=-1)
    c = pq.codebooks.detach().double()[
        torch.arange(4), brute_codes(x.view(50, 4, 8), pq.codebooks.detach(), True)
    ]
    per_subspace = ((c - xh) ** 2).mean(dim=(0, 2))  # the authors average the M per-subspace losses
    expected = (0.7 + 0.3) * per_subspace.mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=0)

    ema = ProductQuantizer(32, 4, 16, learning="ema", beta=0.3).eval()
    set_codebooks(ema, pq.codebooks.detach())
    torch.testing.assert_close(ema(x).loss.double(), 0.3 * per_subspace.mean(), rtol=1e-6, atol=0)


def test_stats_usage_and_perplexity():
    pq = ProductQuantizer(4, 2, 4, normalize="none").eval()
    # Subspace 0 codewords at 0, 10, 20, 30; subspace 1 the same. Rows chosen so subspace 0 uses codes
    # {0, 1} twice each and subspace 1 uses only code 3.
    set_codebooks(pq, torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 4, 1).expand(2, 4, 2).clone())
    x = torch.tensor(
        [[0.0, 0.0, 30.0, 30.0], [0.0, 0.0, 30.0, 30.0], [10.0, 10.0, 30.0, 30.0], [10.0, 10.0, 30.0, 30.0]]
    )
    s = pq(x).stats
    torch.testing.assert_close(s.usage_per_subspace, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(s.usage, torch.tensor(0.375))
    torch.testing.assert_close(s.perplexity, torch.tensor([2.0, 1.0]))  # exp(ln 2), exp(0)
    torch.testing.assert_close(s.counts, torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0]]))


# -------------------------------------------------------------------------------------------- gradients
def test_straight_through_gradient_equals_upstream_gradient():
    torch.manual_seed(0)
    pq = ProductQuantizer(32, 4, 16, normalize="none", channel_dim=1)
    set_codebooks(pq, torch.randn(4, 16, 8))
    x = torch.randn(2, 32, 3, 3, requires_grad=True)
    g = torch.randn(2, 32, 3, 3)
    pq(x).quantized.backward(g)
    assert torch.equal(x.grad, g)


def test_straight_through_gradient_with_l2_goes_through_the_normalisation():
    torch.manual_seed(0)
    pq = ProductQuantizer(32, 4, 16, normalize="l2")
    set_codebooks(pq, torch.randn(4, 16, 8))
    x = torch.randn(10, 32, requires_grad=True)
    g = torch.randn(10, 32)
    pq(x).quantized.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.normalize(x2.view(10, 4, 8), dim=-1).reshape(10, 32), x2, g)
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-7)


def test_l2_normalisation_gradient_matches_torch():
    from equss.nn.quantizer import _L2Normalize

    x = torch.randn(6, 3, 5, dtype=torch.float64)
    x[2, 1] = 0.0  # a zero sub-vector: the clamped branch (y = x / eps)
    x.requires_grad_(True)
    g = torch.randn(6, 3, 5, dtype=torch.float64)
    y = _L2Normalize.apply(x)
    (grad,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.normalize(x2, dim=-1)
    (expected,) = torch.autograd.grad(y2, x2, g)
    assert torch.equal(y, y2)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    xs = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_L2Normalize.apply, (xs,))


def test_gradient_trained_codebooks_move_towards_their_assigned_vectors():
    torch.manual_seed(0)
    pq = ProductQuantizer(16, 2, 8, normalize="none", codebook_weight=1.0, beta=0.25)
    set_codebooks(pq, torch.randn(2, 8, 8))
    x = 2.0 * torch.randn(200, 16)
    before = pq.codebooks.detach().clone()
    codes = brute_codes(x.view(200, 2, 8), before, False)
    pq(x).loss.backward()
    # d/dc_k of mean((c - x)^2) over N·M·Ds elements = 2·Σ_{i in k}(c_k - x_i) / (N·M·Ds).
    onehot = F.one_hot(codes, 8).double()  # [N, M, K]
    n = onehot.sum(0)  # [M, K]
    s = torch.einsum("nmk,nmd->mkd", onehot, x.view(200, 2, 8).double())
    expected_grad = 2.0 * (n.unsqueeze(-1) * before.double() - s) / (200 * 16)
    torch.testing.assert_close(pq.codebooks.grad.double(), expected_grad, rtol=1e-5, atol=1e-8)

    with torch.no_grad():
        pq.codebooks -= 0.5 * pq.codebooks.grad / pq.codebooks.grad.abs().max()
    means = s / n.clamp_min(1).unsqueeze(-1)
    used = n > 0
    d_before = ((before.double() - means) ** 2).sum(-1)
    d_after = ((pq.codebooks.detach().double() - means) ** 2).sum(-1)
    assert used.sum() > 8
    assert bool((d_after[used] < d_before[used]).all())
    assert torch.equal(pq.codebooks.detach()[~used], before[~used])  # unused codewords get no gradient


# -------------------------------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("normalize, ema_sums", [("none", "raw"), ("l2", "raw"), ("l2", "normalized")])
def test_decay_zero_ema_equals_batch_cluster_means(normalize, ema_sums):
    torch.manual_seed(0)
    pq = ProductQuantizer(16, 2, 8, normalize=normalize, learning="ema", decay=0.0, ema_sums=ema_sums)
    set_codebooks(pq, torch.randn(2, 8, 8))
    before = pq.codebooks.clone()
    x = torch.randn(300, 16) + 1.0
    xs = x.view(300, 2, 8).double()
    codes = brute_codes(xs, before, normalize == "l2")
    out = pq(x)
    assert torch.equal(out.codes.long(), codes)
    summed = F.normalize(xs, dim=-1) if ema_sums == "normalized" else xs
    onehot = F.one_hot(codes, 8).double()
    n = onehot.sum(0)
    means = torch.einsum("nmk,nmd->mkd", onehot, summed) / n.clamp_min(1).unsqueeze(-1)
    used = n > 0
    assert used.sum() >= 8
    # Laplace smoothing divides by (n_k + eps)/(N + K·eps)·N instead of n_k: relative change < 1e-4 here.
    torch.testing.assert_close(pq.codebooks.double()[used], means[used], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pq.codebook.cluster_size.double(), n)
    torch.testing.assert_close(out.stats.counts.double(), n)


def test_ema_decay_blends_with_history():
    torch.manual_seed(0)
    pq = ProductQuantizer(8, 1, 4, normalize="none", learning="ema", decay=0.75)
    set_codebooks(pq, torch.tensor([[[0.0] * 8, [5.0] * 8, [-5.0] * 8, [9.0] * 8]]))
    a = torch.full((4, 8), 0.5)  # all near code 0
    pq(a)
    pq(a + 1.0)  # still code 0 (1.5 is closer to 0 than to 5)
    # cluster_size = 0.25·4 then 0.75·1 + 0.25·4 = 1.75; embed_sum = 0.75·(0.25·2) + 0.25·6 = 1.875 per elem.
    torch.testing.assert_close(pq.codebook.cluster_size[0, 0], torch.tensor(1.75))
    torch.testing.assert_close(pq.codebook.embed_sum[0, 0], torch.full((8,), 1.875))
    torch.testing.assert_close(pq.codebooks[0, 0], torch.full((8,), 1.875 / 1.75), rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------ dead codes
@pytest.mark.parametrize("learning", ["param", "ema"])
@pytest.mark.parametrize("seed_mode", ["random", "farthest"])
def test_dead_code_is_reseeded_and_used_next_step(learning, seed_mode):
    torch.manual_seed(0)
    pq = ProductQuantizer(
        8, 1, 4, normalize="none", learning=learning, decay=0.5, dead_code_steps=1, dead_code_seed=seed_mode
    )
    centres = torch.tensor([[0.0] * 8, [3.0] * 8, [-3.0] * 8])
    set_codebooks(
        pq, torch.cat([centres, torch.full((1, 8), 100.0)]).unsqueeze(0)
    )  # code 3 is far from all data
    x = centres[torch.arange(60) % 3] + 0.3 * torch.randn(60, 8)
    x[7] += 2.0  # the single worst-quantized row
    out = pq(x)
    assert out.stats.counts[0, 3] == 0
    assert int(out.stats.num_reseeded) == 1 and int(pq.codebook.num_reseeded) == 1
    new = pq.codebooks.detach()[0, 3]
    matches = (x == new).all(dim=1)
    assert matches.sum() == 1, "the dead code must be re-seeded with one of the current input vectors"
    if seed_mode == "farthest":
        d = torch.cdist(x.double(), centres.double()).min(dim=1).values
        assert torch.equal(new, x[d.argmax()])
    if learning == "ema":
        assert pq.codebook.cluster_size[0, 3] == 1.0 and torch.equal(pq.codebook.embed_sum[0, 3], new)
    nxt = pq(x)
    assert nxt.stats.counts[0, 3] >= 1 and int(nxt.stats.num_reseeded) == 0


def test_dead_code_needs_the_configured_number_of_unused_steps():
    pq = ProductQuantizer(8, 1, 4, normalize="none", dead_code_steps=3)
    set_codebooks(pq, torch.tensor([[[0.0] * 8, [1.0] * 8, [2.0] * 8, [100.0] * 8]]))
    x = torch.zeros(10, 8)
    steps = [int(pq(x).stats.num_reseeded) for _ in range(3)]
    # codes 1, 2 and 3 are never chosen (x = 0 → code 0): they expire together at step 3.
    assert steps == [0, 0, 3]
    assert torch.equal(pq.codebook.steps_unused, torch.tensor([[0, 0, 0, 0]]))


# --------------------------------------------------------------------------------------- init / state
def test_eval_mode_leaves_buffers_untouched():
    for learning in ("param", "ema"):
        pq = ProductQuantizer(32, 4, 16, learning=learning, init="kmeans", dead_code_steps=1).eval()
        before = copy.deepcopy(pq.state_dict())
        for _ in range(2):
            pq(torch.randn(40, 32))
        after = pq.state_dict()
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), (learning, key)
        assert not bool(pq.codebook.initialized)


def test_xavier_init_at_first_training_forward():
    pq = ProductQuantizer(1024, 32, 256)
    assert pq.codebooks.detach().abs().max() <= 1.0 / 256  # authors' pre-init range
    pq(torch.randn(8, 1024))
    bound = (6.0 / (256 + 32)) ** 0.5  # ≈ 0.144, the spec's number
    cb = pq.codebooks.detach()
    assert cb.abs().max() <= bound and cb.abs().max() > 0.95 * bound
    assert bool(pq.codebook.initialized)


@pytest.mark.parametrize("learning", ["param", "ema"])
def test_kmeans_init_lowers_quantization_error_vs_uniform(learning):
    x, _ = clustered(2048, seed=1)
    errors = {}
    for init in ("xavier", "kmeans"):
        torch.manual_seed(0)
        pq = ProductQuantizer(M * DS, M, K, init=init, learning=learning, kmeans_iters=5)
        with torch.no_grad():
            pq(x)  # first training forward initialises
        pq.eval()
        q = pq(x).quantized
        xh = F.normalize(x.view(-1, M, DS), dim=-1).reshape_as(x)
        errors[init] = ((q - xh) ** 2).mean().item()
    # Uniform init leaves raw codewords of norm ~0.8 in random directions; k-means puts them on the clusters.
    assert errors["kmeans"] < 0.2 * errors["xavier"], errors


def test_state_dict_round_trip_and_no_reinit_on_resume():
    torch.manual_seed(0)
    for learning in ("param", "ema"):
        pq = ProductQuantizer(32, 4, 16, learning=learning, init="kmeans", dead_code_steps=2)
        x, _ = clustered(256)
        for _ in range(3):
            pq(x)
        state = copy.deepcopy(pq.state_dict())
        fresh = ProductQuantizer(32, 4, 16, learning=learning, init="kmeans", dead_code_steps=2)
        fresh.load_state_dict(state)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, state[key]), key
        assert bool(fresh.codebook.initialized)
        torch.manual_seed(1)
        a = pq(x)
        torch.manual_seed(1)
        b = fresh(x)  # training mode: must not re-run k-means, and must continue identically
        assert torch.equal(a.quantized, b.quantized) and torch.equal(a.codes, b.codes)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, pq.state_dict()[key]), key


def test_loading_an_uninitialised_state_initialises_again():
    pq = ProductQuantizer(32, 4, 16, init="xavier")
    pq(torch.randn(8, 32))
    trained = pq.codebooks.detach().clone()
    blank = ProductQuantizer(32, 4, 16, init="xavier").state_dict()
    pq.load_state_dict(blank)
    assert not bool(pq.codebook.initialized)
    pq(torch.randn(8, 32))
    assert bool(pq.codebook.initialized)
    bound = (6.0 / (16 + 8)) ** 0.5
    assert pq.codebooks.detach().abs().max() > 1.0 / 16  # re-drawn in ±bound, not the ±1/K placeholder
    assert pq.codebooks.detach().abs().max() <= bound and not torch.equal(pq.codebooks.detach(), trained)


def test_autocast_keeps_assignment_and_ema_in_fp32():
    torch.manual_seed(0)
    pq = ProductQuantizer(32, 4, 16, learning="ema", normalize="none")
    set_codebooks(pq, torch.randn(4, 16, 8))
    ref = copy.deepcopy(pq)
    x = torch.randn(64, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pq(x)
    expected = ref(x.float())
    assert out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.codes, expected.codes)
    assert pq.codebooks.dtype == pq.codebook.embed_sum.dtype == pq.codebook.cluster_size.dtype == torch.float32
    assert torch.equal(pq.codebooks, ref.codebooks) and torch.equal(pq.codebook.embed_sum, ref.codebook.embed_sum)


def test_no_collective_without_process_group(monkeypatch):
    import torch.distributed as dist

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective ran although torch.distributed is not initialised")

    for name in ("all_reduce", "all_gather", "broadcast"):
        monkeypatch.setattr(dist, name, forbidden)
    x, _ = clustered(128)
    for learning in ("param", "ema"):
        pq = ProductQuantizer(
            32, 4, 16, learning=learning, init="kmeans", dead_code_steps=1, dead_code_seed="random"
        )
        for _ in range(2):
            pq(x)


def _train_three_steps(backend: str, learning: str) -> tuple[list, dict, torch.Tensor]:
    torch.manual_seed(0)
    pq = ProductQuantizer(
        M * DS,
        M,
        K,
        learning=learning,
        init="kmeans",
        kmeans_iters=2,
        dead_code_steps=1,
        dead_code_seed="random",
    )
    outs, grads = [], []
    with equss.use_backend(backend):
        for step in range(3):
            x, _ = clustered(48, seed=step)
            x = (x * (1.0 + 0.1 * step)).requires_grad_(True)
            out = pq(x)
            (out.quantized.square().mean() + out.loss).backward()
            outs.append(out)
            grads.append(x.grad)
    return outs, copy.deepcopy(pq.state_dict()), torch.stack(grads)


@pytest.mark.slow
@pytest.mark.parametrize("learning", ["param", "ema"])
@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_every_backend_trains_like_the_torch_reference(backend, learning):
    """The module only calls equss.ops, so any backend must give the reference's training trajectory.

    Clustered data keeps every assignment far from a tie, so codes must match exactly; float sums may
    differ in the last bits (other accumulation order), hence the fp32 tolerance on the state.
    """
    if not equss.backends.available(backend, "cpu"):
        pytest.skip(f"backend {backend!r} not available on cpu: {equss.backends.info(backend).detail}")
    ref_outs, ref_state, ref_grads = _train_three_steps("torch", learning)
    outs, state, grads = _train_three_steps(backend, learning)
    for a, b in zip(ref_outs, outs):
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(b.quantized, a.quantized, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.stats.counts, b.stats.counts)
        assert int(a.stats.num_reseeded) == int(b.stats.num_reseeded)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------- toy runs
@pytest.mark.parametrize("learning", ["param", "ema"])
def test_toy_run_reaches_high_usage_and_low_error(learning):
    """200 training steps on clustered vectors (the EQUSS setting: l2, dot metric, raw output).

    Threshold derivation. Error = mean over all N·M·Ds elements of (q − x̂)². With the oracle codebook
    (codeword = mean of x̂ over its true cluster) the error is E0 = the within-cluster variance of x̂ per
    element, measured on the evaluation batch from the true labels (≈ sigma²·(Ds−1)/Ds = 0.0022: the noise
    orthogonal to the centre survives the normalisation). A codebook that leaves one pair of clusters
    (a, b) merged under one codeword pays at least the k-means merge cost
    n_a·n_b/(n_a+n_b)·‖μ_a − μ_b‖² / (N·M·Ds) ≈ (2/K)·(2/4)/(M·Ds) ≈ 0.002 (for ‖μ_a − μ_b‖² = 2), while
    the codeword it frees can win back at most the split gain of one cluster along one direction, ~sigma²/K,
    100× smaller. So threshold = E0 + half the smallest merge cost: any run with a merged pair fails it,
    one that found every cluster passes. With K clusters and K codewords, usage > 90% is the same claim.
    """
    torch.manual_seed(0)
    pq = ProductQuantizer(
        M * DS,
        M,
        K,
        learning=learning,
        init="kmeans",
        kmeans_iters=5,
        dead_code_steps=10,
        dead_code_seed="farthest",
    )
    opt = torch.optim.Adam(pq.parameters(), lr=1e-2) if learning == "param" else None
    for step in range(200):
        x, _ = clustered(256, seed=100 + step)
        out = pq(x)
        if opt is not None:
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    pq.eval()
    x, labels = clustered(4096, seed=7)
    out = pq(x)
    xh = F.normalize(x.view(-1, M, DS).double(), dim=-1)
    onehot = F.one_hot(labels, K).double()  # [N, M, K]
    n = onehot.sum(0)  # [M, K]
    mu = torch.einsum("nmk,nmd->mkd", onehot, xh) / n.unsqueeze(-1)
    e0 = ((xh - mu[torch.arange(M), labels]) ** 2).mean().item()
    pair_cost = (n.unsqueeze(2) * n.unsqueeze(1) / (n.unsqueeze(2) + n.unsqueeze(1))) * torch.cdist(
        mu, mu
    ) ** 2
    pair_cost = pair_cost + torch.diag_embed(torch.full((M, K), float("inf"), dtype=torch.float64))
    min_merge = pair_cost.min().item() / xh.numel()
    threshold = e0 + 0.5 * min_merge
    err = ((out.quantized.view(-1, M, DS).double() - xh) ** 2).mean().item()
    assert out.stats.usage.item() > 0.9, out.stats.usage_per_subspace
    assert err < threshold, (err, e0, min_merge)


# -------------------------------------------------------------------------------------- expansion head
def test_expansion_head_is_linear_plus_nonlinear_branch():
    torch.manual_seed(0)
    head = ExpansionHead(6, 10).eval()
    f = torch.randn(2, 6, 3, 4)
    fl = f.permute(0, 2, 3, 1).double()  # [B, H, W, C]
    w = lambda conv: conv.weight.detach().double()[:, :, 0, 0]
    b = lambda conv: conv.bias.detach().double()
    lin = fl @ w(head.linear).t() + b(head.linear)
    hidden = torch.relu(fl @ w(head.nonlinear[0]).t() + b(head.nonlinear[0]))
    nonlin = hidden @ w(head.nonlinear[2]).t() + b(head.nonlinear[2])
    expected = (lin + nonlin).permute(0, 3, 1, 2)
    torch.testing.assert_close(head(f).double(), expected, rtol=1e-5, atol=1e-6)
    assert head.nonlinear[0].out_channels == 6  # hidden width = in_dim, as the authors


def test_expansion_head_dropout_drops_whole_channels_in_training_only():
    torch.manual_seed(0)
    head = ExpansionHead(64, 8, dropout=0.5)
    f = torch.randn(4, 64, 5, 5)
    dropped = head.dropout(f)
    zero_channels = (dropped == 0).all(dim=(2, 3))
    assert 0 < zero_channels.sum() < zero_channels.numel()
    kept = ~zero_channels
    torch.testing.assert_close(dropped[kept], 2.0 * f[kept])  # surviving channels scaled by 1/(1-p)
    torch.manual_seed(1)
    z = head(f)
    torch.manual_seed(1)
    torch.testing.assert_close(z, head.project(head.dropout(f)))
    head.eval()
    torch.testing.assert_close(head(f), head.project(f))
    assert ExpansionHead(384, 1024).dropout.p == 0.1
    with pytest.raises(ValueError, match=r"expected features \[B, 64, H, W\], got shape \(4, 32, 5, 5\)"):
        head(torch.randn(4, 32, 5, 5))

"""The benchmark cases: for one ``(op, backend, shape, dtype)``, the function to time, how to validate its
first output, and the bytes and FLOPs of its work (for the roofline). Used by ``test_bench_gpu.py`` (GPU,
and the CPU rehearsal) and ``test_bench_module.py`` (CPU module step).

Ops (the pytest-benchmark group is ``<op>-<shape>-<dtype>``):

* ``assign``: ``equss.pq_assign`` alone (``triton``, ``ext``, ``torch``).
* ``assign_gather``: assignment + gather of the quantized vectors. ``triton-fused`` is the single launch
  of :func:`equss.pq_assign_gather` (it also counts); ``triton``/``ext``/``torch`` run ``pq_assign`` +
  ``pq_gather`` under that backend; ``authors`` is their per-subspace loop (full N×K distances, softmax).
* ``assign_gather_stats``: the same plus the per-codeword counts and sums of an EMA step (``stats_x``;
  ``pq_cluster_stats`` for the unfused rows; the authors' ``F.one_hot`` counts and one_hot matmul).
* ``ema_update``: statistics + EMA of one step from seeded codes (``equss.pq_ema_update_``; ``authors``:
  one_hot counts + one_hot matmul sums, :func:`benchmarks.baselines.authors_ema_update_`).
* ``train_step``: assign, gather, straight-through, commitment loss, backward, EMA update
  (:mod:`benchmarks.baselines`); ``vqp``: vector-quantize-pytorch, one codebook per head.
* ``module_step``: one ``equss.nn.ProductQuantizer`` training step (forward + backward + codebook update)
  on the EQUSS layout ``[B, D, H, W]``; ``ema`` (``normalize="none"``, EMA codebooks, the work
  vector-quantize-pytorch's ``VectorQuantize(accept_image_fmap=True)`` does: the ``vqp`` row) and
  ``param`` (the paper's head: l2-normalised sub-vectors, learned codebooks).

Every input is drawn from a seeded generator; codes of the EMA case too.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

import equss
from benchmarks import baselines as B
from benchmarks import harness as H
from benchmarks.shapes import PQShape
from equss.ops import reference as R

BETA, DECAY, EPS = 0.25, 0.99, 1e-5


@dataclass(frozen=True)
class Case:
    op: str
    backend: str
    shape: PQShape
    dtype_name: str = "float32"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape.name}-{self.dtype_name}-{self.backend}"


def inputs(shape: PQShape, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = H.generator(seed)
    x = torch.randn(shape.N, shape.M, shape.Ds, device=H.DEVICE, generator=g).to(dtype)
    cb = torch.randn(shape.M, shape.K, shape.Ds, device=H.DEVICE, generator=g).to(dtype)
    return x, cb


def _assign_bytes(s: PQShape, elem: int) -> float:
    # read x and the codebooks, write codes + min_dist (int32 + fp32) and the quantized vectors
    return s.N * s.D * elem + s.M * s.K * s.Ds * elem + s.N * s.M * 8 + s.N * s.D * elem


def _flops(s: PQShape) -> float:
    return 2.0 * s.N * s.M * s.K * s.Ds


def _check_stats(x, codes, counts, sums, K) -> str:
    want_counts, want_sums = R.pq_cluster_stats_ref(x.float(), codes, K)
    H.check(torch.equal(counts.float(), want_counts), "counts differ from the codes' histogram")
    msg = "counts exact"
    if sums is not None and sums.numel():
        msg += "; " + H.mostly_close("sums", sums, want_sums, rtol=1e-4, atol=1e-3)
    return msg


def build(case: Case):
    """``(fn, validate, bytes_moved, flops)`` for ``case``."""
    op, backend, s = case.op, case.backend, case.shape
    dtype = H.DTYPES[case.dtype_name]
    tol = H.codes_tolerance(backend, case.dtype_name)
    builder = {
        "assign": _assign,
        "assign_gather": _assign_gather,
        "assign_gather_stats": _assign_gather_stats,
        "ema_update": _ema_update,
        "train_step": _train_step,
        "module_step": _module_step,
    }[op.split("-")[0]]
    return builder(case, s, dtype, tol)


def _assign(case, s, dtype, tol):
    x, cb = inputs(s, dtype)

    def fn():
        with H.backend_ctx(case.backend):
            return equss.pq_assign(x, cb, "l2")

    return fn, lambda out: H.check_codes(x, cb, out[0], None, tol), _assign_bytes(s, x.element_size()) - s.N * s.D * x.element_size(), _flops(s)


def _assign_gather(case, s, dtype, tol):
    x, cb = inputs(s, dtype)
    if case.backend == "triton-fused":
        fn = lambda: equss.pq_assign_gather(x, cb, "l2")[::2]  # codes, quantized
    elif case.backend == "authors":
        fn = lambda: B.authors_assign(x, cb)
    else:

        def fn():
            with H.backend_ctx(case.backend):
                codes, _ = equss.pq_assign(x, cb, "l2")
                return codes, equss.pq_gather(codes, cb, check_range=False)

    def validate(out):
        codes, q = out[0], out[1]
        return H.check_codes(x, cb, codes, q, tol)

    return fn, validate, _assign_bytes(s, x.element_size()), _flops(s)


def _assign_gather_stats(case, s, dtype, tol):
    x, cb = inputs(s, dtype)
    if case.backend == "triton-fused":

        def fn():
            codes, _, q, _, counts, sums = equss.pq_assign_gather(x, cb, "l2", stats_x=x)
            return codes, q, counts, sums
    elif case.backend == "authors":

        def fn():
            codes, q = B.authors_assign(x, cb)
            return (codes, q, *B.authors_cluster_stats(x, codes, s.K))
    else:

        def fn():
            with H.backend_ctx(case.backend):
                codes, _ = equss.pq_assign(x, cb, "l2")
                q = equss.pq_gather(codes, cb, check_range=False)
                return (codes, q, *equss.pq_cluster_stats(x, codes, s.K, check_range=False))

    def validate(out):
        codes, q, counts, sums = out
        return H.check_codes(x, cb, codes, q, tol) + "; " + _check_stats(x, codes, counts, sums, s.K)

    elem = x.element_size()
    # + read x again for the sums (fused: from the same tile), write counts and sums
    return fn, validate, _assign_bytes(s, elem) + s.M * s.K * (s.Ds + 1) * 4, _flops(s) + 2.0 * s.N * s.D


def _ema_state(s: PQShape):
    return torch.zeros(s.M, s.K, device=H.DEVICE), torch.zeros(s.M, s.K, s.Ds, device=H.DEVICE)


def _ema_update(case, s, dtype, tol):
    x, cb0 = inputs(s, torch.float32, seed=2)
    codes = torch.randint(0, s.K, (s.N, s.M), device=H.DEVICE, dtype=torch.int32, generator=H.generator(3))
    cluster_size, embed_sum = _ema_state(s)
    cb = cb0.clone()
    if case.backend == "authors":
        fn = lambda: B.authors_ema_update_(x, codes, cluster_size, embed_sum, cb, DECAY, EPS)
    else:

        def fn():
            with H.backend_ctx(case.backend):
                return equss.pq_ema_update_(x, codes, cluster_size, embed_sum, cb, DECAY, EPS)

    def validate(counts):  # the first call started from zero statistics and cb0
        want = [*_ema_state(s), cb0.clone()]
        want_counts = R.pq_ema_update_ref_(x, codes, *want, DECAY, EPS)
        H.check(torch.equal(counts.float(), want_counts), "this step's counts differ from the reference")
        msgs = [H.mostly_close(n, got, w, rtol=1e-4, atol=1e-5)
                for n, got, w in zip(("cluster_size", "embed_sum", "codebooks"), (cluster_size, embed_sum, cb), want)]
        return "counts exact; " + ", ".join(msgs)

    # read x and codes; read-modify-write cluster_size, embed_sum, codebooks
    return fn, validate, s.N * s.D * 4 + s.N * s.M * 4 + 5 * s.M * s.K * s.Ds * 4, 2.0 * s.N * s.D


def _train_step(case, s, dtype, tol):
    x0, cb0 = inputs(s, torch.float32, seed=1)
    x = x0.clone().requires_grad_(True)
    backend = case.backend
    if backend == "vqp":
        vq = B.make_vqp(s.M, s.K, s.Ds, H.DEVICE, DECAY, EPS, BETA).train()
        B.vqp_set_codebooks_(vq, cb0)
        # vector-quantize-pytorch starts cluster_size at 1 and its embed_avg at the codebooks
        init = (torch.ones(s.M, s.K, device=H.DEVICE), cb0.clone())

        def fn():
            x.grad = None
            return B.vqp_train_step(vq, x)

        codebooks_after = lambda: B.vqp_codebooks(vq)
    else:
        cluster_size, embed_sum = _ema_state(s)
        init = _ema_state(s)
        cb = cb0.clone()

        def fn():
            x.grad = None
            if backend == "authors":
                return B.authors_train_step(x, cb, cluster_size, embed_sum, BETA, DECAY, EPS)
            with H.backend_ctx(backend):
                return B.equss_train_step(x, cb, cluster_size, embed_sum, BETA, DECAY, EPS,
                                          fused=backend == "triton-fused")

        codebooks_after = lambda: cb

    def validate(loss):  # against the reference step from the same state
        xr = x0.clone().requires_grad_(True)
        state = [cb0.clone(), *(t.clone() for t in init)]
        with equss.use_backend("torch"):
            want_loss = B.equss_train_step(xr, state[0], state[1], state[2], BETA, DECAY, EPS)
        msgs = [H.mostly_close("loss", loss, want_loss, rtol=1e-4, atol=1e-6),
                H.mostly_close("x.grad", x.grad, xr.grad, rtol=1e-4, atol=1e-7, max_frac=1e-3),
                H.mostly_close("codebooks", codebooks_after(), state[0], rtol=1e-3, atol=1e-5, max_frac=1e-3)]
        return ", ".join(msgs)

    elem = 4
    # assign + gather, then loss/backward (read x, q, write grad: 3·N·D) and the EMA statistics (read x, codes)
    bytes_moved = _assign_bytes(s, elem) + 3 * s.N * s.D * elem + s.N * s.D * elem + s.N * s.M * 4
    return fn, validate, bytes_moved, _flops(s)


def feature_map(shape: PQShape) -> tuple[int, int, int]:
    """``(B, H, W)`` with ``B·H·W = N``: 28×28 patches as in EQUSS when N allows, else 16×16."""
    side = 28 if shape.N % (28 * 28) == 0 else 16
    if shape.N % (side * side) != 0:
        raise ValueError(f"{shape}: N is not a multiple of {side}×{side}")
    return shape.N // (side * side), side, side


def _module_step(case, s, dtype, tol):
    learning = case.op.split("-")[1]  # module_step-ema | module_step-param
    Bn, Hh, Ww = feature_map(s)
    g = H.generator(4)
    x = torch.randn(Bn, s.D, Hh, Ww, device=H.DEVICE, generator=g).requires_grad_(True)
    grad_out = torch.randn(Bn, s.D, Hh, Ww, device=H.DEVICE, generator=g)
    from equss.nn import ProductQuantizer

    bound = math.sqrt(6.0 / (s.K + s.Ds))  # xavier_uniform_ of one [K, Ds] codebook, from the seeded generator
    cb_init = torch.empty(s.M, s.K, s.Ds, device=H.DEVICE).uniform_(-bound, bound, generator=g)
    if case.backend == "vqp":
        vq = B.make_vqp(s.M, s.K, s.Ds, H.DEVICE, DECAY, EPS, BETA, image_fmap=True).train()
        B.vqp_set_codebooks_(vq, cb_init)

        def fn():
            x.grad = None
            quantized, indices, loss = vq(x)
            torch.autograd.backward([quantized, loss.sum()], [grad_out, None])
            return quantized.detach(), indices

        cb0 = B.vqp_codebooks(vq).detach().clone()

        def validate(out):
            quantized, indices = out  # [B, D, H, W], [B, H, W, M]
            xf = x.detach().permute(0, 2, 3, 1).reshape(-1, s.M, s.Ds)
            codes = indices.reshape(-1, s.M)
            qf = quantized.permute(0, 2, 3, 1).reshape(-1, s.M, s.Ds)
            msg = H.check_codes(xf, cb0, codes, None, tol)
            m_idx = torch.arange(s.M, device=H.DEVICE).unsqueeze(0).expand(codes.shape[0], -1)
            # its output is x + (q − x).detach(): the codewords up to rounding
            return msg + ", " + H.mostly_close("quantized", qf, cb0[m_idx, codes.long()], rtol=1e-5, atol=1e-5)

        return fn, validate, _module_bytes(s), _flops(s)

    kwargs = dict(normalize="none", learning="ema") if learning == "ema" else dict(learning="param")
    pq = ProductQuantizer(s.D, s.M, s.K, channel_dim=1, beta=BETA, decay=DECAY, eps=EPS, init="xavier", **kwargs)
    pq = pq.to(H.DEVICE)
    with torch.no_grad():  # initialised here (not at the first forward, from the global generator)
        pq.codebook.codebooks.copy_(cb_init)
        pq.codebook.initialized.fill_(True)
    reference = copy.deepcopy(pq)

    def step(module, backend):
        with H.backend_ctx(backend):
            module.zero_grad(set_to_none=True)
            x.grad = None
            out = module(x)
            torch.autograd.backward([out.quantized, out.loss], [grad_out, None])
        return out

    fn = lambda: step(pq, case.backend)

    def validate(out):  # the first step from the same initial module, against the torch backend
        got = (out.quantized.detach().clone(), x.grad.clone(), out.loss.detach().clone())
        want_out = step(reference, "torch")
        msgs = [H.mostly_close("quantized", got[0], want_out.quantized, rtol=1e-4, atol=1e-5, max_frac=1e-3),
                H.mostly_close("x.grad", got[1], x.grad, rtol=1e-3, atol=1e-6, max_frac=1e-3),
                H.mostly_close("loss", got[2], want_out.loss, rtol=1e-3, atol=1e-6)]
        for (name, a), (_, b) in zip(sorted(pq.state_dict().items()), sorted(reference.state_dict().items())):
            if a.is_floating_point():
                msgs.append(H.mostly_close(name, a, b, rtol=1e-3, atol=1e-5, max_frac=1e-3))
        return ", ".join(msgs[:3]) + f"; {len(msgs) - 3} state tensors close"

    return fn, validate, _module_bytes(s), _flops(s)


def _module_bytes(s: PQShape) -> float:
    # assignment reads, ~10 elementwise fp32 passes over N·D (layout, residual, gradients), codebooks
    return 10.0 * 4 * s.N * s.D + 4 * s.M * s.K * s.Ds * 4

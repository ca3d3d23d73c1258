"""The benchmark baselines (benchmarks/baselines.py) compute what the reference computes, on CPU.

A benchmark against a baseline that does different work would be meaningless, so: the authors'
per-subspace formulation and the vector-quantize-pytorch wrapper must choose optimal codes, gather the
same codewords, and apply the same EMA update as :mod:`equss.ops.reference`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import equss
from equss.ops import reference as R

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import baselines as B  # noqa: E402

N, M, K, Ds = 301, 3, 37, 6


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, M, Ds, generator=g), torch.randn(M, K, Ds, generator=g)


def _clear_rows(x, cb):
    """[N, M] mask of (row, subspace) whose best code beats the second by far more than fp32 rounding."""
    d = ((x.double().unsqueeze(2) - cb.double().unsqueeze(0)) ** 2).sum(-1)
    two = d.topk(2, dim=-1, largest=False).values
    return (two[..., 1] - two[..., 0]) > 1e-4


def test_authors_assign_matches_reference():
    x, cb = _data()
    codes, q = B.authors_assign(x, cb)
    ref_codes, _ = R.pq_assign_ref(x, cb, "l2")
    clear = _clear_rows(x, cb)
    assert clear.float().mean() > 0.9
    assert torch.equal(codes[clear], ref_codes.long()[clear])
    assert torch.equal(q, R.pq_gather_ref(codes, cb))


def test_authors_ema_update_matches_reference():
    x, cb = _data(1)
    codes, _ = R.pq_assign_ref(x, cb)
    codes[:, 0] = codes[:, 0] % 5  # some codewords of subspace 0 unused
    ours = [torch.rand(M, K), torch.randn(M, K, Ds), cb.clone()]
    theirs = [t.clone() for t in ours]
    counts = R.pq_ema_update_ref_(x, codes, *ours, 0.9, 1e-5)
    their_counts = B.authors_ema_update_(x, codes, *theirs, 0.9, 1e-5)
    assert torch.equal(counts, their_counts)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_authors_and_equss_train_steps_agree():
    x, cb = _data(2)
    states = [[cb.clone(), torch.zeros(M, K), torch.zeros(M, K, Ds)] for _ in range(2)]
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    loss_a = B.authors_train_step(xs[0], states[0][0], states[0][1], states[0][2], decay=0.9)
    with equss.use_backend("torch"):
        loss_b = B.equss_train_step(xs[1], states[1][0], states[1][1], states[1][2], decay=0.9)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    for a, b in zip(states[0], states[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(B.vqp_unavailable_reason() is not None, reason=str(B.vqp_unavailable_reason()))
def test_vqp_wrapper_matches_reference():
    x, _ = _data(3)
    vq = B.make_vqp(M, K, Ds, "cpu", decay=0.8, eps=1e-5)
    cb0 = B.vqp_codebooks(vq).clone()
    assert cb0.shape == (M, K, Ds)
    vq.eval()  # eval: assignment only, head m ↔ x[:, m] ↔ codebook m
    q, codes, _ = B.vqp_forward(vq, x)
    ref_codes, _ = R.pq_assign_ref(x, cb0)
    clear = _clear_rows(x, cb0)
    assert torch.equal(codes[clear], ref_codes.long()[clear])
    assert torch.equal(q, R.pq_gather_ref(codes, cb0))
    vq.train()  # one EMA step; vector-quantize-pytorch starts cluster_size at 1 and embed_avg at embed
    B.vqp_forward(vq, x)
    cluster_size, embed_sum, cb = torch.ones(M, K), cb0.clone(), cb0.clone()
    R.pq_ema_update_ref_(x, codes, cluster_size, embed_sum, cb, 0.8, 1e-5)
    torch.testing.assert_close(vq._codebook.cluster_size, cluster_size)
    torch.testing.assert_close(B.vqp_codebooks(vq), cb)

"""Two real processes (gloo, CPU, ``torch.multiprocessing.spawn``) keep identical ProductQuantizer codebooks.

Each rank gets different data (its half of a global batch, or different clusters) and a different RNG
seed, so identical codebooks can only come from the module's own synchronisation: all-reduced counts
and EMA sums, the broadcast xavier init, and the gathered k-means / dead-code candidates. The EMA run is
also compared with one process that sees the concatenated batch.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from equss.nn import ProductQuantizer

pytestmark = pytest.mark.distributed

WORLD = 2
N_PER_RANK = 96
STEPS = 5
DIM, M, K = 32, 4, 16


def global_batch(step: int) -> torch.Tensor:
    """``[WORLD·N_PER_RANK, DIM]``: rank r uses rows ``r·N … (r+1)·N − 1``; shifted per rank so halves differ."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * N_PER_RANK, DIM, generator=g)
    x[N_PER_RANK:] += 1.5  # rank 1's vectors live elsewhere: its local statistics alone would be wrong
    return x


def cluster_batch(step: int, rank: int) -> torch.Tensor:
    """Per step and rank one of 8 clusters, so most codewords go unused every step (dead-code traffic)."""
    g = torch.Generator().manual_seed(2000 + 10 * step + rank)
    centre = torch.zeros(DIM)
    centre[(step + 3 * rank) % 8 :: 8] = 3.0
    return centre + 0.3 * torch.randn(N_PER_RANK, DIM, generator=g)


def make_ema() -> ProductQuantizer:
    torch.manual_seed(0)  # identical ±1/K construction on every rank; xavier init is drawn later
    return ProductQuantizer(DIM, M, K, learning="ema", decay=0.9, init="xavier")


def make_param() -> ProductQuantizer:
    torch.manual_seed(0)
    return ProductQuantizer(
        DIM, M, K, learning="param", init="kmeans", kmeans_iters=3, dead_code_steps=1, dead_code_seed="random"
    )


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        # EMA, plain module (no DDP wrapper, so DDP's buffer broadcast cannot hide a missing sync).
        ema = make_ema()
        torch.manual_seed(10 + rank)  # rank-specific RNG: the xavier draw differs unless broadcast
        ema_counts = []
        for step in range(STEPS):
            local = global_batch(step)[rank * N_PER_RANK : (rank + 1) * N_PER_RANK]
            ema_counts.append(ema(local).stats.counts.clone())
        # Eval mode must not run collectives: only rank 0 evaluates; a collective would time out.
        if rank == 0:
            ema.eval()
            ema(global_batch(0))
        dist.barrier()

        # Gradient-trained codebooks with the paper's xavier init: rank 0's draw must reach every rank.
        torch.manual_seed(0)
        xavier = ProductQuantizer(DIM, M, K, learning="param", init="xavier")
        torch.manual_seed(30 + rank)
        xavier(global_batch(0)[rank * N_PER_RANK : (rank + 1) * N_PER_RANK]).loss.backward()

        # Gradient-trained codebooks under DDP, k-means init and random dead-code re-seeding.
        param = make_param()
        torch.manual_seed(20 + rank)
        ddp = torch.nn.parallel.DistributedDataParallel(param, broadcast_buffers=False)
        opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
        codebooks, reseeded = [], []
        for step in range(STEPS):
            out = ddp(cluster_batch(step, rank))
            reseeded.append(int(out.stats.num_reseeded))
            opt.zero_grad()
            (out.loss + out.quantized.square().mean()).backward()
            opt.step()
            codebooks.append(param.codebooks.detach().clone())
        torch.save(
            {
                "ema_state": ema.state_dict(),
                "xavier_codebooks": xavier.codebooks.detach().clone(),
                "ema_counts": ema_counts,
                "param_codebooks": codebooks,
                "param_reseeded": reseeded,
                "param_total": int(param.codebook.num_reseeded),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo backend not built"
)
def test_two_ranks_keep_identical_codebooks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

    # EMA: bit-identical state on both ranks …
    for key, value in r0["ema_state"].items():
        assert torch.equal(value, r1["ema_state"][key]), key
    assert bool(r0["ema_state"]["codebook.initialized"])
    # … equal to one process on the concatenated batch (sums in another order: fp32 tolerance).
    single = make_ema()
    torch.manual_seed(10)  # rank 0's seed: its xavier draw is the one broadcast to every rank
    for step in range(STEPS):
        counts = single(global_batch(step)).stats.counts
        assert torch.equal(counts, r0["ema_counts"][step]), step
    for key, value in single.state_dict().items():
        torch.testing.assert_close(r0["ema_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The halves really differ: rank 0's data alone gives other statistics.
    alone = make_ema()
    torch.manual_seed(10)
    alone_counts = alone(global_batch(0)[:N_PER_RANK]).stats.counts
    assert not torch.equal(alone_counts, r0["ema_counts"][0])

    # Param, xavier init: broadcast, so equal to rank 0's draw on both ranks.
    assert torch.equal(r0["xavier_codebooks"], r1["xavier_codebooks"])

    # Param + DDP: identical codebooks after every step, with dead codes re-seeded on the way.
    for step, (a, b) in enumerate(zip(r0["param_codebooks"], r1["param_codebooks"])):
        assert torch.equal(a, b), f"codebooks differ after step {step}"
    assert r0["param_reseeded"] == r1["param_reseeded"]
    assert r0["param_total"] > 0

"""Outside implementations the PQ benchmarks compare against, and the training step each backend runs.

* **The authors' formulation** (docs/method.md §4, ``model/dino_pqgo.py``): a Python loop over the M
  subspaces, each computing the full N×K distance matrix from norms and a matmul, a softmax over it
  (computed by the authors' code for losses whose weight is 0 — wasted, but it is what their step
  costs), argmin, a codebook lookup; for the EMA variant ``F.one_hot`` counts and a one_hot matmul for the
  sums. The rows are used as given (the benchmarks feed every implementation the same rows; EQUSS
  l2-normalises them first, which costs the same for everyone).
* **vector-quantize-pytorch** ``VectorQuantize`` with one codebook per head (``heads=M``,
  ``separate_codebook_per_head=True``, ``codebook_dim=Ds``, so no projections): the same EMA update
  rule (decay, Laplace smoothing), straight-through estimator (``rotation_trick=False``: its default for
  dim > 1 is the rotation trick, a different and costlier backward) and commitment loss.
* :func:`equss_train_step`: our ops (``equss.pq_assign``/``pq_gather``/``pq_ema_update_`` through the
  active backend, or the fused Triton assign+gather).

All training steps do the same work: assign, gather, straight-through ``q_st = x + (q − x).detach()``,
loss = β·mse(x, q.detach()) + mean(q_st²) (the second term stands in for the downstream loss so the
straight-through gradient flows), backward, EMA update of the codebooks from (x, codes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "authors_assign",
    "authors_cluster_stats",
    "authors_ema_update_",
    "authors_train_step",
    "equss_train_step",
    "vqp_unavailable_reason",
    "make_vqp",
    "vqp_set_codebooks_",
    "vqp_train_step",
]


# ------------------------------------------------------------------------------ authors' formulation
def _authors_distances(xm: Tensor, cm: Tensor) -> Tensor:
    """[N, K] = ||x||² + ||c||² − 2 x·c, as the authors compute it (full matrix in memory)."""
    return (xm * xm).sum(1, keepdim=True) + (cm * cm).sum(1).unsqueeze(0) - 2.0 * xm @ cm.t()


def authors_assign(x: Tensor, codebooks: Tensor, softmax: bool = True) -> tuple[Tensor, Tensor]:
    """Per-subspace loop: distances, (wasted) softmax, argmin, lookup.

    Args:
        x: ``[N, M, Ds]``; codebooks: ``[M, K, Ds]``.
        softmax: also compute the softmax over the N×K distances, as the authors' forward does.

    Returns:
        ``codes [N, M]`` int64 and ``quantized [N, M, Ds]`` (the raw codewords).
    """
    codes, outs = [], []
    for m in range(x.shape[1]):
        xm, cm = x[:, m], codebooks[m]
        dist = _authors_distances(xm, cm)
        if softmax:
            dist.neg().softmax(dim=-1)
        idx = dist.argmin(dim=-1)
        codes.append(idx)
        outs.append(cm[idx])
    return torch.stack(codes, dim=1), torch.stack(outs, dim=1)


def authors_cluster_stats(x: Tensor, codes: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """This step's ``counts [M, K]`` and ``sums [M, K, Ds]`` from ``F.one_hot`` and a one_hot matmul, per subspace."""
    counts, sums = [], []
    for m in range(x.shape[1]):
        onehot = F.one_hot(codes[:, m].long(), K).to(torch.float32)  # [N, K]
        counts.append(onehot.sum(0))
        sums.append(onehot.t() @ x[:, m].float())  # [K, Ds]
    return torch.stack(counts), torch.stack(sums)


def authors_ema_update_(
    x: Tensor,
    codes: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    codebooks: Tensor,
    decay: float,
    eps: float,
) -> Tensor:
    """EMA update with ``F.one_hot`` counts and a one_hot matmul for the sums, one subspace at a time.

    Same semantics as :func:`equss.ops.reference.pq_ema_update_ref_`; returns this step's counts [M, K].
    """
    M, K, _ = codebooks.shape
    all_counts = []
    for m in range(M):
        onehot = F.one_hot(codes[:, m].long(), K).to(torch.float32)  # [N, K]
        counts = onehot.sum(0)
        sums = onehot.t() @ x[:, m].float()  # [K, Ds]
        cluster_size[m].mul_(decay).add_(counts, alpha=1 - decay)
        embed_sum[m].mul_(decay).add_(sums, alpha=1 - decay)
        n_tot = cluster_size[m].sum()
        if n_tot > 0:  # the reference keeps a never-used subspace's codebook (a host sync, like theirs)
            smoothed = (cluster_size[m] + eps) / (n_tot + K * eps) * n_tot
            codebooks[m].copy_(embed_sum[m] / smoothed.unsqueeze(-1))
        all_counts.append(counts)
    return torch.stack(all_counts)


def _step_loss(x: Tensor, q: Tensor, beta: float) -> Tensor:
    q_st = x + (q - x).detach()
    return beta * F.mse_loss(x, q.detach()) + q_st.square().mean()


def authors_train_step(
    x: Tensor,
    codebooks: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    beta: float = 0.25,
    decay: float = 0.99,
    eps: float = 1e-5,
) -> Tensor:
    """One EMA training step in the authors' formulation; ``x [N, M, Ds]`` requires grad. Returns the loss."""
    codes, q = authors_assign(x.detach(), codebooks)
    loss = _step_loss(x, q.to(x.dtype), beta)
    loss.backward()
    authors_ema_update_(x.detach(), codes, cluster_size, embed_sum, codebooks, decay, eps)
    return loss.detach()


def equss_train_step(
    x: Tensor,
    codebooks: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    beta: float = 0.25,
    decay: float = 0.99,
    eps: float = 1e-5,
    fused: bool = False,
) -> Tensor:
    """One EMA training step with our ops (the active backend; ``fused``: the fused ``pq_assign_gather``)."""
    import equss

    xd = x.detach()
    if fused:
        codes, _, q, _, _, _ = equss.pq_assign_gather(xd, codebooks.to(x.dtype), "l2")
    else:
        codes, _ = equss.pq_assign(xd, codebooks, "l2")
        q = equss.pq_gather(codes, codebooks, check_range=False)
    loss = _step_loss(x, q.to(x.dtype), beta)
    loss.backward()
    equss.pq_ema_update_(xd, codes, cluster_size, embed_sum, codebooks, decay, eps)
    return loss.detach()


# --------------------------------------------------------------------------- vector-quantize-pytorch
def vqp_unavailable_reason() -> str | None:
    """``None`` if vector-quantize-pytorch imports, else why not (it needs einops, einx, ...)."""
    try:
        import vector_quantize_pytorch  # noqa: F401
    except Exception as exc:
        return f"vector-quantize-pytorch not importable: {type(exc).__name__}: {exc}"
    return None


def make_vqp(
    M: int,
    K: int,
    Ds: int,
    device,
    decay: float = 0.99,
    eps: float = 1e-5,
    beta: float = 0.25,
    image_fmap: bool = False,
):
    """``VectorQuantize`` with M separate [K, Ds] codebooks (one per head), EMA updates, commitment β and the
    plain straight-through estimator (``rotation_trick=False``). ``image_fmap``: it takes ``[B, D, H, W]``
    feature maps (``accept_image_fmap``), like ``ProductQuantizer(channel_dim=1)``."""
    from vector_quantize_pytorch import VectorQuantize

    vq = VectorQuantize(
        dim=M * Ds,
        codebook_size=K,
        codebook_dim=Ds,
        heads=M,
        separate_codebook_per_head=True,
        decay=decay,
        eps=eps,
        commitment_weight=beta,
        kmeans_init=False,
        threshold_ema_dead_code=0,
        rotation_trick=False,
        accept_image_fmap=image_fmap,
    )
    return vq.to(device)


def vqp_codebooks(vq) -> Tensor:
    """The ``[M, K, Ds]`` codebooks of a :func:`make_vqp` module (its ``_codebook.embed`` buffer)."""
    return vq._codebook.embed


@torch.no_grad()
def vqp_set_codebooks_(vq, codebooks: Tensor) -> None:
    """Start ``vq`` from ``codebooks [M, K, Ds]``: its codewords and its EMA sums (``embed_avg``, which it
    starts at the codewords; its ``cluster_size`` starts at 1)."""
    vq._codebook.embed.copy_(codebooks)
    vq._codebook.embed_avg.copy_(codebooks)


def vqp_forward(vq, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``x [N, M, Ds]`` → ``(quantized [N, M, Ds], codes [N, M], commitment loss)`` through ``vq``."""
    N, M, Ds = x.shape
    quantized, indices, loss = vq(x.reshape(1, N, M * Ds))
    return quantized.reshape(N, M, Ds), indices.reshape(N, M), loss.sum()


def vqp_train_step(vq, x: Tensor) -> Tensor:
    """One training step of ``vq`` (train mode: EMA update inside the forward) with the same loss shape."""
    q_st, _, commit = vqp_forward(vq, x)
    loss = commit + q_st.square().mean()
    loss.backward()
    return loss.detach()

"""Pure-PyTorch reference implementations of the PQ ops: the single source of truth.

Every backend (C++ extension, CUDA, Triton) is tested against these functions, and these functions are
tested against float64 brute force on tiny shapes. They take already-validated, contiguous inputs (the
public wrappers in :mod:`equss.ops` validate) and always accumulate in float32.

Shapes (glossary in docs/method.md): ``x: [N, M, Ds]``, ``codebooks: [M, K, Ds]``, ``codes: [N, M]``.

Conventions shared by every backend:

* ``codes`` are ``int32`` (half the bytes of int64; every op accepts int32 or int64 codes).
* ``metric="l2"``: ``d(x, c) = ||x - c||²``, minimised through ``||c||² - 2 x·c`` (``||x||²`` does not
  change the argmin and is added afterwards). ``min_dist`` is clamped at 0, because the expanded form
  can round slightly below zero.
* ``metric="dot"``: ``d(x, c) = -x·c`` (maximum inner product; equals l2 for unit-norm rows and
  codewords up to the constant 2).
* Ties break to the lowest codeword index, like ``torch.argmin``.

The non-finite contract (every backend, every op; tested across backends in ``tests/``):

* A vector is *invalid* when its squared norm, computed in fp32, is not finite: it holds a NaN or an
  inf, or lies beyond the fp32 range. :func:`valid_rows` computes this per ``(n, m)``.
* An invalid codeword never wins an assignment. An invalid row gets code ``0`` (always in range) and
  ``min_dist = NaN``; every other row is unaffected. A valid row whose distances to all valid codewords
  are ``+inf`` (or whose subspace has no valid codeword) also gets code 0, with ``min_dist = +inf``.
  A NaN distance never wins (it can only arise from an overflow).
* An invalid row enters no count or sum (:func:`pq_cluster_stats_ref`, the statistics of
  :func:`pq_assign_gather_ref`).
* Codes outside ``[0, K)`` (possible only when a caller skips the range check) gather a zero vector and
  enter no count, sum or gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "METRICS",
    "assign_chunk_rows",
    "valid_rows",
    "pq_assign_ref",
    "pq_assign_gather_ref",
    "pq_gather_ref",
    "pq_gather_backward_ref",
    "pq_cluster_stats_ref",
    "pq_ema_apply_ref_",
    "pq_ema_update_ref_",
]

METRICS = ("l2", "dot")

# The reference never holds more than this many distances at once (64 MiB of fp32), so N = 10^6 with
# M·K = 32·256 runs in ~3k-row chunks instead of allocating the full N×M×K tensor (33 GB).
_MAX_DISTANCES_PER_CHUNK = 1 << 24


def assign_chunk_rows(M: int, K: int) -> int:
    """Rows per chunk used by :func:`pq_assign_ref` so a chunk holds at most 2^24 distances."""
    return max(1, _MAX_DISTANCES_PER_CHUNK // max(1, M * K))


def valid_rows(v: Tensor) -> Tensor:
    """``[..., Ds]`` → ``[...]`` bool: the vector's fp32 squared norm is finite (the module docstring)."""
    vf = v.float()
    return torch.isfinite((vf * vf).sum(-1))


def pq_assign_ref(x: Tensor, codebooks: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Nearest codeword per row and subspace.

    Args:
        x: ``[N, M, Ds]`` float tensor.
        codebooks: ``[M, K, Ds]`` float tensor.
        metric: ``"l2"`` (squared euclidean) or ``"dot"`` (negative inner product).

    Returns:
        ``codes [N, M]`` int32 and ``min_dist [N, M]`` float32 (see the module docstring).
    """
    N, M, _ = x.shape
    K = codebooks.shape[1]
    cb = codebooks.float()
    codes = torch.empty(N, M, dtype=torch.int32, device=x.device)
    min_dist = torch.empty(N, M, dtype=torch.float32, device=x.device)
    c_sq = (cb * cb).sum(-1)  # [M, K]
    # +inf for invalid codewords: they can never be strictly smaller than the running minimum.
    bias = torch.where(torch.isfinite(c_sq), c_sq if metric == "l2" else torch.zeros_like(c_sq), torch.inf)
    cb = torch.where(torch.isfinite(c_sq).unsqueeze(-1), cb, 0.0)  # keep NaN out of the products
    step = assign_chunk_rows(M, K)
    for start in range(0, N, step):
        xc = x[start : start + step].float().transpose(0, 1)  # [M, n, Ds]
        x_sq = (xc * xc).sum(-1)  # [M, n]
        ok = torch.isfinite(x_sq)
        xc = torch.where(ok.unsqueeze(-1), xc, 0.0)
        scale = 2.0 if metric == "l2" else 1.0
        dist = bias.unsqueeze(1) - scale * torch.bmm(xc, cb.transpose(1, 2))  # [M, n, K]
        dist = dist.nan_to_num(nan=torch.inf, posinf=torch.inf, neginf=-torch.inf)  # a NaN never wins
        best, idx = dist.min(dim=-1)  # first minimum wins (all +inf: code 0), like torch.argmin
        if metric == "l2":
            best = (best + x_sq).clamp_min(0.0)
        best = torch.where(ok, best, torch.nan)
        idx = torch.where(ok, idx, 0)
        codes[start : start + step] = idx.t().to(torch.int32)
        min_dist[start : start + step] = best.t()
    return codes, min_dist


def _flat_index(codes: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """``[N, M]`` codes → ``[N·M]`` row index into a ``[M·K, ...]`` table (subspace-major) and whether
    the code is in ``[0, K)`` (out-of-range entries point at row 0 and must be masked by the caller)."""
    M = codes.shape[1]
    offsets = torch.arange(M, device=codes.device, dtype=torch.int64) * K
    in_range = ((codes >= 0) & (codes < K)).reshape(-1)
    return torch.where(in_range, (codes.long() + offsets).reshape(-1), 0), in_range


def pq_gather_ref(codes: Tensor, codebooks: Tensor) -> Tensor:
    """Quantized vectors ``out[n, m] = codebooks[m, codes[n, m]]``.

    Args:
        codes: ``[N, M]`` int32/int64 in ``[0, K)``.
        codebooks: ``[M, K, Ds]``.

    Returns:
        ``[N, M, Ds]`` in the dtype of ``codebooks`` (a pure copy, bit-exact).
    """
    M, K, Ds = codebooks.shape
    N = codes.shape[0]
    flat, in_range = _flat_index(codes, K)
    out = codebooks.reshape(M * K, Ds).index_select(0, flat)
    return torch.where(in_range.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device)).reshape(N, M, Ds)


def pq_gather_backward_ref(grad_out: Tensor, codes: Tensor, K: int) -> Tensor:
    """Gradient of :func:`pq_gather_ref` w.r.t. the codebooks: scatter-add of ``grad_out`` by code.

    Args:
        grad_out: ``[N, M, Ds]``.
        codes: ``[N, M]``.
        K: number of codewords.

    Returns:
        ``[M, K, Ds]`` float32 (float64 for float64 ``grad_out``, so gradcheck is exact); the caller casts
        to the codebook dtype.
    """
    N, M, Ds = grad_out.shape
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    grad = torch.zeros(M * K, Ds, dtype=acc, device=grad_out.device)
    flat, in_range = _flat_index(codes, K)
    src = grad_out.reshape(N * M, Ds).to(acc)
    grad.index_add_(0, flat, torch.where(in_range.unsqueeze(-1), src, torch.zeros((), dtype=acc, device=src.device)))
    return grad.reshape(M, K, Ds)


def pq_cluster_stats_ref(x: Tensor, codes: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """Per-codeword counts and sums of the rows assigned to it (one step of EMA statistics).

    Args:
        x: ``[N, M, Ds]``.
        codes: ``[N, M]``.
        K: number of codewords.

    Returns:
        ``counts [M, K]`` float32 and ``sums [M, K, Ds]`` float32. Invalid rows of ``x`` and codes outside
        ``[0, K)`` enter neither (the module docstring).
    """
    return _segment_stats(x, codes, K, valid_rows(x))


def _segment_stats(x: Tensor, codes: Tensor, K: int, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Counts ``[M, K]`` and sums ``[M, K, Ds]`` (fp32) of the ``(n, m)`` pairs where ``keep [N, M]`` holds."""
    N, M, Ds = x.shape
    flat, in_range = _flat_index(codes, K)
    keep = keep.reshape(-1) & in_range
    counts = torch.zeros(M * K, dtype=torch.float32, device=x.device)
    counts.index_add_(0, flat, keep.float())  # +1.0 per row: exact below 2^24 per codeword
    sums = torch.zeros(M * K, Ds, dtype=torch.float32, device=x.device)
    rows = x.reshape(N * M, Ds).float()
    sums.index_add_(0, flat, torch.where(keep.unsqueeze(-1), rows, 0.0))
    return counts.reshape(M, K), sums.reshape(M, K, Ds)


def pq_assign_gather_ref(
    x: Tensor, codebooks: Tensor, codebooks_out: Tensor, metric: str, stats_x: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Assignment, gather, squared error and the step's statistics of one PQ training forward.

    Args:
        x: ``[N, M, Ds]``, the vectors assigned (e.g. the l2-normalised sub-vectors in EQUSS).
        codebooks: ``[M, K, Ds]`` used for the distances (e.g. the normalised codewords).
        codebooks_out: ``[M, K, Ds]`` gathered into ``quantized`` (EQUSS: the raw codewords).
        metric: ``"l2"`` or ``"dot"``.
        stats_x: ``[N, M, Ds]`` vectors whose per-codeword sums are wanted (EMA training), or ``None``.

    Returns:
        ``codes [N, M]`` int32 and ``min_dist [N, M]`` float32 (as :func:`pq_assign_ref`),
        ``quantized [N, M, Ds]`` (dtype of ``codebooks_out``, bit-exact codewords), ``sq_err [N, M]``
        float32 ``= Σ_d (x − quantized)²``, ``counts [M, K]`` float32 over the valid rows (of ``x``, and of
        ``stats_x`` when given) and ``sums [M, K, Ds]`` float32 of ``stats_x`` over the same rows
        (``[M, K, 0]`` when ``stats_x`` is ``None``).
    """
    codes, min_dist = pq_assign_ref(x, codebooks, metric)
    quantized = pq_gather_ref(codes, codebooks_out)
    diff = x.float() - quantized.float()
    sq_err = (diff * diff).sum(-1)
    keep = ~torch.isnan(min_dist)  # the valid rows of x (an invalid row has min_dist NaN)
    if stats_x is None:
        counts, _ = _segment_stats(x, codes, codebooks.shape[1], keep)
        sums = x.new_zeros(codebooks.shape[0], codebooks.shape[1], 0, dtype=torch.float32)
    else:
        counts, sums = _segment_stats(stats_x, codes, codebooks.shape[1], keep & valid_rows(stats_x))
    return codes, min_dist, quantized, sq_err, counts, sums


def pq_ema_apply_ref_(
    counts: Tensor,
    sums: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    codebooks: Tensor,
    decay: float,
    eps: float,
) -> None:
    """EMA of the statistics, Laplace smoothing, codebook renormalisation — all in place.

    Per subspace m (vector-quantize-pytorch's ``EuclideanCodebook`` / the EQUSS ``ema`` quantizer)::

        cluster_size ← decay·cluster_size + (1 − decay)·counts          [M, K]   (stays unsmoothed)
        embed_sum    ← decay·embed_sum    + (1 − decay)·sums            [M, K, Ds]
        n_tot        = Σ_k cluster_size[m, k]
        smoothed_k   = (cluster_size_k + eps) / (n_tot + K·eps) · n_tot
        codebooks    ← embed_sum / smoothed[..., None]

    A subspace whose ``n_tot`` is 0 (nothing ever assigned) keeps its codebook: 0/0 would be NaN.

    Args:
        counts: ``[M, K]`` float32, this step's counts (already all-reduced when distributed).
        sums: ``[M, K, Ds]`` float32, this step's sums.
        cluster_size: ``[M, K]`` float32 buffer, updated in place.
        embed_sum: ``[M, K, Ds]`` float32 buffer, updated in place.
        codebooks: ``[M, K, Ds]`` buffer of any float dtype, overwritten in place.
        decay: EMA decay in ``[0, 1]``.
        eps: Laplace smoothing constant (> 0).
    """
    K = cluster_size.shape[1]
    cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
    n_tot = cluster_size.sum(dim=1, keepdim=True)  # [M, 1]
    smoothed = (cluster_size + eps) / (n_tot + K * eps) * n_tot  # [M, K]
    new = embed_sum / smoothed.unsqueeze(-1)
    # where() in the codebook dtype: a subspace with nothing assigned keeps its codebook bit-exact.
    codebooks.copy_(torch.where((n_tot > 0).unsqueeze(-1), new.to(codebooks.dtype), codebooks))


def pq_ema_update_ref_(
    x: Tensor,
    codes: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    codebooks: Tensor,
    decay: float,
    eps: float,
) -> Tensor:
    """:func:`pq_cluster_stats_ref` followed by :func:`pq_ema_apply_ref_`; returns this step's counts ``[M, K]``."""
    counts, sums = pq_cluster_stats_ref(x, codes, codebooks.shape[1])
    pq_ema_apply_ref_(counts, sums, cluster_size, embed_sum, codebooks, decay, eps)
    return counts

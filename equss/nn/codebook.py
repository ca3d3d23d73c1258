"""``PQCodebook``: the M codebooks of a product quantizer and how they learn.

Holds the ``[M, K, Ds]`` codewords (an ``nn.Parameter`` trained by the optimiser for ``learning="param"``,
a buffer updated in place for ``"ema"``) with their statistics buffers, and implements what changes
them outside the optimiser: initialisation at the first training batch (xavier, k-means, random rows),
the EMA update, and dead-code re-seeding. The layer that uses it, :class:`equss.nn.ProductQuantizer`,
owns the layout, the assignment, the straight-through output and the losses (vector-quantize-pytorch
separates its ``Codebook`` from ``VectorQuantize`` the same way).

Every rank of a data-parallel job makes identical changes: statistics are all-reduced and random
choices are made from candidates gathered from all ranks (:mod:`equss.nn.distributed`). Nothing here
lets a non-finite input reach a codeword: NaN/inf rows are never picked as seeds or re-seeds.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from equss.nn import distributed as D
from equss.ops import pq_assign, pq_cluster_stats, pq_ema_apply_

__all__ = ["DEAD_CODE_SEEDS", "EMA_SUMS", "INITS", "LEARNING", "PQCodebook"]

LEARNING = ("param", "ema")
INITS = ("xavier", "kmeans", "random", "none")
EMA_SUMS = ("raw", "normalized")
DEAD_CODE_SEEDS = ("random", "farthest")
# The authors' config names, accepted so their YAML values can be passed through unchanged.
_INIT_ALIASES = {"uni": "xavier", "rand": "random"}

# F.normalize's default; the authors' code uses it for both x and the codewords.
NORM_EPS = 1e-12
# Floor for k-means++ weights: rows that coincide with a chosen seed keep a negligible but non-zero
# chance, so K > (number of distinct rows) still yields K seeds (duplicates) instead of failing.
_MIN_SEED_WEIGHT = 1e-30


def choice(value: object, allowed: tuple[str, ...], name: str, aliases: dict[str, str] | None = None) -> str:
    """``value`` if it is one of ``allowed`` (after ``aliases``), else a ``ValueError`` naming ``name``."""
    if isinstance(value, str) and aliases and value in aliases:
        value = aliases[value]
    if value not in allowed:
        raise ValueError(f"ProductQuantizer: unknown {name} {value!r}; expected one of {allowed}")
    return value  # type: ignore[return-value]


class PQCodebook(nn.Module):
    """The codewords of ``M`` subspaces, ``K`` per subspace, ``Ds`` channels each, and their learning.

    Args are those of :class:`equss.nn.ProductQuantizer` that concern the codebooks (see its docstring
    for their meaning): ``learning``, ``normalize`` (``"l2"``: assignment on unit vectors),
    ``decay``/``eps``/``ema_sums`` (EMA), ``init``/``kmeans_iters``, ``dead_code_steps``/``dead_code_seed``,
    ``process_group``.

    Buffers: ``codebooks [M, K, Ds]`` (a parameter for ``"param"``), ``cluster_size [M, K]`` and
    ``embed_sum [M, K, Ds]`` (``"ema"`` only, start at 0), ``initialized`` (bool), ``total_counts [M, K]``
    (int64, assignments seen in training), ``steps_unused [M, K]`` (int64, consecutive steps without an
    assignment), ``num_reseeded`` (int64, dead codes re-seeded so far).
    """

    codebooks: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    initialized: Tensor
    total_counts: Tensor
    steps_unused: Tensor
    num_reseeded: Tensor

    def __init__(
        self,
        num_subspaces: int,
        codebook_size: int,
        subspace_dim: int,
        *,
        learning: str = "param",
        normalize: str = "l2",
        decay: float = 0.99,
        eps: float = 1e-5,
        ema_sums: str = "raw",
        init: str = "xavier",
        kmeans_iters: int = 10,
        dead_code_steps: int = 0,
        dead_code_seed: str = "random",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.learning = choice(learning, LEARNING, "learning")
        self.ema_sums = choice(ema_sums, EMA_SUMS, "ema_sums")
        self.init = choice(init, INITS, "init", _INIT_ALIASES)
        self.dead_code_seed = choice(dead_code_seed, DEAD_CODE_SEEDS, "dead_code_seed")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ProductQuantizer: decay must be in [0, 1], got {decay}")
        if not eps > 0.0:
            raise ValueError(f"ProductQuantizer: eps must be > 0 (Laplace smoothing), got {eps}")
        if int(kmeans_iters) < 0 or int(dead_code_steps) < 0:
            raise ValueError(
                f"ProductQuantizer: kmeans_iters and dead_code_steps must be >= 0, got {kmeans_iters}, {dead_code_steps}"
            )
        self.num_subspaces, self.codebook_size, self.subspace_dim = num_subspaces, codebook_size, subspace_dim
        self.normalize = normalize
        self.metric = "dot" if normalize == "l2" else "l2"
        self.decay = float(decay)
        self.eps = float(eps)
        self.kmeans_iters = int(kmeans_iters)
        self.dead_code_steps = int(dead_code_steps)
        self.process_group = process_group

        M, K, Ds = num_subspaces, codebook_size, subspace_dim
        # The authors' nn.Embedding starts uniform in ±1/K; the real initialisation happens at the first
        # training forward (``init``).
        codebooks = torch.empty(M, K, Ds).uniform_(-1.0 / K, 1.0 / K)
        if self.learning == "param":
            self.codebooks = nn.Parameter(codebooks)
        else:
            self.register_buffer("codebooks", codebooks)
            self.register_buffer("cluster_size", torch.zeros(M, K))
            self.register_buffer("embed_sum", torch.zeros(M, K, Ds))
        self.register_buffer("initialized", torch.tensor(self.init == "none"))
        self.register_buffer("total_counts", torch.zeros(M, K, dtype=torch.int64))
        self.register_buffer("steps_unused", torch.zeros(M, K, dtype=torch.int64))
        self.register_buffer("num_reseeded", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        parts = [f"learning={self.learning!r}"]
        if self.learning == "ema":
            parts.append(f"decay={self.decay}, eps={self.eps}, ema_sums={self.ema_sums!r}")
        parts.append(f"init={self.init!r}" + (f", kmeans_iters={self.kmeans_iters}" if self.init == "kmeans" else ""))
        if self.dead_code_steps > 0:
            parts.append(f"dead_code_steps={self.dead_code_steps}, dead_code_seed={self.dead_code_seed!r}")
        else:
            parts.append("dead_code_steps=0 (off)")
        return ", ".join(parts)

    # ------------------------------------------------------------------------------------------ spaces
    def assign_space(self, v: Tensor) -> Tensor:
        """Vectors (or codewords) as the assignment sees them: unit-normalised for ``normalize="l2"``."""
        return F.normalize(v, dim=-1, eps=NORM_EPS) if self.normalize == "l2" else v

    def update_target(self, xf: Tensor, x_hat: Tensor) -> Tensor:
        """The vectors the codewords are trained towards: ``x̂`` for ``"param"``, the EMA-summed vectors
        (raw ``x`` with ``ema_sums="raw"``, the authors' quirk, else ``x̂``) for ``"ema"``."""
        return x_hat if self.learning == "param" or self.ema_sums == "normalized" else xf

    def _world(self) -> int:
        return D.world_size(self.process_group)

    # ----------------------------------------------------------------------------------------- updates
    @torch.no_grad()
    def initialize_(self, xf: Tensor, x_hat: Tensor) -> None:
        """Run ``init`` once, at the first training forward; every rank ends with the same codebooks."""
        M, K, Ds = self.codebooks.shape
        if self.init == "xavier":
            bound = math.sqrt(6.0 / (K + Ds))  # xavier_uniform_ of one [K, Ds] codebook (gain 1)
            self.codebooks.uniform_(-bound, bound)
            D.broadcast_from_first_(self.codebooks, group=self.process_group)
        elif self.init in ("kmeans", "random"):
            x_update = x_hat if self.learning == "param" or self.ema_sums == "normalized" else xf
            if self.init == "kmeans":
                centroids = self._kmeanspp_seeds(x_hat, x_update)
                centroids, counts = self._lloyd(x_hat, x_update, centroids, self.kmeans_iters)
            else:
                keys = self._gumbel(torch.isfinite(x_update).all(-1))
                picked, scores = self._select_rows(x_update, keys, K)  # [K, M, Ds], [K, M]
                centroids = torch.where(
                    torch.isfinite(scores).t().unsqueeze(-1), picked.transpose(0, 1), self.codebooks.float()
                )
                counts = None
            self.codebooks.copy_(centroids)
            if self.learning == "ema" and counts is not None:
                # As if the k-means batch had been the EMA history: codebooks = embed_sum / cluster_size.
                self.cluster_size.copy_(counts)
                self.embed_sum.copy_(centroids * counts.unsqueeze(-1))
        self.initialized.fill_(True)

    @staticmethod
    def _gumbel(finite: Tensor, log_weight: Tensor | None = None) -> Tensor:
        """Gumbel-max keys ``[N, M]``: the top-R keys are R rows sampled without replacement ∝ weight.

        ``finite [N, M]`` marks rows whose sub-vector is finite; the others get −inf (never chosen), so NaN
        inputs cannot poison a codebook.
        """
        u = torch.rand(finite.shape, device=finite.device, dtype=torch.float32).clamp_(1e-20, 1.0 - 1e-7)
        keys = -torch.log(-torch.log(u))
        if log_weight is not None:
            keys = keys + log_weight
        return keys.masked_fill_(~finite, -math.inf)

    def _select_rows(self, rows: Tensor, keys: Tensor, R: int) -> tuple[Tensor, Tensor]:
        """Per subspace, the ``R`` rows with the largest key over the rows of every rank.

        Args:
            rows: ``[N, M, Ds]`` local candidate vectors. keys: ``[N, M]`` float32 (−inf = not eligible).
            R: how many to pick; must be the same on every rank.

        Returns:
            ``picked [R, M, Ds]`` and their keys ``[R, M]`` (−inf where fewer than R eligible rows exist),
            identical on every rank: each rank sends its local top-R, then all ranks take the same top-R of
            the gathered union (the global top-R is always inside the union of the local ones).
        """
        N, M, Ds = rows.shape
        r = min(N, R)
        keys = keys.float()
        if r > 0:
            top, idx = keys.topk(r, dim=0)
            picked = rows.gather(0, idx.unsqueeze(-1).expand(r, M, Ds)).float()
        else:
            top = keys.new_empty(0, M)
            picked = rows.new_empty(0, M, Ds, dtype=torch.float32)
        if r < R:
            top = torch.cat([top, top.new_full((R - r, M), -math.inf)])
            picked = torch.cat([picked, picked.new_zeros(R - r, M, Ds)])
        if self._world() > 1:
            top = D.all_gather_cat(top, group=self.process_group)
            picked = D.all_gather_cat(picked, group=self.process_group)
            top, idx = top.topk(R, dim=0)
            picked = picked.gather(0, idx.unsqueeze(-1).expand(R, M, Ds))
        return picked, top

    def _kmeanspp_seeds(self, xa: Tensor, xu: Tensor) -> Tensor:
        """Greedy k-means++ seeding (scikit-learn's rule, ``2 + ln K`` trials per seed) over all ranks.

        Each seed: sample ``L`` candidate rows ∝ D² (squared assignment-space distance to the nearest seed
        so far) by Gumbel-top-L, keep the one that most lowers Σ D² (summed over all ranks). One loop over
        ``K``; all ``M`` subspaces advance together. Distances are squared euclidean in the assignment
        space (``2 − 2·x̂·ĉ`` for unit vectors with ``normalize="l2"``).

        Args:
            xa: ``[N, M, Ds]`` vectors in the assignment space. xu: the same rows in the update space.

        Returns:
            ``[M, K, Ds]`` float32 seeds (rows of ``xu``).
        """
        M, K, Ds = self.codebooks.shape
        L = 2 + int(math.log(K))
        arange_m = torch.arange(M, device=xu.device)
        finite = torch.isfinite(xa).all(-1) & torch.isfinite(xu).all(-1)  # [N, M]
        # Non-finite rows become zero vectors with D² = 0: weight 0, no share of the potential, never picked.
        xa_t = xa.float().masked_fill(~finite.unsqueeze(-1), 0.0).transpose(0, 1).contiguous()  # [M, N, Ds]
        xa_sq = (xa_t * xa_t).sum(-1, keepdim=True)  # [M, N, 1]

        def sq_dist(centers: Tensor) -> Tensor:  # centers [L, M, Ds] (update space) → [M, N, L]
            ca = self.assign_space(centers.float()).permute(1, 2, 0)  # [M, Ds, L]
            dots = torch.bmm(xa_t, ca)
            if self.normalize == "l2":
                return (2.0 - 2.0 * dots).clamp_min_(0.0)
            return (xa_sq + (ca * ca).sum(1, keepdim=True) - 2.0 * dots).clamp_min_(0.0)

        seeds = self.codebooks.detach().float().clone()
        first, key = self._select_rows(xu, self._gumbel(finite), 1)
        seeds[:, 0] = torch.where(torch.isfinite(key[0]).unsqueeze(-1), first[0], seeds[:, 0])
        dist2 = sq_dist(seeds[:, 0].unsqueeze(0)).squeeze(-1).masked_fill_(~finite.t(), 0.0)  # [M, N]
        for k in range(1, K):
            log_w = dist2.clamp_min(_MIN_SEED_WEIGHT).log_().t()  # [N, M] view
            cand, cand_key = self._select_rows(xu, self._gumbel(finite, log_w), L)  # [L, M, Ds], [L, M]
            d_new = sq_dist(cand)  # [M, N, L]
            potential = torch.minimum(dist2.unsqueeze(-1), d_new).sum(1)  # [M, L]
            D.all_reduce_sum_(potential, group=self.process_group)
            potential.masked_fill_(~torch.isfinite(cand_key).t(), math.inf)
            best = potential.argmin(dim=1)  # [M]
            ok = torch.isfinite(cand_key[best, arange_m]).unsqueeze(-1)
            seeds[:, k] = torch.where(ok, cand[best, arange_m], seeds[:, k])
            dist2 = torch.minimum(dist2, d_new[arange_m, :, best])
        return seeds

    def _lloyd(self, xa: Tensor, xu: Tensor, centroids: Tensor, iters: int) -> tuple[Tensor, Tensor]:
        """``iters`` Lloyd steps with the fused ops; returns centroids and the counts of the last assignment."""
        K = self.codebook_size
        counts = None
        for _ in range(max(1, iters)):
            codes, _ = pq_assign(xa, self.assign_space(centroids).to(xa.dtype), self.metric)
            counts, sums = pq_cluster_stats(xu, codes, K)
            D.all_reduce_sum_(counts, sums, group=self.process_group)
            if iters == 0:
                break
            means = sums / counts.clamp_min(1.0).unsqueeze(-1)
            centroids = torch.where((counts > 0).unsqueeze(-1), means, centroids)
        return centroids, counts

    def expire_dead_codes_(self, counts: Tensor, target: Tensor, min_dist: Tensor) -> Tensor:
        """Age the codewords by this step's (global) counts and re-seed the dead ones; returns how many."""
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = self.steps_unused >= self.dead_code_steps  # identical on every rank: built from global counts
        per_subspace = dead.sum(dim=1)
        R = int(per_subspace.max())
        if R == 0:
            return torch.zeros((), dtype=torch.int64, device=counts.device)
        finite = torch.isfinite(target).all(-1)  # [N, M]
        if self.dead_code_seed == "farthest":
            keys = min_dist.float().nan_to_num(nan=-math.inf).masked_fill_(~finite, -math.inf)
        else:
            keys = self._gumbel(finite)
        picked, picked_keys = self._select_rows(target, keys, R)  # [R, M, Ds], [R, M]
        # The j-th dead code of subspace m (in index order) takes the j-th pick of subspace m.
        slot = dead.long().cumsum(dim=1) - 1  # [M, K]
        m_idx, k_idx = dead.nonzero(as_tuple=True)
        j = slot[m_idx, k_idx]
        ok = torch.isfinite(picked_keys[j, m_idx])
        m_idx, k_idx, j = m_idx[ok], k_idx[ok], j[ok]
        vectors = picked[j, m_idx]
        self.codebooks[m_idx, k_idx] = vectors.to(self.codebooks.dtype)
        if self.learning == "ema":
            self.cluster_size[m_idx, k_idx] = 1.0
            self.embed_sum[m_idx, k_idx] = vectors.float()
        self.steps_unused[m_idx, k_idx] = 0
        n = torch.tensor(int(m_idx.numel()), dtype=torch.int64, device=counts.device)
        self.num_reseeded += n
        return n

    def ema_update_(self, counts: Tensor, sums: Tensor) -> Tensor:
        """One EMA step from this step's statistics (``counts [M, K]``, ``sums [M, K, Ds]``, all-reduced
        over the ranks first); returns the (global) counts."""
        D.all_reduce_sum_(counts, sums, group=self.process_group)
        pq_ema_apply_(counts, sums, self.cluster_size, self.embed_sum, self.codebooks, self.decay, self.eps)
        return counts

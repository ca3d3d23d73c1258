"""``ProductQuantizer``: a drop-in product-quantization layer over the fused ``equss.ops`` PQ ops.

The feature dimension ``D`` of the input is split into ``M`` contiguous sub-vectors of ``Ds = D / M``
channels (sub-vector ``m`` holds channels ``m·Ds … (m+1)·Ds − 1``, like ``torch.chunk``); each is
replaced by the nearest of the ``K`` codewords of its own codebook. All ``M`` subspaces are handled by
one call of each op (``pq_assign``, ``pq_gather``, ``pq_cluster_stats`` / ``pq_ema_update_``): there
is no Python loop over ``M``.

Shapes (glossary in DESIGN.md): ``N`` vectors, ``M`` subspaces, ``K`` codewords, ``Ds`` subspace dim.
Internally ``x: [N, M, Ds]``, ``codebooks: [M, K, Ds]``, ``codes: [N, M]``.

The EQUSS paper's quantization head (``shared/EQUSS_SPEC.md`` §4) is the default configuration, see
:meth:`ProductQuantizer.equss`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from equss.nn import distributed as D
from equss.ops import pq_assign, pq_cluster_stats, pq_ema_apply_, pq_ema_update_, pq_gather

__all__ = ["PQOutput", "PQStats", "ProductQuantizer"]

NORMALIZE = ("l2", "none")
OUTPUTS = ("raw", "normalized")
LEARNING = ("param", "ema")
INITS = ("xavier", "kmeans", "random", "none")
EMA_SUMS = ("raw", "normalized")
DEAD_CODE_SEEDS = ("random", "farthest")
# The authors' config names, accepted so their YAML values can be passed through unchanged.
_INIT_ALIASES = {"uni": "xavier", "rand": "random"}

# F.normalize's default; the authors' code uses it for both x and the codewords.
_NORM_EPS = 1e-12
# Floor for k-means++ weights: rows that coincide with a chosen seed keep a negligible but non-zero
# chance, so K > (number of distinct rows) still yields K seeds (duplicates) instead of failing.
_MIN_SEED_WEIGHT = 1e-30


class PQStats(NamedTuple):
    """Per-step codebook statistics (no grad). In training they are global over all ranks; in eval local.

    Attributes:
        usage: scalar, fraction of the ``K`` codewords used this step, averaged over the ``M`` subspaces.
        usage_per_subspace: ``[M]``, the same per subspace.
        perplexity: ``[M]``, ``exp(entropy)`` of this step's code histogram per subspace (``K`` = uniform use).
        counts: ``[M, K]`` float32, this step's assignments per codeword.
        num_reseeded: scalar int64, dead codewords re-seeded in this step (0 outside training).
    """

    usage: Tensor
    usage_per_subspace: Tensor
    perplexity: Tensor
    counts: Tensor
    num_reseeded: Tensor


class PQOutput(NamedTuple):
    """What :meth:`ProductQuantizer.forward` returns.

    Attributes:
        quantized: same shape and dtype as the input; the value is the chosen codeword per subspace and the
            gradient flows straight through to the input (to its l2-normalised sub-vectors with ``normalize="l2"``).
            For a channel dim other than the last it is a view with the channels innermost in memory
            (channels-last for ``[B, D, H, W]``, which convolutions accept); ``.contiguous()`` if needed.
        codes: int32, the input's shape with the channel dimension replaced by ``M`` (e.g. ``[B, M, H, W]``
            for ``channel_dim=1``, ``[..., M]`` for ``channel_dim=-1``).
        loss: scalar float32; ``codebook_weight·mse(c, x̂.detach()) + beta·mse(x̂, c.detach())`` for
            ``learning="param"``, ``beta·mse(x̂, c.detach())`` for ``"ema"`` (mean over all N·M·Ds elements,
            which equals the mean over subspaces of the per-subspace mse).
        stats: :class:`PQStats`.
    """

    quantized: Tensor
    codes: Tensor
    loss: Tensor
    stats: PQStats


def _choice(value: object, allowed: tuple[str, ...], name: str, aliases: dict[str, str] | None = None) -> str:
    if isinstance(value, str) and aliases and value in aliases:
        value = aliases[value]
    if value not in allowed:
        raise ValueError(f"ProductQuantizer: unknown {name} {value!r}; expected one of {allowed}")
    return value  # type: ignore[return-value]


def _recheck_initialized(module: ProductQuantizer, incompatible_keys) -> None:
    module._init_checked = False


class _L2Normalize(torch.autograd.Function):
    """``F.normalize(x, dim=-1, eps=1e-12)`` with a two-pass backward.

    ``y = x / max(‖x‖, eps)``; ``∂/∂x = (g − y·⟨y, g⟩) / ‖x‖`` (``g / eps`` where the norm was clamped).
    Autograd through ``F.normalize`` runs several more elementwise passes over the N·D input; the
    module normalises the full feature map every step, so this is one of its largest costs.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        r = norm.clamp_min(_NORM_EPS)
        y = x / r
        ctx.save_for_backward(y, r, norm > _NORM_EPS)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        y, r, unclamped = ctx.saved_tensors
        dot = torch.linalg.vecdot(y, g).unsqueeze(-1) * unclamped  # clamped rows: y = x/eps is linear in x
        return torch.addcmul(g, y, dot, value=-1.0).div_(r)


class _StraightThroughVQ(torch.autograd.Function):
    """Straight-through output and the VQ loss from one residual ``d = c − x̂`` (``[N, M, Ds]``).

    Forward: ``q = c`` (the same values, no copy) and ``loss = (w_c + w_x)·mean(d²)``.
    Backward: ``∂/∂x̂ = g_q − 2·w_x·g_loss·d/n`` and ``∂/∂c = 2·w_c·g_loss·d/n`` (``n`` = numel).

    This is exactly ``q = x̂ + (c − x̂).detach()`` with ``w_c·mse(c, x̂.detach()) + w_x·mse(x̂, c.detach())``
    (the authors' formulation; ``w_c = 0`` for EMA codebooks), but only ``d`` is kept for backward and the
    output costs no extra pass over N·D elements — these elementwise passes cost more than the fused
    assignment at the EQUSS shape.
    """

    @staticmethod
    def forward(ctx, x_hat: Tensor, c: Tensor, w_c: float, w_x: float) -> tuple[Tensor, Tensor]:
        d = c - x_hat
        n = max(d.numel(), 1)
        flat = d.reshape(-1)
        loss = torch.dot(flat, flat) * ((w_c + w_x) / n)  # one read pass, accumulated by BLAS in d's dtype
        ctx.save_for_backward(d)
        ctx.scale_x, ctx.scale_c = -2.0 * w_x / n, 2.0 * w_c / n
        return c.detach(), loss

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_loss: Tensor):
        (d,) = ctx.saved_tensors
        grad_x = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(grad_q, d, (grad_loss * ctx.scale_x).to(d.dtype))
        if ctx.needs_input_grad[1]:
            grad_c = d * (grad_loss * ctx.scale_c).to(d.dtype)
        return grad_x, grad_c, None, None


class ProductQuantizer(nn.Module):
    """Product quantizer with straight-through gradients, gradient- or EMA-learned codebooks.

    Per subspace ``m`` of every input vector ``x`` (``x̂ = x/‖x‖`` with ``normalize="l2"``, else ``x̂ = x``):

    1. assignment ``k* = argmin_k d(x̂, ĉ_k)``; with ``normalize="l2"`` the codewords are normalised too
       (``ĉ = c/‖c‖``) and ``d`` is ``−x̂·ĉ`` (metric ``"dot"``, equal to the euclidean argmin on unit
       vectors); otherwise ``d = ‖x − c‖²``. Always computed in fp32 (autocast is disabled inside).
    2. output ``c_out = c_{k*}`` (``output="raw"``, the EQUSS default — a quirk of the authors' code:
       the raw codeword although the assignment used ``ĉ``) or ``ĉ_{k*}`` (``output="normalized"``).
    3. straight-through: the output value is exactly ``c_out`` and its gradient is passed unchanged to
       ``x̂`` (the gradient of the authors' ``x̂ + (c_out − x̂).detach()``; computed together with the loss
       by one autograd function from the residual ``c_out − x̂``).
    4. loss: ``codebook_weight·mse(c_out, x̂.detach()) + beta·mse(x̂, c_out.detach())`` for
       ``learning="param"`` (the codebooks are an ``nn.Parameter`` trained by the optimiser), only the
       ``beta`` term for ``learning="ema"``.
    5. EMA (``learning="ema"``, training only): with this step's counts ``n`` and sums ``s`` (all-reduced
       across ranks), ``cluster_size ← decay·cluster_size + (1−decay)·n``,
       ``embed_sum ← decay·embed_sum + (1−decay)·s`` and ``codebooks ← embed_sum / laplace(cluster_size)``
       (see :func:`equss.ops.pq_ema_apply_`). The sums are over the raw ``x`` (``ema_sums="raw"``, the
       EQUSS authors' quirk, even with ``normalize="l2"``) or over ``x̂`` (``ema_sums="normalized"``).
       The spec's buffer names map as ``weight → codebooks``, ``weight_avg → embed_sum``,
       ``count → cluster_size``; ``cluster_size`` and ``embed_sum`` start at 0 (no observations yet),
       so a codeword that no vector ever chose collapses to the zero vector after the first update
       (the authors copy the initial codewords into ``weight_avg`` instead, which makes such raw
       codewords grow like ``1/eps``); enable dead-code re-seeding to recycle them.

    Initialisation (``init``), at the first forward in training mode (before it the codebooks are uniform
    in ``±1/K``, as in the authors' code; the ``initialized`` buffer records it, so it survives
    ``state_dict`` round trips and resumed runs never re-initialise):

    * ``"xavier"`` (the paper's ``uni``): ``xavier_uniform_`` per ``[K, Ds]`` codebook, i.e. uniform in
      ``±sqrt(6/(K+Ds))``; under torch.distributed rank 0's draw is broadcast.
    * ``"kmeans"``: k-means on the first batch (all ranks' vectors when distributed): greedy k-means++
      seeding (``2 + ln K`` candidates per seed, as scikit-learn), then ``kmeans_iters`` Lloyd iterations
      with :func:`equss.ops.pq_assign` / :func:`equss.ops.pq_cluster_stats`, in the assignment metric,
      on the inputs' device. Centroids are means of the vectors the codebooks are trained towards
      (``x̂`` for ``"param"``, the EMA-summed vectors for ``"ema"``).
    * ``"random"``: codewords = distinct random input rows. ``"none"``: keep the ``±1/K`` values.

    Dead codes (``dead_code_steps > 0``, training only): a codeword not chosen by any vector of any rank
    for ``dead_code_steps`` consecutive steps is replaced, after this step's update, by an input vector
    (in the space the codebook is trained towards): a uniformly random one (``"random"``) or the ones
    worst quantized this step (``"farthest"``, largest assignment distance). Under torch.distributed the
    candidates of all ranks are gathered and every rank makes the same choice, so codebooks stay
    identical. For ``"ema"`` the re-seeded code restarts with ``cluster_size = 1`` and
    ``embed_sum = vector`` (as if it had seen that one vector). For ``"param"`` the optimiser's state for
    that row (e.g. Adam moments) is not reset. The per-step count is in ``stats.num_reseeded`` and the
    running total in the ``num_reseeded`` buffer.

    Distributed: when a process group is initialised, training steps all-reduce the per-step counts (and
    the EMA sums) and gather re-seeding/k-means candidates over ``process_group`` (default: the world),
    so every rank of a data-parallel job keeps identical codebooks. No collective runs when torch.distributed
    is not initialised, nor in eval mode (so evaluating on one rank cannot hang).

    Keep the module in float32 (use autocast for mixed precision): the EMA buffers must be float32.

    Args:
        dim: ``D``, the size of the input's channel dimension.
        num_subspaces: ``M`` (must divide ``dim``).
        codebook_size: ``K`` codewords per subspace.
        channel_dim: which input dimension holds the ``D`` features: ``1`` for ``[B, D, H, W]`` feature maps
            (the EQUSS head), ``-1`` (default) for ``[..., D]`` token/vector inputs. Any dimension works.
        normalize: ``"l2"`` (default, the paper) or ``"none"``.
        output: ``"raw"`` (default, the EQUSS quirk) or ``"normalized"`` codewords.
        learning: ``"param"`` (default, the paper's ``vq_type: param``) or ``"ema"``.
        beta: commitment weight (0.25).
        codebook_weight: weight of the codebook loss for ``"param"`` (the authors' ``book``, 1.0).
        decay, eps: EMA decay (0.99) and Laplace smoothing (1e-5), ``"ema"`` only.
        ema_sums: ``"raw"`` (default, quirk) or ``"normalized"``.
        init: ``"xavier"`` (default), ``"kmeans"``, ``"random"`` or ``"none"``; ``"uni"``/``"rand"`` accepted.
        kmeans_iters: Lloyd iterations after seeding (10).
        dead_code_steps: re-seed codewords unused this many consecutive steps; 0 (default, the paper) = off.
        dead_code_seed: ``"random"`` (default) or ``"farthest"``.
        process_group: the group to synchronise over (default: the world group).

    Example::

        pq = ProductQuantizer(1024, 32, 256, channel_dim=1)   # the EQUSS head, [B, 1024, H, W] input
        out = pq(z)
        loss = task_loss(out.quantized) + out.loss
    """

    codebooks: Tensor
    initialized: Tensor
    total_counts: Tensor
    steps_unused: Tensor
    num_reseeded: Tensor
    cluster_size: Tensor
    embed_sum: Tensor

    def __init__(
        self,
        dim: int,
        num_subspaces: int,
        codebook_size: int,
        *,
        channel_dim: int = -1,
        normalize: str = "l2",
        output: str = "raw",
        learning: str = "param",
        beta: float = 0.25,
        codebook_weight: float = 1.0,
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
        for name, value in (("dim", dim), ("num_subspaces", num_subspaces), ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"ProductQuantizer: {name} must be an int, got {type(value).__name__} ({value!r})"
                )
        if dim < 1 or num_subspaces < 1:
            raise ValueError(
                f"ProductQuantizer: dim and num_subspaces must be >= 1, got dim={dim}, num_subspaces={num_subspaces}"
            )
        if codebook_size < 1:
            raise ValueError(f"ProductQuantizer: codebook_size must be >= 1, got {codebook_size}")
        if dim % num_subspaces != 0:
            raise ValueError(
                f"ProductQuantizer: dim={dim} is not divisible by num_subspaces={num_subspaces} "
                f"(each subspace needs dim/num_subspaces channels)"
            )
        if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
            raise TypeError(f"ProductQuantizer: channel_dim must be an int, got {channel_dim!r}")
        self.normalize = _choice(normalize, NORMALIZE, "normalize")
        self.output = _choice(output, OUTPUTS, "output")
        self.learning = _choice(learning, LEARNING, "learning")
        self.ema_sums = _choice(ema_sums, EMA_SUMS, "ema_sums")
        self.init = _choice(init, INITS, "init", _INIT_ALIASES)
        self.dead_code_seed = _choice(dead_code_seed, DEAD_CODE_SEEDS, "dead_code_seed")
        if not beta >= 0.0 or not codebook_weight >= 0.0:
            raise ValueError(
                f"ProductQuantizer: beta and codebook_weight must be >= 0, got {beta}, {codebook_weight}"
            )
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ProductQuantizer: decay must be in [0, 1], got {decay}")
        if not eps > 0.0:
            raise ValueError(f"ProductQuantizer: eps must be > 0 (Laplace smoothing), got {eps}")
        if int(kmeans_iters) < 0 or int(dead_code_steps) < 0:
            raise ValueError(
                f"ProductQuantizer: kmeans_iters and dead_code_steps must be >= 0, got {kmeans_iters}, {dead_code_steps}"
            )

        self.dim = dim
        self.num_subspaces = num_subspaces
        self.codebook_size = codebook_size
        self.subspace_dim = dim // num_subspaces
        self.channel_dim = channel_dim
        self.beta = float(beta)
        self.codebook_weight = float(codebook_weight)
        self.decay = float(decay)
        self.eps = float(eps)
        self.kmeans_iters = int(kmeans_iters)
        self.dead_code_steps = int(dead_code_steps)
        self.process_group = process_group
        self.metric = "dot" if self.normalize == "l2" else "l2"

        M, K, Ds = num_subspaces, codebook_size, self.subspace_dim
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
        # Python mirror of ``initialized`` once seen True; a loaded state dict may say otherwise.
        self._init_checked = False
        self.register_load_state_dict_post_hook(_recheck_initialized)

    @classmethod
    def equss(
        cls, dim: int = 1024, num_subspaces: int = 32, codebook_size: int = 256, **kwargs
    ) -> ProductQuantizer:
        """The EQUSS head (spec §4): ``[B, D, H, W]`` input, l2, raw output, ``param``, β 0.25, xavier init."""
        config = dict(
            channel_dim=1,
            normalize="l2",
            output="raw",
            learning="param",
            beta=0.25,
            codebook_weight=1.0,
            init="xavier",
            dead_code_steps=0,
        )
        config.update(kwargs)
        return cls(dim, num_subspaces, codebook_size, **config)

    def extra_repr(self) -> str:
        parts = [
            f"dim={self.dim}, num_subspaces={self.num_subspaces}, codebook_size={self.codebook_size}, "
            f"subspace_dim={self.subspace_dim}, channel_dim={self.channel_dim}",
            f"normalize={self.normalize!r} (metric {self.metric!r}), output={self.output!r}, learning={self.learning!r}",
            f"beta={self.beta}"
            + (f", codebook_weight={self.codebook_weight}" if self.learning == "param" else ""),
        ]
        if self.learning == "ema":
            parts.append(f"decay={self.decay}, eps={self.eps}, ema_sums={self.ema_sums!r}")
        parts.append(
            f"init={self.init!r}" + (f", kmeans_iters={self.kmeans_iters}" if self.init == "kmeans" else "")
        )
        if self.dead_code_steps > 0:
            parts.append(f"dead_code_steps={self.dead_code_steps}, dead_code_seed={self.dead_code_seed!r}")
        else:
            parts.append("dead_code_steps=0 (off)")
        return ",\n".join(parts)

    # ----------------------------------------------------------------------------------------- layout
    def _channel_axis(self, t: Tensor, what: str) -> int:
        if t.dim() < 1:
            raise ValueError(f"ProductQuantizer: {what} must have at least 1 dimension, got a scalar")
        if not -t.dim() <= self.channel_dim < t.dim():
            raise ValueError(
                f"ProductQuantizer: channel_dim={self.channel_dim} is out of range for {what} of shape {tuple(t.shape)}"
            )
        return self.channel_dim % t.dim()

    def _flatten(self, x: Tensor) -> tuple[Tensor, tuple[int, ...], int]:
        """``x`` (channel dim ``D`` anywhere) → ``[N, M, Ds]``, the other dims, and the channel axis."""
        if not isinstance(x, Tensor):
            raise TypeError(f"ProductQuantizer: input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"ProductQuantizer: input must be a float tensor, got {x.dtype} (shape {tuple(x.shape)})"
            )
        axis = self._channel_axis(x, "the input")
        if x.shape[axis] != self.dim:
            raise ValueError(
                f"ProductQuantizer: input of shape {tuple(x.shape)} has {x.shape[axis]} channels in dim {self.channel_dim}, "
                f"expected dim={self.dim}"
            )
        xl = x.movedim(axis, -1)
        lead = tuple(xl.shape[:-1])
        return xl.reshape(-1, self.num_subspaces, self.subspace_dim), lead, axis

    def _unflatten(self, t: Tensor, lead: tuple[int, ...], axis: int) -> Tensor:
        """``[N, M, Ds]`` → the input layout, or ``[N, M]`` codes → the input layout with M channels."""
        width = self.dim if t.dim() == 3 else self.num_subspaces
        return t.reshape(*lead, width).movedim(-1, axis)

    # ------------------------------------------------------------------------------------------ spaces
    def _to_assign_space(self, v: Tensor) -> Tensor:
        return F.normalize(v, dim=-1, eps=_NORM_EPS) if self.normalize == "l2" else v

    def _assign(self, x_hat: Tensor, codebooks: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return pq_assign(x_hat.detach(), self._to_assign_space(codebooks.detach()), self.metric)

    def _world(self) -> int:
        return D.world_size(self.process_group)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> PQOutput:
        """Quantize ``x`` (``D`` channels in ``channel_dim``); see the class docstring.

        Returns:
            :class:`PQOutput` ``(quantized, codes, loss, stats)``.
        """
        flat, lead, axis = self._flatten(x)
        out_dtype = x.dtype
        # Assignment, loss and EMA in fp32 (or fp64 for fp64 inputs) whatever autocast says: bf16 distances
        # flip near-tie assignments and bf16 EMA sums lose the small per-step contributions.
        compute = torch.promote_types(torch.promote_types(flat.dtype, torch.float32), self.codebooks.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = flat.to(compute)
            x_hat = _L2Normalize.apply(xf) if self.normalize == "l2" else xf
            training = self.training
            if training and not self._init_checked:
                if not bool(self.initialized):  # a device sync, so only until it has been seen True
                    self._initialize(xf.detach(), x_hat.detach())
                self._init_checked = True

            codes, min_dist = self._assign(x_hat, self.codebooks)
            c = pq_gather(codes, self.codebooks, check_range=False).to(compute)
            c_out = F.normalize(c, dim=-1, eps=_NORM_EPS) if self.output == "normalized" else c
            codebook_weight = self.codebook_weight if self.learning == "param" else 0.0
            quantized, loss = _StraightThroughVQ.apply(x_hat, c_out, codebook_weight, self.beta)
            loss = loss.float()

            with torch.no_grad():
                if training and self.learning == "ema":
                    counts = self._ema_step(xf if self.ema_sums == "raw" else x_hat, codes)
                else:
                    counts = self._counts(codes)
                    if training:
                        D.all_reduce_sum_(counts, group=self.process_group)
                reseeded = torch.zeros((), dtype=torch.int64, device=x.device)
                if training:
                    self.total_counts += counts.to(torch.int64)
                    if self.dead_code_steps > 0:
                        target = (
                            x_hat if self.learning == "param" else (xf if self.ema_sums == "raw" else x_hat)
                        )
                        reseeded = self._expire_dead_codes(counts, target.detach(), min_dist)
                stats = self._stats(counts, reseeded)

        quantized = self._unflatten(quantized.to(out_dtype), lead, axis)
        return PQOutput(quantized, self._unflatten(codes, lead, axis), loss, stats)

    def _counts(self, codes: Tensor) -> Tensor:
        """``[M, K]`` float32 histogram of ``codes [N, M]`` (one bincount over subspace-offset codes)."""
        M, K = self.num_subspaces, self.codebook_size
        offsets = torch.arange(M, device=codes.device, dtype=torch.int64) * K
        flat = (codes.long() + offsets).reshape(-1)
        # scatter_add instead of bincount: bincount reads max(codes) back to size its output (a device sync).
        # Float atomics adding 1.0 are exact up to 2^24 per codeword.
        counts = torch.zeros(M * K, dtype=torch.float32, device=codes.device)
        return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32)).reshape(M, K)

    def _ema_step(self, x_sum: Tensor, codes: Tensor) -> Tensor:
        """One EMA update from this step's vectors; returns the (global) counts ``[M, K]``."""
        x_sum = x_sum.detach()
        if self._world() == 1:
            return pq_ema_update_(
                x_sum, codes, self.cluster_size, self.embed_sum, self.codebooks, self.decay, self.eps,
                check_range=False,  # codes come straight from pq_assign: no device sync for a range check
            )
        counts, sums = pq_cluster_stats(x_sum, codes, self.codebook_size, check_range=False)
        D.all_reduce_sum_(counts, sums, group=self.process_group)
        pq_ema_apply_(counts, sums, self.cluster_size, self.embed_sum, self.codebooks, self.decay, self.eps)
        return counts

    def _stats(self, counts: Tensor, reseeded: Tensor) -> PQStats:
        usage_per_subspace = (counts > 0).float().mean(dim=1)
        p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
        perplexity = torch.special.entr(p).sum(dim=1).exp()
        return PQStats(usage_per_subspace.mean(), usage_per_subspace, perplexity, counts, reseeded)

    # ----------------------------------------------------------------------------------------- decode
    def codes_to_output(self, codes: Tensor) -> Tensor:
        """Decode stored codes into the layer's output value (raw or normalised codewords), no grad needed.

        Args:
            codes: int32/int64 codes in the layout :meth:`forward` returns (``M`` in ``channel_dim``).

        Returns:
            The quantized tensor in the input layout (``D`` in ``channel_dim``), dtype of the codebooks.
        """
        if not isinstance(codes, Tensor) or codes.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"ProductQuantizer.codes_to_output: codes must be an int32/int64 tensor, got "
                f"{getattr(codes, 'dtype', type(codes).__name__)}"
            )
        axis = self._channel_axis(codes, "codes")
        if codes.shape[axis] != self.num_subspaces:
            raise ValueError(
                f"ProductQuantizer.codes_to_output: codes of shape {tuple(codes.shape)} have {codes.shape[axis]} entries in "
                f"dim {self.channel_dim}, expected num_subspaces={self.num_subspaces}"
            )
        cl = codes.movedim(axis, -1)
        lead = tuple(cl.shape[:-1])
        c = pq_gather(cl.reshape(-1, self.num_subspaces), self.codebooks)
        if self.output == "normalized":
            c = F.normalize(c, dim=-1, eps=_NORM_EPS)
        return self._unflatten(c, lead, axis)

    # ------------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def _initialize(self, xf: Tensor, x_hat: Tensor) -> None:
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
            ca = self._to_assign_space(centers.float()).permute(1, 2, 0)  # [M, Ds, L]
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
            codes, _ = pq_assign(xa, self._to_assign_space(centroids).to(xa.dtype), self.metric)
            counts, sums = pq_cluster_stats(xu, codes, K)
            D.all_reduce_sum_(counts, sums, group=self.process_group)
            if iters == 0:
                break
            means = sums / counts.clamp_min(1.0).unsqueeze(-1)
            centroids = torch.where((counts > 0).unsqueeze(-1), means, centroids)
        return centroids, counts

    # ------------------------------------------------------------------------------------ dead codes
    def _expire_dead_codes(self, counts: Tensor, target: Tensor, min_dist: Tensor) -> Tensor:
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

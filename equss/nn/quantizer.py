"""``ProductQuantizer``: a drop-in product-quantization layer over the fused ``equss.ops`` PQ ops.

The feature dimension ``D`` of the input is split into ``M`` contiguous sub-vectors of ``Ds = D / M``
channels (sub-vector ``m`` holds channels ``m·Ds … (m+1)·Ds − 1``, like ``torch.chunk``); each is
replaced by the nearest of the ``K`` codewords of its own codebook. All ``M`` subspaces are handled by
one call of the fused op ``pq_assign_gather`` (assignment, gather, squared error and the step's
statistics in one pass over the input; then ``pq_ema_apply_`` for EMA codebooks): there
is no Python loop over ``M``.

Shapes (glossary in docs/method.md): ``N`` vectors, ``M`` subspaces, ``K`` codewords, ``Ds`` subspace dim.
Internally ``x: [N, M, Ds]``, ``codebooks: [M, K, Ds]``, ``codes: [N, M]``.

The EQUSS paper's quantization head (docs/method.md §4) is the default configuration, see
:meth:`ProductQuantizer.equss`.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from equss.nn import distributed as D
from equss.nn.codebook import NORM_EPS, PQCodebook, choice
from equss.ops import pq_assign_gather, pq_gather

__all__ = ["PQOutput", "PQStats", "ProductQuantizer"]

NORMALIZE = ("l2", "none")
OUTPUTS = ("raw", "normalized")
ON_INVALID = ("skip", "raise")
_NORM_EPS = NORM_EPS
# State-dict entries that moved into the ``codebook`` submodule (checkpoint format 1 had them here).
_CODEBOOK_STATE = ("codebooks", "cluster_size", "embed_sum", "initialized", "total_counts", "steps_unused",
                   "num_reseeded")


class PQStats(NamedTuple):
    """Per-step codebook statistics (no grad). In training they are global over all ranks; in eval local.

    Attributes:
        usage: scalar, fraction of the ``K`` codewords used this step, averaged over the ``M`` subspaces.
        usage_per_subspace: ``[M]``, the same per subspace.
        perplexity: ``[M]``, ``exp(entropy)`` of this step's code histogram per subspace (``K`` = uniform use).
        counts: ``[M, K]`` float32, this step's assignments per codeword (valid sub-vectors only).
        num_reseeded: scalar int64, dead codewords re-seeded in this step (0 outside training).
        num_invalid: scalar int64, input sub-vectors (of the ``N·M``) that were not finite this step: they
            got code 0, took no part in the loss, the gradient or any codebook update (``on_invalid``).
    """

    usage: Tensor
    usage_per_subspace: Tensor
    perplexity: Tensor
    counts: Tensor
    num_reseeded: Tensor
    num_invalid: Tensor


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


def _recheck_initialized(module: ProductQuantizer, incompatible_keys) -> None:
    module._init_checked = False


def _move_codebook_state(state_dict, prefix, *args) -> None:
    """Load a state dict of checkpoint format 1, whose codebook tensors sat on the quantizer itself."""
    for name in _CODEBOOK_STATE:
        old = prefix + name
        if old in state_dict and prefix + "codebook." + name not in state_dict:
            state_dict[prefix + "codebook." + name] = state_dict.pop(old)


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
    """Straight-through output and the VQ loss, from the squared errors the fused op already computed.

    Inputs: ``x̂ [N, M, Ds]``, the gathered codewords ``c [N, M, Ds]`` (differentiable w.r.t. the
    codebooks through ``pq_assign_gather``), their squared errors ``sq_err [N, M]`` and ``valid [N, M]``
    (the sub-vectors with a finite norm; the others take no part in the loss or the gradient).

    Forward: ``q = c`` (the same values, no copy) and ``loss = (w_c + w_x)·Σ_valid sq_err / n`` with
    ``n = Ds·#valid``, summed in float64 (an fp32 sum of 800k terms loses ~1e-5 relative; the value then
    matches ``F.mse_loss`` to ~1e-8).
    Backward, with ``d = c − x̂`` on the valid sub-vectors and 0 elsewhere:
    ``∂/∂x̂ = g_q − 2·w_x·g_loss·d/n`` and ``∂/∂c = 2·w_c·g_loss·d/n``.

    This is exactly ``q = x̂ + (c − x̂).detach()`` with ``w_c·mse(c, x̂.detach()) + w_x·mse(x̂, c.detach())``
    (the authors' formulation; ``w_c = 0`` for EMA codebooks), but the forward makes no pass over the
    N·D elements (the op wrote ``sq_err``) and ``d`` is formed once, in backward.
    """

    @staticmethod
    def forward(ctx, x_hat: Tensor, c: Tensor, sq_err: Tensor, valid: Tensor, w_c: float, w_x: float):
        n = (valid.sum() * x_hat.shape[-1]).clamp_min(1).to(torch.float64)
        total = torch.where(valid, sq_err, 0.0).sum(dtype=torch.float64)
        loss = (total * (w_c + w_x) / n).to(torch.float32)
        ctx.save_for_backward(x_hat, c, valid, n)
        ctx.w_c, ctx.w_x = w_c, w_x
        return c.detach(), loss

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_loss: Tensor):
        x_hat, c, valid, n = ctx.saved_tensors
        d = torch.where(valid.unsqueeze(-1), c - x_hat, 0.0)
        g = grad_loss.to(torch.float64) / n  # the scales are formed in float64 and rounded once
        grad_x = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(grad_q, d, (-2.0 * ctx.w_x * g).to(d.dtype))
        if ctx.needs_input_grad[1]:
            grad_c = d * (2.0 * ctx.w_c * g).to(d.dtype)
        return grad_x, grad_c, None, None, None, None


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
        on_invalid: what a non-finite input sub-vector does: ``"skip"`` (default) gives it code 0 and leaves it
            out of the loss, the gradient and every codebook update (counted in ``stats.num_invalid``);
            ``"raise"`` raises ``FloatingPointError`` (one device sync per step).
        process_group: the group to synchronise over (default: the world group).

    Example::

        pq = ProductQuantizer(1024, 32, 256, channel_dim=1)   # the EQUSS head, [B, 1024, H, W] input
        out = pq(z)
        loss = task_loss(out.quantized) + out.loss
    """

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
        on_invalid: str = "skip",
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
        self.normalize = choice(normalize, NORMALIZE, "normalize")
        self.output = choice(output, OUTPUTS, "output")
        self.on_invalid = choice(on_invalid, ON_INVALID, "on_invalid")
        if not beta >= 0.0 or not codebook_weight >= 0.0:
            raise ValueError(
                f"ProductQuantizer: beta and codebook_weight must be >= 0, got {beta}, {codebook_weight}"
            )
        self.dim = dim
        self.num_subspaces = num_subspaces
        self.codebook_size = codebook_size
        self.subspace_dim = dim // num_subspaces
        self.channel_dim = channel_dim
        self.beta = float(beta)
        self.codebook_weight = float(codebook_weight)
        self.process_group = process_group
        self.metric = "dot" if self.normalize == "l2" else "l2"
        self.codebook = PQCodebook(
            num_subspaces, codebook_size, self.subspace_dim, learning=learning, normalize=self.normalize,
            decay=decay, eps=eps, ema_sums=ema_sums, init=init, kmeans_iters=kmeans_iters,
            dead_code_steps=dead_code_steps, dead_code_seed=dead_code_seed, process_group=process_group,
        )
        self.learning = self.codebook.learning
        # Python mirror of ``initialized`` once seen True; a loaded state dict may say otherwise.
        self._init_checked = False
        self._register_load_state_dict_pre_hook(_move_codebook_state)
        self.register_load_state_dict_post_hook(_recheck_initialized)

    @property
    def codebooks(self) -> Tensor:
        """``[M, K, Ds]`` codewords (``self.codebook.codebooks``; a parameter for ``learning="param"``)."""
        return self.codebook.codebooks

    def __setattr__(self, name: str, value) -> None:
        # ``pq.codebooks -= step`` assigns the (in-place updated) tensor back; nn.Module would try to
        # register it as a new parameter. Anything but that same tensor would silently detach the
        # codebooks from their optimiser.
        if name == "codebooks":
            if value is not self.codebook.codebooks:
                raise AttributeError(
                    "ProductQuantizer.codebooks cannot be replaced; update it in place (pq.codebooks.copy_(values))"
                )
            return
        super().__setattr__(name, value)

    @classmethod
    def equss(
        cls, dim: int = 1024, num_subspaces: int = 32, codebook_size: int = 256, **kwargs
    ) -> ProductQuantizer:
        """The EQUSS head: ``[B, D, H, W]`` input (``channel_dim=1``); every other default is the paper's."""
        return cls(dim, num_subspaces, codebook_size, **{"channel_dim": 1, **kwargs})

    def extra_repr(self) -> str:
        parts = [
            f"dim={self.dim}, num_subspaces={self.num_subspaces}, codebook_size={self.codebook_size}, "
            f"subspace_dim={self.subspace_dim}, channel_dim={self.channel_dim}",
            f"normalize={self.normalize!r} (metric {self.metric!r}), output={self.output!r}",
            f"beta={self.beta}" + (f", codebook_weight={self.codebook_weight}" if self.learning == "param" else ""),
        ]
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
        # (meta/fake tensors have no autocast: nothing to disable there)
        no_autocast = (
            torch.autocast(device_type=x.device.type, enabled=False)
            if torch.amp.is_autocast_available(x.device.type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            xf = flat.to(compute)
            x_hat = _L2Normalize.apply(xf) if self.normalize == "l2" else xf
            training = self.training
            # Shape-only tensors (meta, fake) carry no data to initialise from: they skip the check.
            if training and not self._init_checked and xf.device.type != "meta" and not is_fake(xf):
                if not bool(self.codebook.initialized):  # a device sync, so only until it has been seen True
                    self.codebook.initialize_(xf.detach(), x_hat.detach())
                self._init_checked = True

            cb = self.codebook
            ema = training and self.learning == "ema"
            # The codewords the output takes (differentiable for "param") and those the distances use.
            c_src = cb.codebooks.to(compute)
            c_out_book = F.normalize(c_src, dim=-1, eps=_NORM_EPS) if self.output == "normalized" else c_src
            codes, min_dist, c_out, sq_err, counts, sums = pq_assign_gather(
                x_hat.detach(),
                cb.assign_space(cb.codebooks.detach()).to(compute),
                self.metric,
                codebooks_out=c_out_book,
                stats_x=cb.update_target(xf, x_hat).detach() if ema else None,
            )
            valid = ~torch.isnan(min_dist)  # the sub-vectors with a finite norm (ops/reference.py)
            codebook_weight = self.codebook_weight if self.learning == "param" else 0.0
            quantized, loss = _StraightThroughVQ.apply(x_hat, c_out, sq_err, valid, codebook_weight, self.beta)

            with torch.no_grad():
                num_invalid = (~valid).sum()
                if self.on_invalid == "raise" and bool(num_invalid > 0):  # a device sync, only when asked
                    raise FloatingPointError(
                        f"ProductQuantizer: {int(num_invalid)} of {valid.numel()} input sub-vectors are not "
                        f"finite (NaN/inf); on_invalid='skip' leaves them out of the loss and codebook updates"
                    )
                if ema:
                    counts = cb.ema_update_(counts, sums)
                elif training:
                    D.all_reduce_sum_(counts, group=self.process_group)
                reseeded = torch.zeros((), dtype=torch.int64, device=x.device)
                if training:
                    cb.total_counts += counts.to(torch.int64)
                    if cb.dead_code_steps > 0:
                        reseeded = cb.expire_dead_codes_(counts, cb.update_target(xf, x_hat).detach(), min_dist)
                stats = self._stats(counts, reseeded, num_invalid)

        quantized = self._unflatten(quantized.to(out_dtype), lead, axis)
        return PQOutput(quantized, self._unflatten(codes, lead, axis), loss, stats)

    def _stats(self, counts: Tensor, reseeded: Tensor, num_invalid: Tensor) -> PQStats:
        usage_per_subspace = (counts > 0).float().mean(dim=1)
        p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
        perplexity = torch.special.entr(p).sum(dim=1).exp()
        return PQStats(usage_per_subspace.mean(), usage_per_subspace, perplexity, counts, reseeded, num_invalid)

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

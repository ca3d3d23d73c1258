"""Frozen self-supervised backbones: DINO ViTs through timm, local DINO checkpoints, the demo backbone.

EQUSS (and STEGO before it) never trains the backbone: it is a fixed feature extractor. The feature of an
image is the output of the **last** transformer block passed through the model's final LayerNorm,
patch tokens only (the CLS token is dropped), reshaped to a feature map::

    images [B, 3, H, W]  (ImageNet-normalised, H and W multiples of the patch size p)
      -> features [B, C, H/p, W/p]      C = 384 (ViT-S) or 768 (ViT-B), p = 8 or 16

``build_backbone(name, weights)`` returns a :class:`FrozenBackbone` whose parameters never require grad,
which is always in eval mode (a parent's ``.train()`` cannot switch it back) and which runs under
``torch.no_grad()``.

Weights
-------
``weights="default"``
    timm's pretrained weights from the Hugging Face hub (``vit_small_patch8_224.dino`` etc.), or from the
    local hub cache when offline. Note: for ViT-S/8 timm ships DINO's 800-epoch
    ``dino_deitsmall8_pretrain.pth``, whereas STEGO and the EQUSS authors use
    ``dino_deitsmall8_300ep_pretrain.pth``; pass that file as a path to reproduce their numbers.
a path
    A local checkpoint in one of DINO's formats (see :func:`load_dino_state_dict`), or a timm
    ``.safetensors`` file. Every weight must load: missing, unexpected or wrongly shaped keys are an error.
``None`` / ``"none"``
    Random initialisation, with a warning: features are then meaningless (tests, smoke runs).

Position embeddings at other resolutions
----------------------------------------
Training runs at 224×224 and evaluation at 320×320, so the position embeddings (a 28×28 grid for
ViT-*/8 at 224) are resampled on the fly to the input's grid. ``pos_embed_interp="dino"`` (default)
does it exactly as DINO's ``interpolate_pos_encoding``, which STEGO and the EQUSS authors' code use:
bicubic ``F.interpolate`` with ``scale_factor = (grid + 0.1) / sqrt(N)`` (a = -0.75, no antialias).
``"timm"`` uses timm's ``dynamic_img_size`` resampling (bicubic to an exact size with ``antialias=True``,
i.e. the a = -0.5 kernel): slightly different values at 320, identical at 224.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FrozenBackbone",
    "DinoViTFeatures",
    "build_backbone",
    "load_dino_state_dict",
    "dino_interpolate_pos_embed",
]


@dataclass(frozen=True)
class BackboneSpec:
    """One supported backbone: its timm model, patch size, width and official checkpoint.

    ``native_img_size``: the image size of the official position-embedding grid (224 for DINO, 518 for
    DINOv2): the model keeps that grid and resamples it to each input's grid on the fly, as the official
    code does.
    """

    timm_name: str
    patch_size: int
    embed_dim: int
    dino_checkpoint: str  # official file name
    family: str = "dino"  # "dino" (DINO v1, facebookresearch/dino) | "dinov2" (facebookresearch/dinov2)
    native_img_size: int = 224

    @property
    def dino_url(self) -> str:
        stem = self.dino_checkpoint.removesuffix(".pth")
        if self.family == "dinov2":
            model = stem.removesuffix("_pretrain").removesuffix("_reg4")
            return f"https://dl.fbaipublicfiles.com/dinov2/{model}/{self.dino_checkpoint}"
        return f"https://dl.fbaipublicfiles.com/dino/{stem}/{self.dino_checkpoint}"


BACKBONES: dict[str, BackboneSpec] = {
    # ViT-S/8: STEGO and EQUSS use the 300-epoch checkpoint (timm's hub weights are the 800-epoch one).
    "vit_small_patch8": BackboneSpec(
        "vit_small_patch8_224.dino", 8, 384, "dino_deitsmall8_300ep_pretrain.pth"
    ),
    "vit_small_patch16": BackboneSpec("vit_small_patch16_224.dino", 16, 384, "dino_deitsmall16_pretrain.pth"),
    "vit_base_patch8": BackboneSpec("vit_base_patch8_224.dino", 8, 768, "dino_vitbase8_pretrain.pth"),
    "vit_base_patch16": BackboneSpec("vit_base_patch16_224.dino", 16, 768, "dino_vitbase16_pretrain.pth"),
    # DINOv2 (beyond the paper): patch 14, LayerScale, 518×518 native grid; "_reg4" = 4 register tokens.
    "vit_small_patch14_dinov2": BackboneSpec(
        "vit_small_patch14_dinov2.lvd142m", 14, 384, "dinov2_vits14_pretrain.pth", "dinov2", 518
    ),
    "vit_base_patch14_dinov2": BackboneSpec(
        "vit_base_patch14_dinov2.lvd142m", 14, 768, "dinov2_vitb14_pretrain.pth", "dinov2", 518
    ),
    "vit_small_patch14_reg4_dinov2": BackboneSpec(
        "vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, "dinov2_vits14_reg4_pretrain.pth", "dinov2", 518
    ),
    "vit_base_patch14_reg4_dinov2": BackboneSpec(
        "vit_base_patch14_reg4_dinov2.lvd142m", 14, 768, "dinov2_vitb14_reg4_pretrain.pth", "dinov2", 518
    ),
}
DEMO_NAME = "demo"

# Where DINO-style checkpoints nest the backbone weights, in order of preference: DINO's full training
# checkpoint holds both "teacher" and "student"; the teacher is the model DINO evaluates and releases.
_NESTING_KEYS = ("teacher", "state_dict", "model", "student")
# Prefixes added by DistributedDataParallel ("module."), DINO's MultiCropWrapper ("backbone.") and
# torch.compile ("_orig_mod."); stripped only at the start of a key.
_STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.")
# DINO's projection head (DINOHead) lives next to the backbone in full checkpoints; it is not part of
# the feature extractor. DINOv2's mask token is used only by its masked-image training objective.
_IGNORED_PREFIXES = ("head.", "dino_head.", "ibot_head.")
_IGNORED_KEYS = ("mask_token",)


# --------------------------------------------------------------------------------------------------
# The frozen wrapper
# --------------------------------------------------------------------------------------------------


class FrozenBackbone(nn.Module):
    """A frozen dense feature extractor: ``images [B, 3, H, W] -> features [B, C, H/p, W/p]``.

    Wraps ``model`` (any module with that contract) so that its parameters never require grad, it is in
    eval mode whatever its parent does, and its forward runs under ``torch.no_grad()``. Input is checked
    (4-D float with 3 channels, H and W multiples of ``patch_size``) before it reaches the model.

    Attributes:
        name: the backbone name given to :func:`build_backbone` (e.g. ``"vit_small_patch8"``).
        patch_size: p, the down-sampling factor of the feature map.
        embed_dim: C, the feature width.
        weights_id: where the weights came from (``"timm-hub:<model>"``, ``"file:<path>"``,
            ``"random-init"``, ...); informational, the feature cache fingerprints the tensors themselves.
    """

    def __init__(self, model: nn.Module, *, name: str, patch_size: int, embed_dim: int, weights_id: str):
        super().__init__()
        self.model = model
        self.name = name
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.weights_id = weights_id
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Ignore ``mode``: the backbone stays in eval mode (no dropout/drop-path, fixed statistics)."""
        return super().train(False)

    def check_input(self, images: object) -> Tensor:
        """Raise ``TypeError``/``ValueError`` naming the shape unless ``images`` is a float [B, 3, H, W]."""
        if not isinstance(images, Tensor):
            raise TypeError(
                f"{self.name}: images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}"
            )
        shape = tuple(images.shape)
        if images.dim() != 4 or shape[1] != 3:
            raise ValueError(f"{self.name}: images must have shape [B, 3, H, W], got {shape}")
        if not images.is_floating_point():
            raise ValueError(
                f"{self.name}: images must be a float tensor, got {images.dtype} with shape {shape}"
            )
        h, w = shape[2], shape[3]
        p = self.patch_size
        if h == 0 or w == 0 or h % p or w % p:
            raise ValueError(
                f"{self.name}: image height and width must be positive multiples of the patch size {p}, "
                f"got shape {shape}"
            )
        return images

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` (ImageNet-normalised) -> ``features [B, C, H/p, W/p]``."""
        images = self.check_input(images)
        feats = self.model(images)
        expected = (
            images.shape[0],
            self.embed_dim,
            images.shape[2] // self.patch_size,
            images.shape[3] // self.patch_size,
        )
        if tuple(feats.shape) != expected:
            raise RuntimeError(
                f"{self.name}: the wrapped model returned shape {tuple(feats.shape)} for input "
                f"{tuple(images.shape)}, expected {expected}"
            )
        return feats

    def feature_config(self) -> dict[str, Any]:
        """Settings that determine the output besides the tensors (the feature cache hashes them).

        The wrapped model's own ``feature_config()`` if it has one, else its public attributes of simple
        type (e.g. the demo backbone's filter wavelengths).
        """
        model = self.model
        if callable(getattr(model, "feature_config", None)):
            model_config = model.feature_config()
        else:
            model_config = {
                k: v
                for k, v in sorted(vars(model).items())
                if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple))
            }
        return {
            "name": self.name,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_config": model_config,
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, weights={self.weights_id!r}"


# --------------------------------------------------------------------------------------------------
# DINO ViT through timm
# --------------------------------------------------------------------------------------------------


def dino_interpolate_pos_embed(
    pos_embed: Tensor, grid_h: int, grid_w: int, num_prefix_tokens: int = 1
) -> Tensor:
    """Resample ViT position embeddings to a ``grid_h × grid_w`` patch grid exactly as DINO does.

    Mirrors ``VisionTransformer.interpolate_pos_encoding`` of DINO's ``vision_transformer.py`` (also used
    by STEGO and EQUSS): unchanged when the grid has the stored number of patches and is square, else a
    bicubic ``F.interpolate`` of the square stored grid with ``scale_factor = (grid + 0.1) / sqrt(N)``
    (the 0.1 guards against the floor in the output size; it also shifts the sampling positions slightly,
    which is why this differs from resampling to an exact size).

    Args:
        pos_embed: ``[1, num_prefix_tokens + N, C]`` with N a square number.
        grid_h, grid_w: the input's patch grid (H/p, W/p).
    Returns:
        ``[1, num_prefix_tokens + grid_h·grid_w, C]`` in the dtype of ``pos_embed`` (interpolated in fp32).
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"pos_embed must hold a square grid of patches, got shape {tuple(pos_embed.shape)}")
    if grid_h * grid_w == n and grid_h == grid_w:
        return pos_embed
    dim = pos_embed.shape[-1]
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = patch.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    if tuple(grid.shape[-2:]) != (grid_h, grid_w):
        raise RuntimeError(
            f"position-embedding interpolation gave grid {tuple(grid.shape[-2:])}, wanted {(grid_h, grid_w)}"
        )
    patch = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    return torch.cat((prefix, patch), dim=1)


class DinoViTFeatures(nn.Module):
    """A timm ``VisionTransformer`` returning dense last-block features ``[B, C, H/p, W/p]``.

    ``vit`` must be created with ``dynamic_img_size=True`` (its patch embedding then emits NHWC and
    accepts any multiple of the patch size). Tokens: last block, after ``vit.norm``, prefix (CLS) tokens
    dropped. ``pos_embed_interp`` selects DINO's or timm's position-embedding resampling (module docstring).
    """

    def __init__(self, vit: nn.Module, pos_embed_interp: str = "dino"):
        super().__init__()
        if pos_embed_interp not in ("dino", "timm"):
            raise ValueError(f"pos_embed_interp must be 'dino' or 'timm', got {pos_embed_interp!r}")
        if not getattr(vit, "dynamic_img_size", False):
            raise ValueError("the timm ViT must be created with dynamic_img_size=True")
        embeds_class = not getattr(vit, "no_embed_class", False)
        if pos_embed_interp == "dino" and embeds_class and vit.num_prefix_tokens != 1:
            raise ValueError(
                "pos_embed_interp='dino' needs one CLS token embedded with the patches, or prefix tokens "
                "outside the position embedding (no_embed_class, as DINOv2 with registers)"
            )
        self.vit = vit
        self.pos_embed_interp = pos_embed_interp
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)

    def feature_config(self) -> dict[str, Any]:
        """The settings that change the features without changing a tensor (hashed by the feature cache)."""
        vit = self.vit
        return {
            "timm_architecture": getattr(vit, "pretrained_cfg", {}).get(
                "architecture", type(vit).__qualname__
            ),
            "pos_embed_interp": self.pos_embed_interp,
            "num_prefix_tokens": int(vit.num_prefix_tokens),
        }

    def forward_tokens(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` -> all tokens after the final norm ``[B, prefix + H/p·W/p, C]``."""
        vit = self.vit
        if self.pos_embed_interp == "timm":
            return vit.forward_features(images)
        # timm's forward_features with DINO's position embedding in place of timm's _pos_embed.
        x = vit.patch_embed(images)  # [B, h, w, C] (NHWC because of dynamic_img_size)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        prefix = [vit.cls_token.expand(b, -1, -1).to(x.dtype)]
        if getattr(vit, "no_embed_class", False):
            # DINOv2 with registers (as timm converts it): the position embedding covers the patches only;
            # the CLS token already holds its position, the registers have none.
            x = x + dino_interpolate_pos_embed(vit.pos_embed, h, w, num_prefix_tokens=0).to(x.dtype)
            if getattr(vit, "reg_token", None) is not None:
                prefix.append(vit.reg_token.expand(b, -1, -1).to(x.dtype))
            x = torch.cat([*prefix, x], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1)
            x = x + dino_interpolate_pos_embed(vit.pos_embed, h, w).to(x.dtype)
        x = vit.pos_drop(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` -> ``features [B, C, H/p, W/p]``."""
        b, _, h, w = images.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        tokens = self.forward_tokens(images)[:, self.vit.num_prefix_tokens :]
        return tokens.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------------


def _read_checkpoint(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    # DINO's full training checkpoints also store the argparse Namespace of the run ("args"); allow
    # exactly that class on top of the tensors-only unpickler, nothing else.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"could not read checkpoint {str(path)!r} as a tensors-only torch file "
                f"({type(err).__name__}: {err}). Expected a DINO .pth (state dict or training checkpoint) "
                "or a timm .safetensors file."
            ) from err


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def load_dino_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a DINO-format checkpoint and return the backbone weights in DINO's (= timm's) key names.

    Accepted layouts (DINO's ``vision_transformer.py`` names: ``cls_token``, ``pos_embed``,
    ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``,
    which coincide with timm's ``VisionTransformer``):

    * a plain state dict, as in DINO's released ``dino_deitsmall8_300ep_pretrain.pth`` etc.;
    * a training checkpoint with the weights nested under ``teacher`` (preferred), ``state_dict``,
      ``model`` or ``student``, keys prefixed by ``module.`` (DDP) and/or ``backbone.`` (MultiCropWrapper);
    * a ``.safetensors`` file (timm's hub format).

    DINOv2's official checkpoints (``dinov2_vits14_pretrain.pth``, ``..._reg4_pretrain.pth`` and the ViT-B
    ones) use the same names plus ``ls1.gamma``/``ls2.gamma`` (LayerScale, as timm), ``mask_token``
    (dropped: training only) and, with registers, ``register_tokens`` (converted to timm's layout: see
    the code). Keys of DINO's projection heads (``head.*``, ``dino_head.*``, ``ibot_head.*``) are dropped.
    Nothing else is renamed or dropped: the caller checks the result against the model.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no recognisable state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {str(path)!r}")
    ckpt = _read_checkpoint(path)
    state = ckpt
    if not _is_state_dict(state):
        nested = [k for k in _NESTING_KEYS if isinstance(ckpt, Mapping) and _is_state_dict(ckpt.get(k))]
        if not nested:
            top = sorted(map(str, ckpt.keys()))[:20] if isinstance(ckpt, Mapping) else type(ckpt).__name__
            raise ValueError(
                f"checkpoint {str(path)!r} is neither a state dict nor a checkpoint with one under "
                f"{list(_NESTING_KEYS)}; top-level content: {top}"
            )
        state = ckpt[nested[0]]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        if key.startswith(_IGNORED_PREFIXES) or key in _IGNORED_KEYS:
            continue
        if key in out:
            raise ValueError(
                f"checkpoint {str(path)!r}: key {key!r} occurs twice after stripping prefixes {_STRIP_PREFIXES}"
            )
        out[key] = value
    if "register_tokens" in out:
        # DINOv2 with registers → timm's no_embed_class layout: the CLS token absorbs its position
        # embedding, the position embedding keeps the patches', the registers are timm's reg_token.
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def _fit_pos_embed(state: dict[str, Tensor], vit: nn.Module) -> None:
    """Resample a checkpoint's pos_embed to the model's grid when ``img_size`` differs from 224."""
    src = state.get("pos_embed")
    if (
        src is None
        or src.shape == vit.pos_embed.shape
        or src.dim() != 3
        or src.shape[-1] != vit.pos_embed.shape[-1]
    ):
        return  # absent or a width mismatch: reported by the key/shape check
    from timm.layers import resample_abs_pos_embed

    state["pos_embed"] = resample_abs_pos_embed(
        src, new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=vit.num_prefix_tokens
    )


def _load_checked(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``load_state_dict`` that fails with the full list of missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if mis_shaped:
            parts.append(f"shape mismatches ({len(mis_shaped)}): {mis_shaped}")
        raise ValueError(f"checkpoint {source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------


def _weights_kind(weights: str | os.PathLike | None) -> str:
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return "none"
    if isinstance(weights, str) and weights == "default":
        return "default"
    if isinstance(weights, (str, os.PathLike)) and str(weights):
        return "path"
    raise TypeError(f"weights must be 'default', None/'none' or a checkpoint path, got {weights!r}")


def _warn_random(name: str) -> None:
    warnings.warn(
        f"backbone {name!r} is RANDOMLY INITIALISED (weights=None): its features, and any segmentation "
        "trained on them, are NOT meaningful. Use this only for tests and smoke runs; pass "
        "weights='default' or a DINO checkpoint path (--backbone-weights) for real results.",
        UserWarning,
        stacklevel=3,
    )


def _build_demo(weights: str | os.PathLike | None, kind: str) -> FrozenBackbone:
    from equss.models.demo_backbone import DemoBackbone  # lazy: written separately, optional here

    if kind == "path":
        raise ValueError(
            f"the demo backbone is a fixed filter bank without weights; got weights={str(weights)!r} "
            "(use 'default' or None)"
        )
    model = DemoBackbone()
    return FrozenBackbone(
        model, name=DEMO_NAME, patch_size=model.patch_size, embed_dim=model.embed_dim, weights_id=f"demo-fixed-v{model.version}"
    )


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = "default",
    device: str | torch.device = "cpu",
    img_size: int | None = None,
    pos_embed_interp: str = "dino",
) -> FrozenBackbone:
    """Build a frozen backbone: ``images [B, 3, H, W] -> features [B, C, H/p, W/p]``.

    Args:
        name: ``"vit_small_patch8"`` (DINO ViT-S/8), ``"vit_small_patch16"``, ``"vit_base_patch8"``,
            ``"vit_base_patch16"``, the DINOv2 ViTs ``"vit_small_patch14_dinov2"``,
            ``"vit_base_patch14_dinov2"`` and their ``_reg4_`` variants with registers, or ``"demo"`` (the
            small demo backbone of ``equss.models.demo_backbone``).
        weights: ``"default"`` (timm's DINO weights from the Hugging Face hub / its local cache), a path
            to a DINO checkpoint (plain state dict or training checkpoint, see
            :func:`load_dino_state_dict`) or a timm ``.safetensors`` file, or ``None``/``"none"`` for a
            random initialisation (warns). The demo backbone has no weights: ``"default"`` and ``None``
            both build it, a path is an error.
        device: where the model lives.
        img_size: the image size whose patch grid stores the position embeddings (default: the official
            checkpoint's, 224 for DINO and 518 for DINOv2; checkpoints of another grid are resampled once at
            load time). Inputs of any size that is a multiple of the patch size are accepted either way.
        pos_embed_interp: ``"dino"`` (default, DINO/STEGO/EQUSS behaviour) or ``"timm"``: how position
            embeddings are resampled for inputs whose grid differs from ``img_size``'s.

    Raises:
        ValueError: unknown name, or a checkpoint that does not match the model (lists the keys).
        FileNotFoundError: ``weights`` is a path that does not exist.
        RuntimeError: ``weights="default"`` and the hub weights cannot be fetched (e.g. offline).
    """
    kind = _weights_kind(weights)
    if name == DEMO_NAME:
        return _build_demo(weights, kind).to(device)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES) + [DEMO_NAME]}")
    spec = BACKBONES[name]
    img_size = spec.native_img_size if img_size is None else img_size
    if not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if img_size % spec.patch_size:
        raise ValueError(
            f"img_size {img_size} is not a multiple of the patch size {spec.patch_size} of {name!r}"
        )
    if kind == "path":  # fail on a wrong path before building anything
        state = load_dino_state_dict(weights)

    import timm  # lazy: importing timm takes seconds

    create = dict(num_classes=0, dynamic_img_size=True, img_size=img_size)
    if kind == "default":
        try:
            vit = timm.create_model(spec.timm_name, pretrained=True, **create)
        except Exception as err:
            raise RuntimeError(
                f"could not load the pretrained weights of {name!r} (timm model {spec.timm_name!r}) from the "
                f"Hugging Face hub or its local cache: {type(err).__name__}: {err}\n"
                f"Download DINO's checkpoint elsewhere ({spec.dino_url}) and pass its local path with "
                f"--backbone-weights (build_backbone(..., weights=PATH)); weights=None gives a random init."
            ) from err
        weights_id = f"timm-hub:{spec.timm_name}"
    else:
        # Every tensor is overwritten by a checkpoint (checked by _load_checked), so skip timm's init there.
        init = dict(weight_init="skip") if kind == "path" else {}
        vit = timm.create_model(spec.timm_name, pretrained=False, **create, **init)
        if kind == "path":
            _fit_pos_embed(state, vit)
            path = Path(weights).expanduser()
            _load_checked(vit, state, repr(str(path)))
            weights_id = f"file:{path.resolve()}"
        else:
            _warn_random(name)
            weights_id = "random-init"
    model = DinoViTFeatures(vit, pos_embed_interp=pos_embed_interp)
    return FrozenBackbone(
        model, name=name, patch_size=spec.patch_size, embed_dim=spec.embed_dim, weights_id=weights_id
    ).to(device)

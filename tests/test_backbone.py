"""Frozen backbones: shapes at 224 and 320, freezing, DINO checkpoint loading, errors.

Random-init models only (no hub access here). Expected features come from timm's own
``forward_features`` on the source model or from DINO's position-embedding formula written out below,
never from the code under test.
"""

from __future__ import annotations

import argparse
import math
import re
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from equss.models.backbone import BACKBONES, DinoViTFeatures, FrozenBackbone, build_backbone

# (name, timm model, patch size, width) as documented by DINO and timm.
VITS = [
    ("vit_small_patch8", "vit_small_patch8_224", 8, 384),
    ("vit_small_patch16", "vit_small_patch16_224", 16, 384),
    ("vit_base_patch8", "vit_base_patch8_224", 8, 768),
    ("vit_base_patch16", "vit_base_patch16_224", 16, 768),
]


def _build_random(name: str, **kw):
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        return build_backbone(name, weights=None, **kw)


@pytest.fixture(scope="module")
def vit_s16():
    """A random-init ViT-S/16 shared by the tests that do not modify it."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="NOT meaningful"):
        bb = build_backbone("vit_small_patch16", weights="none")  # the string form of None
    assert bb.weights_id == "random-init"
    return bb


def _timm_dense(vit: nn.Module, x: torch.Tensor, p: int) -> torch.Tensor:
    """Reference dense features: timm's forward_features, CLS dropped, tokens -> [B, C, H/p, W/p]."""
    with torch.no_grad():
        tok = vit.forward_features(x)[:, 1:]
    b, _, h, w = x.shape
    return tok.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ shapes


# The ViT-S/16 case runs in the quick loop; the larger or patch-8 ones (3-8 s each) are slow.
_VIT_CASES = [pytest.param(*v, marks=[] if v[0] == "vit_small_patch16" else [pytest.mark.slow], id=v[0]) for v in VITS]


@pytest.mark.parametrize("name,timm_name,p,c", _VIT_CASES)
def test_random_init_shapes_224_and_320(name, timm_name, p, c):
    torch.manual_seed(0)
    bb = _build_random(name)
    assert (bb.name, bb.patch_size, bb.embed_dim) == (name, p, c)
    assert BACKBONES[name].timm_name == f"{timm_name}.dino"
    assert bb.model.vit.pos_embed.shape == (1, 1 + (224 // p) ** 2, c)  # DINO's native 224 grid
    # ViT-B/8 is slow on a CPU (1600 tokens through 12 wide blocks at 320): only 320, batch 1. The
    # native-grid path at 224 is exercised by the three others.
    sizes = (320,) if name == "vit_base_patch8" else (224, 320)
    for size in sizes:
        f = bb(torch.randn(1, 3, size, size))
        assert f.shape == (1, c, size // p, size // p)
        assert f.dtype == torch.float32 and not f.requires_grad
        # After the final LayerNorm (random init: weight 1, bias 0) every token has zero mean, unit variance.
        assert f.mean(dim=1).abs().max() < 1e-4
        assert (f.var(dim=1, unbiased=False) - 1).abs().max() < 1e-2


def test_non_square_input_and_batch_consistency(vit_s16):
    bb = vit_s16
    x = torch.randn(3, 3, 64, 96)
    f = bb(x)
    assert f.shape == (3, 384, 4, 6)
    # Each image is processed independently of the others in the batch.
    torch.testing.assert_close(bb(x[1:2]), f[1:2], rtol=1e-5, atol=1e-5)


def test_matches_timm_forward_features_at_native_grid(vit_s16):
    """At the stored grid (224 for img_size=224) no interpolation happens: exactly timm's features."""
    bb = vit_s16
    vit = bb.model.vit
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(bb(x), _timm_dense(vit, x, 16))
    assert bb.model.pos_embed_interp == "dino"  # the default
    # The timm resampling option is timm's own forward at any size.
    bb_timm = FrozenBackbone(
        DinoViTFeatures(vit, pos_embed_interp="timm"), name="t", patch_size=16, embed_dim=384, weights_id=""
    )
    x320 = torch.randn(1, 3, 320, 320)
    assert torch.equal(bb_timm(x320), _timm_dense(vit, x320, 16))


def _dino_pos_embed_reference(pos_embed: torch.Tensor, h_img: int, w_img: int, p: int) -> torch.Tensor:
    """DINO's VisionTransformer.interpolate_pos_encoding (facebookresearch/dino, vision_transformer.py)."""
    npatch = (h_img // p) * (w_img // p)
    N = pos_embed.shape[1] - 1
    if npatch == N and w_img == h_img:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = h_img // p + 0.1, w_img // p + 0.1  # DINO unpacks (B, nc, w, h) = x.shape
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("h,w", [(320, 320), (64, 96)], ids=["320x320", "64x96"])
def test_dino_position_embedding_interpolation(vit_s16, h, w):
    bb = vit_s16
    vit = bb.model.vit
    x = torch.randn(1, 3, h, w)
    # Reference: DINO's prepare_tokens + blocks + norm, spelled out on the timm modules.
    with torch.no_grad():
        tok = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tok = torch.cat((vit.cls_token.expand(1, -1, -1), tok), dim=1)
        tok = tok + _dino_pos_embed_reference(vit.pos_embed, h, w, 16)
        for blk in vit.blocks:
            tok = blk(tok)
        tok = vit.norm(tok)[:, 1:]
    expected = tok.reshape(1, h // 16, w // 16, -1).permute(0, 3, 1, 2)
    got = bb(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # ... and it is not timm's resampling (different bicubic kernel and sampling positions).
    assert not torch.allclose(got, _timm_dense(vit, x, 16), atol=1e-4)


# ------------------------------------------------------------------------------------------------ frozen


def test_frozen_no_grad_and_stays_in_eval(vit_s16):
    bb = vit_s16
    assert all(not prm.requires_grad for prm in bb.parameters())
    assert not bb.training and not any(m.training for m in bb.modules())
    parent = nn.ModuleDict({"backbone": bb, "head": nn.Conv2d(384, 8, 1)})
    parent.train()
    assert parent["head"].training
    assert not bb.training and not any(m.training for m in bb.modules())
    bb.train(True)
    assert not any(m.training for m in bb.modules())
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    f = bb(x)
    assert not f.requires_grad and f.grad_fn is None
    # Eval mode means deterministic output (no dropout / drop-path).
    assert torch.equal(f, bb(x))


def test_demo_backbone_is_wrapped_frozen():
    bb = build_backbone("demo", weights="default")
    assert (bb.name, bb.patch_size) == ("demo", 8)
    x = torch.randn(2, 3, 32, 48)
    f = bb(x)
    assert f.shape == (2, bb.embed_dim, 4, 6)
    assert torch.equal(f, build_backbone("demo", weights=None)(x))  # no weights: None builds the same
    assert not any(m.training for m in bb.modules()) and not f.requires_grad
    with pytest.raises(ValueError, match="without weights"):
        build_backbone("demo", weights="some/checkpoint.pth")


# ------------------------------------------------------------------------------------------------ input errors


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((3, 32, 32), torch.float32),
        ((1, 1, 32, 32), torch.float32),
        ((1, 4, 32, 32), torch.float32),
        ((1, 3, 40, 32), torch.float32),
        ((1, 3, 32, 24), torch.float32),
        ((1, 3, 32, 32), torch.int64),
    ],
    ids=["3d", "1-channel", "4-channel", "H-not-multiple", "W-not-multiple", "int"],
)
def test_bad_input_raises_value_error_naming_shape(shape, dtype, vit_s16):
    bb = vit_s16
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=re.escape(str(tuple(shape)))):
        bb(x)


def test_non_tensor_input_raises_type_error(vit_s16):
    with pytest.raises(TypeError, match="torch.Tensor"):
        vit_s16([[0.0]])


def test_unknown_name_and_bad_weights_argument():
    with pytest.raises(ValueError, match="vit_small_patch8"):
        build_backbone("vit_tiny_patch4", weights=None)
    with pytest.raises(TypeError, match="weights"):
        build_backbone("vit_small_patch16", weights=3)


# ------------------------------------------------------------------------------------------------ checkpoints

# DINO's key names (facebookresearch/dino vision_transformer.py), written out independently of the code
# under test. Each timm key is renamed through this table; a timm key it does not cover fails the test.
_DINO_TOP = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_DINO_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def _timm_to_dino(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m:
            out[f"blocks.{m.group(1)}.{_DINO_BLOCK[m.group(2)]}"] = value.clone()
        else:
            out[_DINO_TOP[key]] = value.clone()
    return out


@pytest.fixture(scope="module")
def source_vit():
    torch.manual_seed(123)
    vit = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True
    ).eval()
    # Perturb the LayerNorms too, so a norm that failed to load would show.
    with torch.no_grad():
        for name, prm in vit.named_parameters():
            if "norm" in name:
                prm.add_(0.1 * torch.randn_like(prm))
    return vit


@pytest.fixture(scope="module")
def dino_state(source_vit):
    state = _timm_to_dino(source_vit.state_dict())
    assert len(state) == len(source_vit.state_dict()) == 4 + 2 + 12 * 12
    return state


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


def _dino_head_state() -> dict:
    return {
        "head.mlp.0.weight": torch.randn(32, 384),
        "head.mlp.0.bias": torch.randn(32),
        "head.last_layer.weight_g": torch.ones(16, 1),
        "head.last_layer.weight_v": torch.randn(16, 32),
    }


def _write_variants(state: dict, d) -> dict:
    plain = d / "dino_plain.pth"
    torch.save(state, plain)
    nested = d / "dino_full_checkpoint.pth"
    torch.save(
        {
            # DINO main_dino.py: teacher (MultiCropWrapper: backbone. + head.), student (DDP: module.backbone.)
            "teacher": {
                **{f"module.backbone.{k}": v for k, v in state.items()},
                **{f"module.{k}": v for k, v in _dino_head_state().items()},
            },
            "student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16),
        },
        nested,
    )
    teacher_only = d / "dino_teacher_backbone_prefix.pth"
    torch.save(
        {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **_dino_head_state()}}, teacher_only
    )
    return {"plain": plain, "teacher-module-backbone": nested, "teacher-backbone-head": teacher_only}


@pytest.fixture(scope="module")
def ckpts(dino_state, ckpt_dir):
    return _write_variants(dino_state, ckpt_dir)


@pytest.mark.parametrize("variant", ["plain", "teacher-module-backbone", "teacher-backbone-head"])
def test_dino_checkpoint_reproduces_source_features(variant, ckpts, source_vit):
    bb = build_backbone("vit_small_patch16", weights=str(ckpts[variant]))
    assert bb.weights_id.startswith("file:") and bb.weights_id.endswith(ckpts[variant].name)
    x = torch.randn(1, 3, 224, 224)  # the stored grid: timm's forward applies no resampling either
    assert torch.equal(bb(x), _timm_dense(source_vit, x, 16))
    assert all(not prm.requires_grad for prm in bb.parameters())


def test_safetensors_checkpoint(source_vit, ckpt_dir):
    from safetensors.torch import save_file

    path = ckpt_dir / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source_vit.state_dict().items()}, str(path))
    bb = build_backbone("vit_small_patch16", weights=path)
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(bb(x), _timm_dense(source_vit, x, 16))


def test_checkpoint_missing_key_is_named(dino_state, tmp_path):
    state = dict(dino_state)
    del state["blocks.3.mlp.fc2.bias"], state["norm.weight"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"missing keys \(2\).*blocks\.3\.mlp\.fc2\.bias.*norm\.weight"
    ) as err:
        build_backbone("vit_small_patch16", weights=str(path))
    assert str(path) in str(err.value)


def test_checkpoint_unexpected_key_is_named(dino_state, tmp_path):
    state = dict(dino_state)
    state["blocks.12.norm1.weight"] = torch.ones(384)
    path = tmp_path / "extra.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\).*blocks\.12\.norm1\.weight"):
        build_backbone("vit_small_patch16", weights=str(path))


def test_checkpoint_of_other_architecture_names_shape_mismatch(ckpts):
    # A ViT-S/16 checkpoint into ViT-S/8: same width, different patch embedding.
    with pytest.raises(
        ValueError,
        match=r"patch_embed\.proj\.weight: checkpoint \(384, 3, 16, 16\) vs model \(384, 3, 8, 8\)",
    ):
        build_backbone("vit_small_patch8", weights=str(ckpts["plain"]))


def test_checkpoint_resampled_to_other_img_size(ckpts, source_vit):
    bb = build_backbone("vit_small_patch16", weights=str(ckpts["plain"]), img_size=112)
    assert bb.model.vit.pos_embed.shape == (1, 1 + 7 * 7, 384)
    # Same weights except the position grid: CLS position and patch weights untouched.
    assert torch.equal(bb.model.vit.pos_embed[:, 0], source_vit.pos_embed[:, 0])
    assert torch.equal(bb.model.vit.blocks[5].mlp.fc1.weight, source_vit.blocks[5].mlp.fc1.weight)
    assert bb(torch.randn(1, 3, 112, 112)).shape == (1, 384, 7, 7)


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "nope" / "dino_deitsmall8_300ep_pretrain.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        build_backbone("vit_small_patch8", weights=str(path))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pth"
    torch.save({"epoch": 3, "weights": [1, 2, 3]}, path)
    with pytest.raises(ValueError, match="neither a state dict"):
        build_backbone("vit_small_patch16", weights=path)


@pytest.mark.timeout(60)
def test_default_weights_offline_fails_fast_with_hint(monkeypatch, tmp_path):
    """Offline (HF_HUB_OFFLINE=1 from conftest; forced here, with an empty hub cache) -> clear error."""
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="--backbone-weights") as err:
        build_backbone("vit_small_patch16", weights="default")
    elapsed = time.perf_counter() - t0
    assert "dino_deitsmall16_pretrain.pth" in str(err.value)
    # Without offline mode huggingface_hub retries for ~47 s; offline it must fail at once (generous bound).
    assert elapsed < 20, f"offline failure took {elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------- DINOv2
def _official_dinov2_state(vit) -> dict:
    """A timm DINOv2 model's weights in the layout of DINOv2's released files (facebookresearch/dinov2):
    ``mask_token``; with registers ``register_tokens`` and a position embedding that covers the CLS token,
    whose own embedding then does not include it (the inverse of the conversion under test)."""
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, vit.embed_dim)
    if "reg_token" in state:
        cls_pos = 0.05 * torch.randn(1, 1, vit.embed_dim)
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
        state["cls_token"] = state["cls_token"] - cls_pos
    return state


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_official_checkpoint_loads_every_weight_and_reproduces_features(name, tmp_path):
    from equss.models.backbone import BACKBONES

    spec = BACKBONES[name]
    torch.manual_seed(7)
    source = timm.create_model(spec.timm_name.split(".")[0], pretrained=False, num_classes=0,
                               dynamic_img_size=True).eval()
    with torch.no_grad():  # LayerScale starts at 1e-5: make the blocks matter
        for key, prm in source.named_parameters():
            if key.endswith(("ls1.gamma", "ls2.gamma")) or "reg_token" in key:
                prm.normal_(0, 0.5)
    path = tmp_path / spec.dino_checkpoint
    torch.save(_official_dinov2_state(source), path)
    bb = build_backbone(name, weights=str(path))
    assert (bb.patch_size, bb.embed_dim) == (14, 384)
    # At the official 37×37 grid no resampling happens: exactly timm's features of the source model.
    x = torch.randn(1, 3, 518, 518)
    tok = source.forward_features(x)[:, source.num_prefix_tokens :]
    torch.testing.assert_close(bb(x), tok.reshape(1, 37, 37, -1).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    # Protocol resolutions: 224 → 16×16 features, 322 → 23×23.
    assert bb(torch.randn(2, 3, 224, 224)).shape == (2, 384, 16, 16)
    assert bb(torch.randn(1, 3, 322, 322)).shape == (1, 384, 23, 23)
    state = torch.load(path)
    del state["blocks.3.ls2.gamma"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['blocks.3.ls2.gamma'\]"):
        build_backbone(name, weights=str(tmp_path / "broken.pth"))


@pytest.mark.slow
def test_dinov2_config_trains_on_the_embedded_data_with_random_weights(tmp_path):
    from equss.config import load_config
    from equss.train import run

    cfg = load_config("cocostuff27_dinov2_vits14_reg4.yaml", [
        "data.dataset=synthetic", "data.crop=none", "data.root=null", "data.synthetic.num_train=16",
        "data.synthetic.num_val=4", "data.train_res=56", "data.val_res=56", "data.batch_size=8",
        "data.val_batch_size=4", "data.num_workers=0", "data.knn_k=8", "backbone.weights=none",
        "model.dim=64", "model.num_subspaces=8", "model.codebook_size=16", "loss.feature_samples=4",
        "loss.neg_samples=1", "optim.max_steps=2", "eval.every=2", "eval.crf=false", "eval.kmeans_baseline=false",
        "log.progress=false", "log.tensorboard=false", f"output_dir={tmp_path / 'run'}",
        f"backbone.cache_dir={tmp_path / 'cache'}",
    ])
    result = run(cfg)
    assert result["no_crf"]["cluster"].n_pixels == 4 * 56 * 56
    assert (tmp_path / "run" / "stego_shifts.png").is_file()  # loss.preset=auto measured the shifts

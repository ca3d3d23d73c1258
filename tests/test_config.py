"""The typed configuration: keys are the constructors' arguments, defaults in one place, errors name the key,
and configurations stored by older checkpoints are migrated."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from equss.config import (
    ConfigError,
    LossConfig,
    ModelConfig,
    QuantizerConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    migrate_config_dict,
)
from equss.losses import StegoLossConfig
from equss.models.equss_model import EQUSSModel
from equss.nn import ProductQuantizer


def _defaults(fn, skip=()) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in skip and p.kind != p.VAR_KEYWORD
    }


def _fields(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_quantizer_section_is_product_quantizer_keywords_with_its_defaults():
    ctor = _defaults(ProductQuantizer.__init__, skip=("channel_dim", "process_group"))
    assert _fields(QuantizerConfig) == ctor


def test_model_section_is_equss_model_arguments_with_its_defaults():
    ctor = _defaults(EQUSSModel.__init__, skip=("quantizer",))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields == set(ctor) | {"quantizer"}
    assert {k: v for k, v in _fields(ModelConfig).items()} == ctor


def test_loss_section_covers_every_stego_setting():
    stego = {f.name for f in dataclasses.fields(StegoLossConfig)}
    loss = {f.name for f in dataclasses.fields(LossConfig)}
    assert stego <= loss and loss - stego == {"preset", "stego_weight", "pq_weight"}


def test_load_default_and_override_types():
    cfg = load_config(None, ["optim.lr=1e-4", "model.quantizer.learning=ema", "data.root=/x"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.quantizer.learning == "ema"
    assert cfg.output_dir == "runs/synthetic_demo"  # from configs/synthetic.yaml
    assert load_config("cocostuff27_vits8.yaml", ["data.root=/x"]).output_dir == "runs/cocostuff27_vits8"


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr=abc", r"optim\.lr: Value 'abc'"),
        ("data.rooot=/x", r"data\.rooot: Key 'rooot' not in 'DataConfig'"),
        ("eval.every=0", r"eval\.every: must be >= 1"),
        ("model.quantizer.init=foo", r"model\.quantizer: ProductQuantizer: unknown init 'foo'"),
        ("model.num_subspaces=7", r"model\.num_subspaces: must divide model\.dim"),
        ("loss.preset=nope", r"loss\.preset: 'nope' is not 'auto' or one of"),
        ("optim.amp=fp8", r"optim\.amp: 'fp8' is not one of"),
        ("data.dataset=cocostuff27", r"data\.root: dataset 'cocostuff27' needs its root"),
        ("data.knn_k=5", r"data\.num_neighbors: must be smaller than data\.knn_k=5"),
        ("lr=1", r"Key 'lr' not in 'TrainConfig'"),
        ("optim.lr", r"not of the form key=value"),
    ],
)
def test_user_errors_are_one_line_and_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "none.yaml"))


def test_format_1_vocabulary_is_migrated():
    old = {
        "model": {"dim": 64, "vq_type": "ema", "book_weight": 0.5, "init": "uni", "ema_decay": 0.9, "ema_eps": 1e-4,
                  "normalize": "none", "beta": 0.1, "output": "normalized", "dead_code_steps": 3},
        "data": {"synthetic": {"res": 112, "num_classes": 4}},
    }
    new = migrate_config_dict(old)
    q = new["model"]["quantizer"]
    assert q == {"learning": "ema", "codebook_weight": 0.5, "init": "xavier", "decay": 0.9, "eps": 1e-4,
                 "normalize": "none", "beta": 0.1, "output": "normalized", "dead_code_steps": 3}
    assert "res" not in new["data"]["synthetic"] and new["data"]["synthetic"]["num_classes"] == 4
    assert migrate_config_dict(new) == new  # idempotent
    cfg = config_from_dict({**old, "model": {**old["model"], "num_subspaces": 8}})
    assert cfg.model.quantizer.learning == "ema" and cfg.model.dim == 64


def test_round_trip_through_a_dict():
    cfg = load_config(None, ["seed=3", "model.quantizer.beta=0.5"])
    again = config_from_dict(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)


def _leaf_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            yield from _leaf_keys(type(f.default_factory()), prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_every_key_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    keys = list(_leaf_keys(TrainConfig))
    assert len(keys) > 60
    # A key is documented when it appears in backticks, alone or as the first of a group (`a.b`, `.c`).
    missing = [k for k in keys if f"`{k}`" not in doc and f"`.{k.rsplit('.', 1)[-1]}`" not in doc
               and f"`{k}," not in doc]
    assert not missing, f"keys missing from docs/configuration.md: {missing}"


def test_nothing_points_outside_the_repository():
    """Docs, help texts and docstrings cite files inside the repository only."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    outside = ("EQUSS" + "_SPEC", "DESIGN" + ".md", "shared" + "/EQUSS")
    hits = [f for f in files if Path(root / f).suffix in {".py", ".md", ".yaml", ".sh", ".cpp", ".cu", ".h", ".cuh"}
            and any(o in (root / f).read_text(errors="ignore") for o in outside)]
    assert not hits, hits

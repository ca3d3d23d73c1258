#!/usr/bin/env python
"""Train EQUSS (Expand-and-Quantize unsupervised semantic segmentation).

With no arguments it trains and evaluates on the embedded default: procedurally generated texture
scenes with the fixed filter-bank demo backbone (no download, no weights, a few minutes on 2 CPU cores).

Examples:
    python scripts/train.py
    python scripts/train.py --config configs/cocostuff27_vits8.yaml data.root=/data/cocostuff \\
        --backbone-weights /weights/dino_deitsmall8_300ep_pretrain.pth
    torchrun --nproc_per_node 4 scripts/train.py --config configs/cityscapes_vitb8.yaml data.root=/data/cityscapes
    python scripts/train.py --resume runs/synthetic_demo/last.ckpt

Any configuration key (docs/configuration.md; defaults in equss/config.py) can be overridden as key=value,
anywhere on the line. Errors are printed as one line; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from equss.cli import add_common_arguments, run_main  # noqa: E402
from equss.config import DEFAULT_CONFIG, load_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--config", default=None,
                   help=f"YAML config (default: the embedded synthetic demo, {os.path.relpath(DEFAULT_CONFIG)}). "
                        "Paper settings: configs/cocostuff27_vits8.yaml, configs/cityscapes_vitb8.yaml, "
                        "configs/potsdam_vits8.yaml")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="resume exactly from a checkpoint written by this script (e.g. runs/<name>/last.ckpt); "
                        "its configuration must match structurally")
    p.add_argument("--output-dir", default=None, help="where checkpoints, logs and results go (config: output_dir)")
    p.add_argument("--backbone-weights", default=None, metavar="PATH|default|none",
                   help="official DINO checkpoint (e.g. dino_deitsmall8_300ep_pretrain.pth), 'default' for timm's "
                        "hub weights, 'none' for a random backbone (results meaningless)")
    p.add_argument("--cache-features", dest="cache_features", action="store_true", default=None,
                   help="compute the frozen backbone features once per dataset/split/resolution and reuse them "
                        "(default on; the paper's pipeline applies no augmentation before the backbone)")
    p.add_argument("--no-cache-features", dest="cache_features", action="store_false")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (paper: COCO-Stuff 3, Cityscapes 15)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    add_common_arguments(p)
    return p


def main_from_args(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.backbone_weights is not None:
        overrides.append(f"backbone.weights={args.backbone_weights}")
    if args.cache_features is not None:
        overrides.append(f"backbone.cache_features={str(args.cache_features).lower()}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.epochs is not None:
        overrides.append(f"optim.epochs={args.epochs}")
    if args.max_steps is not None:
        overrides.append(f"optim.max_steps={args.max_steps}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        from omegaconf import OmegaConf

        from equss.config import config_to_dict

        print(OmegaConf.to_yaml(config_to_dict(cfg)))
        return 0

    from equss.train import run

    run(cfg, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(main_from_args, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())

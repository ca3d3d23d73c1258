#!/usr/bin/env python
"""Write generated texture scenes as an image folder in the layout ``data.dataset=imagefolder`` reads.

    <out>/imgs/{train,val}/scene_<i>.png
    <out>/labels/{train,val}/scene_<i>.png     (class ids 0..K-1; omitted with --no-labels)

A folder of your own photos works the same way (see README "Your own images"). Example:
    python scripts/make_demo_folder.py --out demo_folder
    python scripts/train.py data.dataset=imagefolder data.root=demo_folder --output-dir runs/demo_folder
    python scripts/predict.py --checkpoint runs/demo_folder/best.ckpt --images demo_folder/imgs/val
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from equss.cli import add_common_arguments, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (created)")
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-val", type=int, default=40)
    p.add_argument("--num-classes", type=int, default=5, help="texture classes (2-10)")
    p.add_argument("--res", type=int, default=112, help="image size in pixels (square scenes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-labels", action="store_true", help="write the images only (an unlabelled folder)")
    add_common_arguments(p)
    return p


def main_from_args(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from equss.data.synthetic import generate_scene

    root = Path(args.out)
    for split, n in (("train", args.num_train), ("val", args.num_val)):
        (root / "imgs" / split).mkdir(parents=True, exist_ok=True)
        if not args.no_labels:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label = generate_scene(args.seed, split, i, args.res, args.num_classes)
            Image.fromarray(img).save(root / "imgs" / split / f"scene_{i}.png")
            if not args.no_labels:
                Image.fromarray(label.astype(np.uint8)).save(root / "labels" / split / f"scene_{i}.png")
    print(f"wrote {args.num_train} train / {args.num_val} val scenes to {root}" + (" (no labels)" if args.no_labels else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(main_from_args, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())

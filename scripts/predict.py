#!/usr/bin/env python
"""Segment your own images with a trained EQUSS checkpoint.

Writes, per image, ``<name>_cluster.png`` (uint8 class ids of the cluster probe, matched to classes as in
the run's final evaluation; cluster ids for runs trained without labels; 255 = unmatched cluster),
``<name>_linear.png`` (the linear probe's class ids, labelled runs only) and ``<name>_overlay.png`` (the
image, the predictions blended with the dataset palette, and a legend). Images of any size: each is
resized so its shorter side is the run's evaluation resolution (data.val_res, or --res), cropped to a
multiple of the patch size, and the predictions are upsampled back to the image's own size.

Examples:
    python scripts/predict.py --checkpoint runs/synthetic_demo/best.ckpt --images demo_folder/imgs/val
    python scripts/predict.py --checkpoint runs/cocostuff27_vits8/best.ckpt --images 'photos/*.jpg' --crf
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from equss.cli import add_common_arguments, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by scripts/train.py")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively) or glob patterns (quote them)")
    p.add_argument("--out-dir", default=None, help="where to write the PNGs (default: <checkpoint dir>/predictions)")
    p.add_argument("--crf", action="store_true", help="refine with DenseCRF (pip install 'equss[crf]')")
    p.add_argument("--crf-processes", type=int, default=2, help="CRF worker processes (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="images of one size per forward pass (default 8)")
    p.add_argument("--res", type=int, default=None, help="shorter side at prediction (default: the run's data.val_res)")
    p.add_argument("--matching", default=None, metavar="JSON",
                   help="results.json with the cluster-to-class matching (default: the one next to the checkpoint)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    add_common_arguments(p)
    return p


def main_from_args(args: argparse.Namespace) -> int:
    from equss.predict import Predictor, find_images

    paths = find_images(args.images)
    predictor = Predictor(args.checkpoint, device=args.device, matching=args.matching, overrides=args.overrides,
                          res=args.res)
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "predictions")
    written = predictor.predict_files(paths, out_dir, batch_size=args.batch_size, crf=args.crf,
                                      crf_processes=args.crf_processes)
    print(f"{len(paths)} images segmented; {len(written)} files written to {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(main_from_args, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())

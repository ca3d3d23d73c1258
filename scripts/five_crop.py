#!/usr/bin/env python
"""Write the five-crop training set of a dataset (spec §7), once.

    python scripts/five_crop.py --dataset cocostuff27 --root /data/cocostuff --split train
    python scripts/five_crop.py --dataset cityscapes --root /data/cityscapes --split train --num-workers 8

Output: ``<root>/cropped/{dataset}_five_crop_0.5/{img,label}/{split}/{n}.{jpg,png}`` (labels stored as
class + 1, 0 = ignore); crop ``j`` (tl, tr, bl, br, centre) of image ``i`` is ``n = 5 i + j``. Re-running
skips the files already written. Train with ``data.crop=five``.
"""

from __future__ import annotations

import argparse

from equss.data.factory import build_dataset
from equss.data.five_crop import make_five_crop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="cocostuff27 | cocostuff15 | cocostuff3 | cityscapes | potsdam | imagefolder")
    parser.add_argument("--root", required=True, help="dataset root (standard layout; the crops are written below it)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--crop-ratio", type=float, default=0.5, help="crop height/width as a fraction of the image's (0.5)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers that read and write in parallel")
    parser.add_argument("--jpeg-quality", type=int, default=75, help="75 = PIL's default, what STEGO's crop script wrote")
    args = parser.parse_args(argv)
    # res is irrelevant: cropping reads the full-resolution images through load_raw
    source = build_dataset(args.dataset, args.root, args.split, res=224)
    out = make_five_crop(source, args.root, args.dataset, args.split, crop_ratio=args.crop_ratio,
                         num_workers=args.num_workers, jpeg_quality=args.jpeg_quality)
    print(f"five-crop set of {len(source)} images ({5 * len(source)} crops) in {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Precompute the kNN positives of a training set (spec §6).

    python scripts/precompute_knn.py --dataset cocostuff27 --root /data/cocostuff --crop five_crop \\
        --backbone vit_small_patch8 --res 224
    python scripts/precompute_knn.py --dataset synthetic --root /tmp/equss --backbone demo --res 112

Global feature = spatial mean of the frozen backbone's patch features, l2-normalised; neighbours =
cosine top-k (k = 30, the image itself first), computed in blocks (never the N×N matrix). Writes
``<root>/nns/nns_{backbone}_{dataset}_{split}_{crop}_{res}.npz`` (``nns int64 [N, k]`` + metadata).
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="cocostuff27 | cocostuff15 | cocostuff3 | cityscapes | potsdam | imagefolder | synthetic")
    parser.add_argument("--root", required=True, help="dataset root; the npz goes to <root>/nns/")
    parser.add_argument("--split", default="train")
    parser.add_argument("--crop", default="none", choices=["none", "five_crop"], help="five_crop: the files of scripts/five_crop.py")
    parser.add_argument("--backbone", default="vit_small_patch8", help="vit_small_patch8 | vit_base_patch8 | vit_small_patch16 | vit_base_patch16 | demo")
    parser.add_argument("--weights", default="default", help="'default' (timm hub), a DINO checkpoint path, or 'none'")
    parser.add_argument("--res", type=int, default=224, help="input resolution (224 as in training)")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=4096, help="block size of the similarity computation")
    parser.add_argument("--knn-backend", default="torch", choices=["torch", "faiss", "auto"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-classes", type=int, default=None, help="synthetic only (default 5)")
    parser.add_argument("--num-images", type=int, default=None, help="synthetic only (default 600 train / 100 val)")
    parser.add_argument("--seed", type=int, default=None, help="synthetic only")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)

    from equss.data.factory import build_dataset, canonical_name
    from equss.data.knn import compute_knn, knn_path, save_knn
    from equss.models.backbone import build_backbone  # lazy: pulls timm

    name = canonical_name(args.dataset)
    crop = None if args.crop == "none" else args.crop
    extra = {}
    if name == "synthetic":
        extra = {k: v for k, v in dict(num_classes=args.num_classes, num_images=args.num_images, seed=args.seed).items()
                 if v is not None}
    path = knn_path(args.root, args.backbone, name, args.split, crop, args.res)
    if path.exists() and not args.force:
        print(f"{path} exists; pass --force to recompute")
        return
    dataset = build_dataset(name, args.root, args.split, args.res, crop=crop, **extra)
    weights = None if str(args.weights).lower() == "none" else args.weights
    backbone = build_backbone(args.backbone, weights=weights, device=args.device)
    nns = compute_knn(backbone, dataset, k=args.k, batch_size=args.batch_size, num_workers=args.num_workers,
                      device=args.device, chunk_size=args.chunk_size, backend=args.knn_backend)
    save_knn(path, nns, model=args.backbone, dataset=name, split=args.split, crop=crop, res=args.res,
             weights=str(getattr(backbone, "weights_id", "")))
    print(f"wrote {path}: nns {nns.shape}")


if __name__ == "__main__":
    main()

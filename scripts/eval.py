#!/usr/bin/env python
"""Evaluate a trained EQUSS checkpoint with the standard unsupervised-segmentation protocol.

Cluster probe with Hungarian matching and linear probe, pixel accuracy and mIoU over the whole
validation split at the protocol resolution (docs/method.md §9), optionally with DenseCRF (``--crf``,
needs ``pip install 'equss[crf]'``) and horizontal-flip averaging (``--flip``). Writes per-class tables
(JSON, CSV), a summary (results.json / results.md) and a picture grid
(image | ground truth | cluster prediction | linear prediction).

Examples:
    python scripts/eval.py --checkpoint runs/synthetic_demo/best.ckpt
    python scripts/eval.py --checkpoint runs/cocostuff27_vits8/best.ckpt --crf data.root=/data/cocostuff
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from equss.cli import add_common_arguments, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by scripts/train.py (best.ckpt / last.ckpt)")
    p.add_argument("--out-dir", default=None, help="where to write results (default: <checkpoint dir>/eval)")
    p.add_argument("--crf", action="store_true", help="also evaluate with DenseCRF post-processing (pydensecrf2)")
    p.add_argument("--crf-processes", type=int, default=2, help="CRF worker processes (default 2)")
    p.add_argument("--flip", action="store_true",
                   help="average the code of each image and of its horizontal flip (STEGO; off in EQUSS)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    p.add_argument("--num-workers", type=int, default=None, help="data loader workers (default: the run's)")
    p.add_argument("--num-images", type=int, default=8, help="rows of the picture grid (0 = none)")
    p.add_argument("--no-cache-features", action="store_true", help="run the backbone instead of the feature cache")
    add_common_arguments(p)
    return p


def main_from_args(args: argparse.Namespace) -> int:
    import torch

    from equss.evaluate import evaluate_model
    from equss.io import save_json
    from equss.palettes import get_palette
    from equss.pipeline import load_run
    from equss.visualize import save_prediction_grid

    run = load_run(
        args.checkpoint, args.overrides, device=args.device, batch_size=args.batch_size,
        num_workers=args.num_workers, cache_features=False if args.no_cache_features else None,
    )
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    os.makedirs(out_dir, exist_ok=True)
    n_clusters = run.model.cluster_probe.n_clusters
    variants = [("no_crf", False)] + ([("crf", True)] if args.crf else [])
    summary: dict = {"checkpoint": os.path.abspath(args.checkpoint), "step": run.checkpoint["step"], "flip": args.flip}
    lines = [
        f"## {run.cfg.data.dataset} ({run.cfg.backbone.name}), checkpoint step {run.checkpoint['step']}"
        + (", flip-averaged" if args.flip else ""),
        "",
        "| | cluster Acc | cluster mIoU | linear Acc | linear mIoU |",
        "| --- | --- | --- | --- | --- |",
    ]
    kept = None
    for name, crf in variants:
        res = evaluate_model(
            run.model, run.val.loader, run.featurize, run.n_classes, run.device, n_clusters=n_clusters,
            crf=crf, crf_processes=args.crf_processes, flip=args.flip, desc=f"eval {name}", keep=not crf,
        )
        if not crf:
            kept, cluster_metrics = res["predictions"], res["cluster"]
        for probe in ("cluster", "linear"):
            m = res[probe]
            m.class_names = run.class_names
            m.save_json(os.path.join(out_dir, f"{name}_{probe}.json"))
            m.save_csv(os.path.join(out_dir, f"{name}_{probe}.csv"))
            print(f"\n[{name}] {probe} probe\n{m.table()}")
        summary[name] = {probe: {"accuracy": res[probe].accuracy, "miou": res[probe].miou} for probe in ("cluster", "linear")}
        if crf:
            summary[name]["crf_failed_images"] = res.get("crf_failed", 0)
        c, lin = res["cluster"], res["linear"]
        label = "EQUSS + CRF" if crf else "EQUSS"
        lines.append(f"| {label} | {c.accuracy:.1f} | {c.miou:.1f} | {lin.accuracy:.1f} | {lin.miou:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    save_json(os.path.join(out_dir, "results.json"), summary)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(table + "\n")

    if args.num_images > 0 and kept is not None:
        n = min(args.num_images, len(run.val.base))
        items = [run.val.base[i] for i in range(n)]
        images = torch.stack([it["img"] for it in items])
        order = kept["index"].tolist()
        rows = [order.index(int(it["index"])) for it in items]
        cluster = cluster_metrics.map_predictions(kept["cluster"][rows])  # matched class, -1 = unmatched cluster
        palette = get_palette(run.cfg.data.dataset, run.n_classes)
        path = save_prediction_grid(
            os.path.join(out_dir, "predictions.png"), images, kept["label"][rows], cluster, kept["linear"][rows],
            palette=palette, class_names=run.class_names, scale=2 if images.shape[-1] <= 160 else 1,
        )
        print(f"picture grid: {path}")
    print(f"results written to {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(main_from_args, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""The paper's analyses of a trained EQUSS model (its figure "Analyses on EQUSS", docs/method.md §10).

Over the validation split: (a) per-class entropy of the PQ codes, beside the same statistic for the
frozen backbone's continuous features quantized by a k-means product codebook with the same M and K
(the "without EQUSS head" reference); (b) how often each codeword of each codebook is selected;
(c) per-class entropy against per-class cluster-probe accuracy; (d) inter-class distance between the
codeword combinations the classes use. Each is written as JSON numbers and a PNG.

Example:
    python scripts/analyze.py --checkpoint runs/synthetic_demo/best.ckpt
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
    p.add_argument("--out-dir", default=None, help="where to write (default: <checkpoint dir>/analysis)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-reference", action="store_true",
                   help="skip the k-means product quantization of the backbone features (the reference model)")
    p.add_argument("--reference-pixels", type=int, default=100_000,
                   help="backbone feature vectors used to fit the reference product codebook (default 100k)")
    add_common_arguments(p)
    return p


def _backbone_subspaces(C: int, M: int) -> int:
    """The largest number of subspaces <= M that divides the backbone width C (M itself for 384/768)."""
    return max(m for m in range(1, M + 1) if C % m == 0)


def main_from_args(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from equss.analysis import CodeHistogram, fit_product_kmeans, quantize, run_analyses
    from equss.evaluate import evaluate_model
    from equss.pipeline import load_run
    from equss.progress import Progress

    run = load_run(args.checkpoint, args.overrides, device=args.device, batch_size=args.batch_size)
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "analysis")
    M, K = run.cfg.model.num_subspaces, run.cfg.model.codebook_size
    n_clusters = run.model.cluster_probe.n_clusters

    metrics = evaluate_model(run.model, run.val.loader, run.featurize, run.n_classes, run.device,
                             n_clusters=n_clusters, desc="cluster accuracy")["cluster"]

    # Reference: the frozen backbone's continuous features, quantized by a product k-means codebook
    # (same K; M reduced to a divisor of the backbone width if needed) fitted on a sample of them.
    ref_cb = None
    if not args.no_reference:
        rows, n_rows = [], 0
        with torch.no_grad():
            for batch in run.val.loader:
                f = run.featurize(batch)
                rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu())
                n_rows += rows[-1].shape[0]
                if n_rows >= args.reference_pixels:
                    break
        x = torch.cat(rows)
        Mb, Kb = _backbone_subspaces(x.shape[1], M), min(K, x.shape[0])
        ref_cb, _ = fit_product_kmeans(x[: args.reference_pixels], Mb, Kb)
        ref_hist = CodeHistogram(run.n_classes, Mb, Kb)

    # Codes live on the feature grid; every pixel takes the code of its patch (nearest upsampling), so
    # class statistics weigh classes by their pixel counts, as the metrics do.
    def pixel_codes(codes, size):  # [B, M, h, w] → [B·H·W, M]
        up = F.interpolate(codes.float(), size=size, mode="nearest").long()
        return up.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])

    hist = CodeHistogram(run.n_classes, M, K)
    with torch.no_grad():
        for batch in Progress(run.val.loader, desc="codes", unit="batch"):
            label = batch["label"].to(run.device)
            f = run.featurize(batch)
            hist.update(pixel_codes(run.model.encode(f).codes, label.shape[-2:]), label.reshape(-1))
            if ref_cb is not None:
                B, C, h, w = f.shape
                rc = quantize(f.permute(0, 2, 3, 1).reshape(-1, C).cpu(), ref_cb)  # [B·h·w, Mb]
                rc = rc.reshape(B, h, w, -1).permute(0, 3, 1, 2)
                ref_hist.update(pixel_codes(rc, label.shape[-2:]), label.reshape(-1).cpu())
    reference = None
    if ref_cb is not None:
        reference = {f"backbone features (k-means PQ, M={ref_cb.shape[0]}, K={ref_cb.shape[1]})": ref_hist}

    codebooks = run.model.quantizer.codebooks.detach().float().cpu()
    files = run_analyses(
        out_dir, hist, run.class_names, codebooks=codebooks, class_accuracy=metrics.class_accuracy,
        model_name="EQUSS", reference=reference,
    )
    for name, path in sorted(files.items()):
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(main_from_args, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""The EQUSS training loop: train steps, periodic validation, atomic checkpoints with exact resume, DDP,
logging, and the final evaluation of the selected checkpoint.

Data, features and the runtime come from :mod:`equss.pipeline`; metrics from :mod:`equss.evaluate`; the
baselines and the results table from :mod:`equss.report`. ``scripts/train.py`` is the command-line front
end; :func:`run` the programmatic one::

    from equss.config import load_config
    from equss.train import run
    result = run(load_config("configs/synthetic.yaml", ["optim.epochs=1"]))
"""

from __future__ import annotations

import csv
import logging
import math
import os
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from equss.checkpoint import (
    FORMAT_VERSION,
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from equss.config import TrainConfig, check_compatible, config_to_dict
from equss.evaluate import evaluate_model
from equss.io import remove_stale_temporaries, save_json
from equss.losses import (
    AUTO,
    AUTO_QUANTILES,
    STEGO_PRESETS,
    StegoCorrespondenceLoss,
    auto_shifts,
    stego_config_from_shifts,
)
from equss.models.equss_model import EQUSSModel
from equss.pipeline import (
    Featurizer,
    build_backbone_for,
    build_train_data,
    measure_correlations,
    setup_runtime,
)
from equss.progress import Progress
from equss.report import chance_level, format_results, kmeans_baseline, summarize
from equss.runtime import seed_everything

__all__ = ["CollapseGuard", "Trainer", "run"]

log = logging.getLogger(__name__)


class Trainer:
    """Everything one EQUSS run needs; see the module docstring. ``Trainer(cfg).fit()``."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        self.cfg = cfg
        self.cfg_dict = config_to_dict(cfg)
        self.dist, self.device = setup_runtime(cfg)
        self.out_dir = cfg.output_dir
        self.progress = cfg.log.progress and self.dist.is_main
        if self.dist.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            stale = remove_stale_temporaries(self.out_dir)
            if stale:
                log.info("removed %d temporary file(s) left by an interrupted run: %s", len(stale),
                         ", ".join(p.name for p in stale))

        self.backbone = build_backbone_for(cfg, self.device)
        self.featurize = Featurizer(self.backbone, self.device)
        self.data = build_train_data(cfg, self.backbone, self.device, self.dist, self.progress)
        self.n_classes = self.data.n_classes
        log.info("data: %d training / %d validation images, %d classes; backbone %s (%d channels, patch %d)",
                 len(self.data.images), len(self.data.val.images), self.n_classes, cfg.backbone.name,
                 self.backbone.embed_dim, self.backbone.patch_size)
        # Unlabelled data (an image folder without labels): no metrics, so nothing to select on.
        self.labelled = bool(getattr(self.data.images, "has_labels", True) and getattr(self.data.val.images, "has_labels", True))
        self.select_on = cfg.eval.select_on if self.labelled else "last"
        if not self.labelled and cfg.eval.select_on != "last":
            log.info("the data has no labels: no metrics; the last checkpoint is kept (eval.select_on=last)")
        # The model and every training draw start from the seed, whatever building the data consumed
        # (a cold cache computes features and kNN, a warm one does not): a run is a pure function of its
        # configuration and seed.
        seed_everything(cfg.seed)
        self.model = EQUSSModel.from_config(cfg.model, self.backbone.embed_dim, self.n_classes).to(self.device)
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            # Buffers are synchronised by the quantizer itself (all-reduced statistics), not broadcast.
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.stego = self._stego_loss()
        o = cfg.optim
        self.optimizers = {
            "head": torch.optim.Adam(self.model.head_parameters(), lr=o.lr),
            "cluster_probe": torch.optim.Adam(self.model.cluster_probe.parameters(), lr=o.probe_lr),
            "linear_probe": torch.optim.Adam(self.model.linear_probe.parameters(), lr=o.probe_lr),
        }
        self.amp_dtype = _amp_dtype(o.amp, self.device)
        # One scaler for all three optimisers (fp16 only): unscale every optimiser before clipping, step
        # each, then update once per step (the authors' code updates once per optimiser).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.steps_per_epoch = self.data.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(self.data.pairs)} images, fewer than one batch of {cfg.data.batch_size}"
            )
        total = o.epochs * self.steps_per_epoch
        self.total_steps = min(total, o.max_steps) if o.max_steps else total
        self.step = 0
        self.best: dict[str, Any] = {"metric": -math.inf, "step": -1}
        self.history: list[dict[str, Any]] = []
        self.guard = CollapseGuard(self.model.cluster_probe.n_clusters)
        self._writers_opened = False
        if resume:
            self.load(resume)

    def _stego_loss(self) -> StegoCorrespondenceLoss:
        """The STEGO loss of ``cfg.loss``: the preset's weights and shifts — or, for ``loss.preset=auto``,
        shifts measured on this data (:func:`equss.losses.auto_shifts`) — overridden where the config sets
        them. The auto shifts are printed and plotted (``stego_shifts.png`` in the output folder)."""
        loss = self.cfg.loss
        settings = {k: v for k, v in asdict(loss).items() if k not in ("preset", "stego_weight", "pq_weight")}
        if loss.preset == AUTO:
            t0 = time.time()
            samples = measure_correlations(self.cfg, self.data, self.featurize)
            shifts = auto_shifts(samples)
            base = stego_config_from_shifts(shifts)
            log.info("loss.preset=auto: shifts pos_intra %.3f, pos_inter %.3f, neg_inter %.3f (quantiles %s of "
                     "%d measured correlations, %.1f s)", shifts["pos_intra"], shifts["pos_inter"], shifts["neg_inter"],
                     AUTO_QUANTILES, sum(v.numel() for v in samples.values()), time.time() - t0)
            if self.dist.is_main:
                from equss.analysis import plot_stego_shifts

                path = plot_stego_shifts(samples, shifts, os.path.join(self.out_dir, "stego_shifts.png"))
                log.info("shift diagnostics: %s", path)
        else:
            base = STEGO_PRESETS[loss.preset]
        return StegoCorrespondenceLoss(base, **{k: v for k, v in settings.items() if v is not None})

    # ---------------------------------------------------------------------------------------- training
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        self.model.train()
        f = self.featurize(batch, "img")
        f_pos = self.featurize(batch, "img_pos")
        label = batch["label"].to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        with autocast:
            out = self.ddp_model(
                f, f_pos, label, self.stego,
                stego_weight=self.cfg.loss.stego_weight, pq_weight=self.cfg.loss.pq_weight,
            )
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        for opt in self.optimizers.values():
            self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.head_parameters(), self.cfg.optim.grad_clip)
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        terms = {k: float(v) for k, v in out.terms.items()}
        terms["grad_norm"] = float(grad_norm)
        if not math.isfinite(terms["loss"]):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {terms}")
        if self.dist.is_main:
            for warning in self.guard.update(terms):
                log.warning("step %d: %s", self.step + 1, warning)
        return terms

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` with validation/checkpoints every ``eval.every`` steps; return the final result."""
        cfg = self.cfg
        every = cfg.eval.every
        bar = self._bar = Progress(total=self.total_steps, initial=self.step, desc="train", unit="step",
                                   enabled=self.progress)
        interrupted = {"flag": False}

        def on_sigterm(signum, frame):  # torchrun / schedulers send SIGTERM: finish the step, checkpoint, exit
            interrupted["flag"] = True

        previous = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None
        try:
            while self.step < self.total_steps and not interrupted["flag"]:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                self.data.sampler.set_epoch(epoch, start)
                self.data.pairs.set_epoch(epoch)
                for batch in self.data.loader:
                    terms = self.train_step(batch)
                    self.step += 1
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", usage=f"{terms.get('pq_usage', float('nan')):.2f}")
                    bar.update(1)
                    self._log({"step": self.step, "epoch": epoch, **terms}, "train")
                    if self.step % every == 0 or self.step == self.total_steps:
                        self.validate_and_checkpoint()
                    if self.step >= self.total_steps or interrupted["flag"]:
                        break
        except KeyboardInterrupt:
            bar.close()
            if self.dist.is_main:
                print(f"\ninterrupted at step {self.step}; the last checkpoint in {self.out_dir} is intact "
                      f"(resume with --resume {os.path.join(self.out_dir, 'last.ckpt')})")
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            bar.close()
        if interrupted["flag"]:
            self.save(os.path.join(self.out_dir, "last.ckpt"))
            raise SystemExit(f"terminated at step {self.step}; checkpoint saved to {self.out_dir}/last.ckpt")
        return self.final_evaluation()

    # -------------------------------------------------------------------------------------- validation
    _bar: Progress | None = None

    def validate(self, crf: bool = False, keep: bool = False, desc: str = "val", loader=None) -> dict[str, Any]:
        """Probe metrics on ``loader`` (default: the validation split)."""
        return evaluate_model(
            self.model, self.data.val.loader if loader is None else loader, self.featurize, self.n_classes,
            self.device, n_clusters=self.model.cluster_probe.n_clusters, crf=crf,
            crf_processes=self.cfg.eval.crf_processes, flip=self.cfg.eval.flip,
            progress=self.progress, desc=desc, keep=keep,
        )

    def validate_and_checkpoint(self) -> None:
        """Rank 0 evaluates the whole validation set (and the held-out slice for ``select_on=holdout``),
        keeps ``best.ckpt`` by cluster mIoU on the selection split, always ``last.ckpt``."""
        if self.dist.is_main and not self.labelled:
            self.best = {"metric": self.step, "step": self.step}
            self.save(os.path.join(self.out_dir, "last.ckpt"))
        elif self.dist.is_main:
            res = self.validate()
            row = {
                "step": self.step,
                "cluster_acc": res["cluster"].accuracy, "cluster_miou": res["cluster"].miou,
                "linear_acc": res["linear"].accuracy, "linear_miou": res["linear"].miou,
            }
            select = self.select_on
            if select == "holdout":
                held = self.validate(loader=self.data.holdout_loader, desc="holdout")
                row["holdout_cluster_miou"] = held["cluster"].miou
            self.history.append(row)
            self._log(row, "val")
            metric = {"val": row["cluster_miou"], "last": self.step}.get(select, row.get("holdout_cluster_miou"))
            if metric > self.best["metric"]:
                self.best = {"metric": metric, "step": self.step, **row}
                self.save(os.path.join(self.out_dir, "best.ckpt"))
            self.save(os.path.join(self.out_dir, "last.ckpt"))
            if self.progress:
                self._bar.write(
                    f"step {self.step}: cluster acc {row['cluster_acc']:.1f} mIoU {row['cluster_miou']:.1f} | "
                    f"linear acc {row['linear_acc']:.1f} mIoU {row['linear_miou']:.1f}"
                )
        if self.dist.enabled:
            dist.barrier()

    # -------------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "format": "equss-checkpoint",
            "version": FORMAT_VERSION,
            "step": self.step,
            "config": self.cfg_dict,
            "model": self.model.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "best": self.best,
            "history": self.history,
            "n_classes": self.n_classes,
            "class_names": self.data.val.class_names,
            "labelled": self.labelled,
            "stego": asdict(self.stego.cfg),
            "in_dim": self.backbone.embed_dim,
        }

    def save(self, path: str) -> None:
        if self.dist.is_main:
            atomic_torch_save(self.state(), path)

    def load(self, path: str) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        check_compatible(ckpt["config"], self.cfg_dict, path)
        self.model.load_state_dict(ckpt["model"])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][k])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.best = ckpt["best"]
        self.history = list(ckpt.get("history", []))
        restore_rng_state(ckpt["rng"])
        if self.dist.is_main:
            # Rows a run logged after its last checkpoint are logged again by the resumed run.
            for kind in ("train", "val"):
                _truncate_csv(os.path.join(self.out_dir, f"{kind}_log.csv"), self.step)

    # ---------------------------------------------------------------------------------------- logging
    def _log(self, row: dict[str, Any], kind: str) -> None:
        if not self.dist.is_main:
            return
        if not self._writers_opened:
            self._open_writers()
        if self.cfg.log.csv:
            path = os.path.join(self.out_dir, f"{kind}_log.csv")
            new = not os.path.exists(path)
            with open(path, "a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, row["step"])

    def _open_writers(self) -> None:
        self._writers_opened = True
        self.tb = None
        if self.cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run drops the events logged after its checkpoint.
                self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"), purge_step=self.step + 1 if self.step else None)
            except ImportError:
                warnings.warn("log.tensorboard=true but tensorboard is not installed (pip install tensorboard); "
                              "logging to CSV only", stacklevel=2)

    # ------------------------------------------------------------------------------- final evaluation
    def final_evaluation(self) -> dict[str, Any]:
        """Reload the selected checkpoint, evaluate without (and optionally with) CRF, print the table."""
        result: dict[str, Any] = {}
        if not self.dist.is_main:
            if self.dist.enabled:
                dist.barrier()
            return result
        select = self.select_on
        path = os.path.join(self.out_dir, "last.ckpt" if select == "last" else "best.ckpt")
        if os.path.exists(path):
            self.model.load_state_dict(load_checkpoint(path, map_location=self.device)["model"])
        ckpt_step = self.best["step"] if select != "last" else self.step
        result["selected"] = {"checkpoint": path, "step": ckpt_step, "select_on": select}
        if not self.labelled:
            table = (f"## EQUSS: {self.cfg.data.dataset} without labels, {self.n_classes} clusters (step {self.step})\n\n"
                     f"No labels, so no metrics. Segment images with:\n"
                     f"python scripts/predict.py --checkpoint {path} --images <folder or files>")
            print(table)
            with open(os.path.join(self.out_dir, "results.md"), "w") as fh:
                fh.write(table + "\n")
            save_json(os.path.join(self.out_dir, "results.json"), {"selected": result["selected"], "labelled": False})
            if self.dist.enabled:
                dist.barrier()
            return result
        result["no_crf"] = self.validate(desc="final")
        if self.cfg.eval.crf:
            result["crf"] = self.validate(crf=True, desc="final+crf")
        if self.cfg.eval.kmeans_baseline:
            result["kmeans_baseline"] = kmeans_baseline(
                self.data.base, self.data.val.loader, self.featurize, self.n_classes, self.device, self.cfg.seed
            )
        result["chance"] = chance_level(self.data.val.loader)
        table = format_results(result, self.cfg)
        print(table)
        with open(os.path.join(self.out_dir, "results.md"), "w") as fh:
            fh.write(table + "\n")
        save_json(os.path.join(self.out_dir, "results.json"), summarize(result))
        if self.dist.enabled:
            dist.barrier()
        return result


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class CollapseGuard:
    """Warns once, loudly, when the codebooks or the cluster probe collapse during training.

    Watches two smoothed signals (an exponential moving average over ~20 steps, after a 20-step warm-up):

    * ``pq_usage`` (fraction of each codebook's K codewords used by a batch, averaged over the M
      subspaces) below :attr:`MIN_USAGE`: the quantizer maps nearly everything to a few codewords, so q
      carries little information and the probes degrade;
    * ``clusters_used`` (clusters the cluster probe predicts on a batch) below :attr:`MIN_CLUSTER_SHARE` of
      its ``n_clusters``: the segmentation degenerates to fewer segments than classes.

    The thresholds are documented in docs/configuration.md; the warning names the likely cause and the
    settings to try. It changes nothing in the run.
    """

    MIN_USAGE = 0.05
    MIN_CLUSTER_SHARE = 0.5
    WARMUP = 20
    ALPHA = 0.1

    def __init__(self, n_clusters: int) -> None:
        self.n_clusters = n_clusters
        self.smoothed: dict[str, float] = {}
        self.steps = 0
        self.warned: set[str] = set()

    def update(self, terms: dict[str, float]) -> list[str]:
        """Feed one step's terms; returns the warnings issued now (each kind at most once per run)."""
        self.steps += 1
        for key in ("pq_usage", "clusters_used"):
            if key in terms:
                old = self.smoothed.get(key, terms[key])
                self.smoothed[key] = old + self.ALPHA * (terms[key] - old)
        if self.steps < self.WARMUP:
            return []
        out = []
        usage = self.smoothed.get("pq_usage")
        if usage is not None and usage < self.MIN_USAGE and "usage" not in self.warned:
            self.warned.add("usage")
            out.append(
                f"COLLAPSE: codebook usage fell to {usage:.3f} (< {self.MIN_USAGE}) of the codewords per batch: "
                "the quantizer maps almost every vector to a few codewords. Try model.quantizer.dead_code_steps=50 "
                "(re-seed unused codewords), loss.preset=auto (STEGO shifts measured on this data) or a lower optim.lr"
            )
        used = self.smoothed.get("clusters_used")
        if used is not None and used < self.MIN_CLUSTER_SHARE * self.n_clusters and "clusters" not in self.warned:
            self.warned.add("clusters")
            out.append(
                f"COLLAPSE: the cluster probe predicts only {used:.1f} of its {self.n_clusters} clusters: the "
                "segmentation degenerates. Try model.cluster_init=kmeans, loss.preset=auto, or check that the "
                "backbone features separate the classes (the k-means baseline of the final table)"
            )
        return out


def _truncate_csv(path: str, last_step: int) -> None:
    """Keep the header and the rows with ``step <= last_step`` of a log written by :meth:`Trainer._log`."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return
    step_col = rows[0].index("step")
    kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[step_col])) <= last_step]
    if len(kept) != len(rows):
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows(kept)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``optim.amp`` → the autocast dtype (``auto``: bf16 on CUDA, off on CPU)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def run(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Build a :class:`Trainer` from ``cfg`` (optionally resuming), train, and return the final result."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        if trainer.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()

"""EQUSS training engine: data, frozen backbone (or its feature cache), kNN pairs, the training loop,
periodic validation, atomic checkpoints with exact resume, DDP, logging, and the final evaluation.

``scripts/train.py`` is the command-line front end; :func:`run` is the programmatic one::

    from equss.config import load_config
    from equss.train import run
    result = run(load_config("configs/synthetic.yaml", ["optim.epochs=1"]))
"""

from __future__ import annotations

import csv
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

from equss.checkpoint import (
    FORMAT_VERSION,
    atomic_torch_save,
    capture_rng_state,
    check_compatible,
    load_checkpoint,
    restore_rng_state,
)
from equss.config import config_to_dict
from equss.losses import STEGO_PRESETS, StegoCorrespondenceLoss

__all__ = ["Trainer", "run", "evaluate_model"]


# ------------------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Initialise the process group when launched by ``torchrun`` (WORLD_SIZE > 1); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={spec!r} requested but CUDA is not available (use device=cpu)")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ data
class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded per-epoch shuffling, sharded over ranks, able to start mid-epoch (exact resume).

    Iterates over ``indices`` (the anchors: all training images, or all but the held-out ones). The order
    of epoch ``e`` depends only on ``(seed, e)``, so a resumed run skips exactly the batches
    that were already trained on. With ``world_size`` ranks, rank r takes every world_size-th index of
    the shuffled order (the tail that does not fill a global batch is dropped, as ``drop_last``).
    """

    def __init__(
        self, indices: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of processes {world_size}")
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.n, self.global_batch, self.seed = len(self.indices), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = self.indices[torch.randperm(self.n, generator=g)[: self.batches_per_epoch() * self.global_batch]]
        mine = order[self.rank :: self.world_size]
        return iter(mine[self.start_batch * self.local_batch :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.local_batch


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    featurize,
    n_classes: int,
    device: torch.device,
    n_clusters: int | None = None,
    crf: bool = False,
    crf_processes: int = 2,
    flip: bool = False,
    progress: bool = True,
    desc: str = "eval",
    keep: bool = False,
) -> dict[str, Any]:
    """Cluster- and linear-probe metrics over a whole evaluation set (EQUSS_SPEC §9).

    ``featurize(batch, flip=False)`` returns the backbone features of a batch. With ``crf`` the probe
    log-probabilities are refined by DenseCRF per image (needs the ``img`` of every item). ``keep`` also
    returns the per-pixel predictions (for pictures).
    """
    from equss.evaluate import ConfusionMatrix, CRFPool, batched_crf

    model.eval()
    cm_cluster = ConfusionMatrix(n_classes, n_clusters=n_clusters or n_classes)
    cm_linear = ConfusionMatrix(n_classes)
    kept: dict[str, list] = {"cluster": [], "linear": [], "label": [], "index": []}
    crf_failed = 0
    with CRFPool(crf_processes) if crf else nullcontext() as pool:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            label = batch["label"].to(device)
            f = featurize(batch).to(device)
            flip_f = featurize(batch, flip=True).to(device) if flip else None
            cluster_lp, linear_lp = model.predict(f, tuple(label.shape[-2:]), flip_f=flip_f)
            if crf:
                crf_c = batched_crf(batch["img"], cluster_lp.cpu(), pool=pool)
                crf_l = batched_crf(batch["img"], linear_lp.cpu(), pool=pool)
                crf_failed += len(crf_c.failed) + len(crf_l.failed)
                cluster_pred, linear_pred = crf_c.probs.argmax(1).to(device), crf_l.probs.argmax(1).to(device)
            else:
                cluster_pred, linear_pred = cluster_lp.argmax(1), linear_lp.argmax(1)
            cm_cluster.update(cluster_pred, label)
            cm_linear.update(linear_pred, label)
            if keep:
                kept["cluster"].append(cluster_pred.cpu())
                kept["linear"].append(linear_pred.cpu())
                kept["label"].append(label.cpu())
                kept["index"].append(torch.as_tensor(batch["index"]))
    result: dict[str, Any] = {"cluster": cm_cluster.compute("hungarian"), "linear": cm_linear.compute("identity")}
    if crf:
        result["crf_failed"] = crf_failed
    if keep:
        result["predictions"] = {k: torch.cat([torch.as_tensor(t) for t in v]) for k, v in kept.items()}
    return result


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Everything one EQUSS run needs; see the module docstring. ``Trainer(cfg).fit()``."""

    def __init__(self, cfg: DictConfig, resume: str | None = None) -> None:
        from equss.models.equss_model import EQUSSModel

        self.cfg = cfg
        self.cfg_dict = config_to_dict(cfg)
        wants_cuda = str(cfg.device).startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        self.dist = init_distributed("cuda" if wants_cuda else "cpu")
        self.device = resolve_device(str(cfg.device), self.dist)
        self.out_dir = str(cfg.output_dir)
        self.progress = bool(cfg.log.progress) and self.dist.is_main
        seed_everything(int(cfg.seed))
        if self.dist.is_main:
            os.makedirs(self.out_dir, exist_ok=True)

        self._build_data()
        self.model = EQUSSModel.from_config(cfg.model, self.backbone.embed_dim, self.n_classes).to(self.device)
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            # Buffers are synchronised by the quantizer itself (all-reduced statistics), not broadcast.
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        if str(cfg.loss.preset) not in STEGO_PRESETS:
            raise ValueError(f"loss.preset={cfg.loss.preset!r} is not one of {sorted(STEGO_PRESETS)}")
        preset = STEGO_PRESETS[str(cfg.loss.preset)]
        loss_cfg = cfg.loss
        self.stego = StegoCorrespondenceLoss(
            preset,
            feature_samples=int(loss_cfg.feature_samples),
            neg_samples=int(loss_cfg.neg_samples),
            zero_clamp=bool(loss_cfg.zero_clamp),
            pointwise=bool(loss_cfg.pointwise),
            stabilize=bool(loss_cfg.stabilize),
        )
        o = cfg.optim
        self.optimizers = {
            "head": torch.optim.Adam(self.model.head_parameters(), lr=float(o.lr)),
            "cluster_probe": torch.optim.Adam(self.model.cluster_probe.parameters(), lr=float(o.probe_lr)),
            "linear_probe": torch.optim.Adam(self.model.linear_probe.parameters(), lr=float(o.probe_lr)),
        }
        if str(cfg.eval.select_on) not in ("val", "holdout", "last"):
            raise ValueError(f"eval.select_on must be 'val', 'holdout' or 'last', got {cfg.eval.select_on!r}")
        self.amp_dtype = self._amp_dtype(str(o.amp))
        # One scaler for all three optimisers (fp16 only): unscale every optimiser before clipping, step
        # each, then update once per step (the authors' code updates once per optimiser; EQUSS_SPEC §7).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(self.train_pairs)} images, fewer than one batch of {cfg.data.batch_size}"
            )
        total = int(o.epochs) * self.steps_per_epoch
        self.total_steps = min(total, int(o.max_steps)) if o.max_steps else total
        self.step = 0
        self.best: dict[str, Any] = {"metric": -math.inf, "step": -1}
        self.history: list[dict[str, Any]] = []
        self._writers_opened = False
        if resume:
            self.load(resume)

    # ------------------------------------------------------------------------------------------ building
    def _amp_dtype(self, amp: str) -> torch.dtype | None:
        if amp == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        table = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if amp not in table:
            raise ValueError(f"optim.amp must be auto, bf16, fp16 or off, got {amp!r}")
        return table[amp]

    def _build_data(self) -> None:
        from equss.data import build_dataset
        from equss.data.knn import load_or_compute_knn
        from equss.data.pairs import PairDataset
        from equss.models.backbone import build_backbone

        cfg, d = self.cfg, self.cfg.data
        self.backbone = build_backbone(str(cfg.backbone.name), weights=cfg.backbone.weights, device=self.device)
        kwargs = dataset_kwargs(cfg)
        self.train_images = build_dataset(str(d.dataset), split=str(d.train_split), res=int(d.train_res), **kwargs)
        self.val_images = build_dataset(str(d.dataset), split=str(d.val_split), res=int(d.val_res), **kwargs)
        self.n_classes = int(self.train_images.num_classes)
        self.class_names = list(getattr(self.train_images, "class_names", [str(i) for i in range(self.n_classes)]))
        self.cache_dir = feature_cache_dir(cfg)

        if bool(cfg.backbone.cache_features):
            self.train_base, self.val_base = self._rank0_first(self._feature_caches)
            self.key = "feat"
        else:
            self.train_base, self.val_base, self.key = self.train_images, self.val_images, "img"

        nns, self.knn_path = self._rank0_first(
            lambda: load_or_compute_knn(
                self.backbone, self.train_images, dataset_id(cfg, str(d.train_split)), self.cache_dir,
                k=int(d.knn_k), device=self.device, progress=self.progress,
                features=self.train_base if self.key == "feat" else None,  # cached: no second backbone pass
            )
        )
        self.train_pairs = PairDataset(self.train_base, nns, int(d.num_neighbors), int(cfg.seed))
        anchors, self.holdout_loader = self._holdout_split(build_dataset, kwargs)
        self.sampler = ResumableSampler(
            anchors, int(d.batch_size), int(cfg.seed), self.dist.rank, self.dist.world_size
        )
        self.train_loader = torch.utils.data.DataLoader(
            self.train_pairs,
            batch_size=self.sampler.local_batch,
            sampler=self.sampler,
            num_workers=int(d.num_workers),
            drop_last=True,
            # Own generators: creating a loader iterator must not draw from the global RNG, or a resumed
            # run (which creates its iterator at another point) would see different dropout/sampling draws.
            generator=torch.Generator().manual_seed(int(cfg.seed)),
        )
        self.val_loader = torch.utils.data.DataLoader(
            self.val_base, batch_size=int(d.val_batch_size), shuffle=False, num_workers=int(d.num_workers),
            generator=torch.Generator().manual_seed(int(cfg.seed)),
        )

    def _rank0_first(self, fn):
        """``fn()`` on rank 0 first (it computes and writes a cache), then on the other ranks (they read it).

        Each rank passes exactly one barrier; without torch.distributed this is just ``fn()``."""
        if self.dist.enabled and not self.dist.is_main:
            dist.barrier()
        out = fn()
        if self.dist.enabled and self.dist.is_main:
            dist.barrier()
        return out

    def _holdout_split(self, build_dataset, kwargs) -> tuple[list[int], torch.utils.data.DataLoader | None]:
        """Anchor indices, and for ``eval.select_on=holdout`` a loader over the held-out training images.

        A seeded ``holdout_fraction`` of the training images is never an anchor, so its labels never
        train the linear probe; the checkpoint is then selected on it instead of on the reported split.
        Held-out images may still be drawn as kNN positives (their pixels, never their labels, are used).
        They are evaluated at the protocol resolution by running the backbone (no feature cache).
        """
        cfg, d = self.cfg, self.cfg.data
        n = len(self.train_base)
        if str(cfg.eval.select_on) != "holdout":
            return list(range(n)), None
        fraction = float(cfg.eval.holdout_fraction)
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"eval.holdout_fraction must be in (0, 1), got {fraction}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(cfg.seed))).tolist()
        h = max(1, round(fraction * n))
        held, anchors = sorted(perm[:h]), sorted(perm[h:])
        images = build_dataset(str(d.dataset), split=str(d.train_split), res=int(d.val_res), **kwargs)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(images, held), batch_size=int(d.val_batch_size), shuffle=False,
            num_workers=int(d.num_workers), generator=torch.Generator().manual_seed(int(cfg.seed)),
        )
        return anchors, loader

    def _feature_caches(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
        d = self.cfg.data
        train = cached_features(self.backbone, self.train_images, self.cfg, str(d.train_split), int(d.train_res),
                                self.device, self.progress, with_image=False)
        val = cached_features(self.backbone, self.val_images, self.cfg, str(d.val_split), int(d.val_res),
                              self.device, self.progress, with_image=True)
        return train, val

    def featurize(self, batch: dict[str, Any], flip: bool = False, key: str = "feat") -> Tensor:
        """Backbone features of a batch: cached ``feat``/``feat_pos`` entries are used as they are; for
        ``img``/``img_pos`` keys (no cache) the frozen backbone runs on the images."""
        if flip:
            return self.backbone(batch["img"].flip(-1).to(self.device))
        if key.startswith("feat"):
            return batch[key].to(self.device, non_blocking=True).float()
        return self.backbone(batch[key].to(self.device, non_blocking=True))

    # ---------------------------------------------------------------------------------------- training
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        self.model.train()
        f = self.featurize(batch, key=self.key)
        f_pos = self.featurize(batch, key=self.key + "_pos")
        label = batch["label"].to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        with autocast:
            out = self.ddp_model(
                f, f_pos, label, self.stego,
                stego_weight=float(self.cfg.loss.stego_weight), pq_weight=float(self.cfg.loss.pq_weight),
            )
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        for opt in self.optimizers.values():
            self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.head_parameters(), float(self.cfg.optim.grad_clip))
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        terms = {k: float(v) for k, v in out.terms.items()}
        terms["grad_norm"] = float(grad_norm)
        if not math.isfinite(terms["loss"]):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {terms}")
        return terms

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` with validation/checkpoints every ``eval.every`` steps; return the final result."""
        cfg = self.cfg
        every = int(cfg.eval.every)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.progress, dynamic_ncols=True)
        interrupted = {"flag": False}

        def on_sigterm(signum, frame):  # torchrun / schedulers send SIGTERM: finish the step, checkpoint, exit
            interrupted["flag"] = True

        previous = signal.signal(signal.SIGTERM, on_sigterm) if _in_main_thread() else None
        t0, steps0 = time.time(), self.step
        try:
            while self.step < self.total_steps and not interrupted["flag"]:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, start)
                self.train_pairs.set_epoch(epoch)
                for batch in self.train_loader:
                    terms = self.train_step(batch)
                    self.step += 1
                    bar.update(1)
                    rate = (self.step - steps0) / max(time.time() - t0, 1e-9)
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", usage=f"{terms.get('pq_usage', float('nan')):.2f}", it_s=f"{rate:.2f}")
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
    def validate(self, crf: bool = False, keep: bool = False, desc: str = "val", loader=None) -> dict[str, Any]:
        """Probe metrics on ``loader`` (default: the validation split)."""
        n_clusters = self.n_classes + int(self.cfg.model.extra_clusters)
        loader = self.val_loader if loader is None else loader
        key = "img" if loader is self.holdout_loader else self.key
        return evaluate_model(
            self.model, loader, lambda b, flip=False: self.featurize(b, flip=flip, key=key),
            self.n_classes, self.device, n_clusters=n_clusters, crf=crf,
            crf_processes=int(self.cfg.eval.crf_processes), flip=bool(self.cfg.eval.flip),
            progress=self.progress, desc=desc, keep=keep,
        )

    def validate_and_checkpoint(self) -> None:
        """Rank 0 evaluates the whole validation set (and the held-out slice for ``select_on=holdout``),
        keeps ``best.ckpt`` by cluster mIoU on the selection split, always ``last.ckpt``."""
        if self.dist.is_main:
            res = self.validate()
            row = {
                "step": self.step,
                "cluster_acc": res["cluster"].accuracy, "cluster_miou": res["cluster"].miou,
                "linear_acc": res["linear"].accuracy, "linear_miou": res["linear"].miou,
            }
            select = str(self.cfg.eval.select_on)
            if select == "holdout":
                held = self.validate(loader=self.holdout_loader, desc="holdout")
                row["holdout_cluster_miou"] = held["cluster"].miou
            self.history.append(row)
            self._log(row, "val")
            metric = {"val": row["cluster_miou"], "last": self.step}.get(select, row.get("holdout_cluster_miou"))
            if metric > self.best["metric"]:
                self.best = {"metric": metric, "step": self.step, **row}
                self.save(os.path.join(self.out_dir, "best.ckpt"))
            self.save(os.path.join(self.out_dir, "last.ckpt"))
            if self.progress:
                tqdm.write(
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
            "class_names": self.class_names,
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

                self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"))
            except ImportError:
                warnings.warn("log.tensorboard=true but tensorboard is not installed (pip install tensorboard); "
                              "logging to CSV only", stacklevel=2)

    # ------------------------------------------------------------------------------- final evaluation
    def final_evaluation(self) -> dict[str, Any]:
        """Reload the selected checkpoint, evaluate without (and optionally with) CRF, print the table."""
        from equss.evaluate import save_json

        result: dict[str, Any] = {}
        if not self.dist.is_main:
            if self.dist.enabled:
                dist.barrier()
            return result
        select = str(self.cfg.eval.select_on)
        path = os.path.join(self.out_dir, "last.ckpt" if select == "last" else "best.ckpt")
        if os.path.exists(path):
            self.model.load_state_dict(load_checkpoint(path, map_location=self.device)["model"])
        ckpt_step = self.best["step"] if select != "last" else self.step
        result["selected"] = {"checkpoint": path, "step": ckpt_step, "select_on": select}
        result["no_crf"] = self.validate(desc="final")
        if bool(self.cfg.eval.crf):
            result["crf"] = self.validate(crf=True, desc="final+crf")
        if bool(self.cfg.eval.kmeans_baseline):
            result["kmeans_baseline"] = kmeans_baseline(
                self.train_base, self.val_loader, lambda b: self.featurize(b, key=self.key),
                self.n_classes, self.device, int(self.cfg.seed), key=self.key, backbone=self.backbone,
            )
        result["chance"] = chance_level(self.val_loader)
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


# -------------------------------------------------------------------------------------- config helpers
def dataset_kwargs(cfg: DictConfig) -> dict[str, Any]:
    d = cfg.data
    kwargs: dict[str, Any] = {"root": d.root, "crop": str(d.crop)}
    if str(d.dataset) == "synthetic":
        s = d.synthetic
        kwargs.update(num_train=int(s.num_train), num_val=int(s.num_val), num_classes=int(s.num_classes), seed=int(cfg.seed))
    return kwargs


def dataset_id(cfg: DictConfig, split: str) -> str:
    """Identity of a (dataset, variant, split) for caches and kNN files."""
    d = cfg.data
    ident = f"{d.dataset}_{split}_{d.crop}"
    if str(d.dataset) == "synthetic":
        s = d.synthetic
        ident += f"_n{s.num_train if split == d.train_split else s.num_val}_c{s.num_classes}_s{cfg.seed}"
    return ident


def cached_features(backbone, images, cfg: DictConfig, split: str, res: int, device, progress: bool,
                    with_image: bool) -> torch.utils.data.Dataset:
    """The backbone features of ``images`` from the on-disk cache (computed on first use).

    Items are ``{"feat", "label", "index"}`` (+ ``"img"`` from ``images`` when ``with_image``). The cache
    key covers the backbone weights, dataset, split, resolution and crop (equss.models.feature_cache).
    """
    from equss.models.feature_cache import FeatureCache

    d = cfg.data
    cache = FeatureCache(
        backbone, images, os.path.join(feature_cache_dir(cfg), "features"),
        dataset_name=dataset_id(cfg, split), split=split, res=res, crop=str(d.crop),
        batch_size=int(d.val_batch_size), device=device, progress=progress,
    )
    return cache.dataset(return_img=with_image)


def feature_cache_dir(cfg: DictConfig) -> str:
    if cfg.backbone.cache_dir:
        return str(cfg.backbone.cache_dir)
    if cfg.data.root:
        return os.path.join(str(cfg.data.root), "equss_cache")
    return os.path.join(os.path.expanduser("~"), ".cache", "equss")


# ----------------------------------------------------------------------------------- baselines/tables
@torch.no_grad()
def kmeans_baseline(train_base, val_loader, featurize, n_classes, device, seed, key, backbone) -> dict[str, Any]:
    """The baseline every USS paper reports: k-means (K = n_classes) on the frozen backbone's features,
    fitted on (a sample of) the training features, predicted on the validation set, Hungarian-matched."""
    from equss.evaluate import ConfusionMatrix
    from equss.ops import pq_assign
    from equss.ops.kmeans import product_kmeans

    g = torch.Generator().manual_seed(seed)
    rows, budget = [], 200_000
    idx = torch.randperm(len(train_base), generator=g).tolist()
    count = 0
    for i in idx:
        item = train_base[i]
        f = item[key].unsqueeze(0) if key == "feat" else backbone(item["img"].unsqueeze(0).to(device))
        f = F.normalize(f.float(), dim=1)
        rows.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu())
        count += rows[-1].shape[0]
        if count >= budget:
            break
    x = torch.cat(rows).unsqueeze(1)  # [P, 1, C], l2-normalised: spherical (cosine) k-means
    centroids, _ = product_kmeans(x, n_classes, iters=30, metric="dot", generator=g)
    cm = ConfusionMatrix(n_classes, n_clusters=n_classes)
    for batch in val_loader:
        label = batch["label"].to(device)
        f = F.normalize(featurize(batch).float(), dim=1)
        B, C, h, w = f.shape
        codes, _ = pq_assign(f.permute(0, 2, 3, 1).reshape(-1, 1, C).cpu(), centroids, "dot")
        pred = codes.reshape(B, 1, h, w).float()
        pred = F.interpolate(pred, size=label.shape[-2:], mode="nearest").long().squeeze(1)
        cm.update(pred.to(device), label)
    return {"cluster": cm.compute("hungarian")}


def chance_level(loader) -> dict[str, float]:
    """Majority-class pixel accuracy of the evaluation labels (the accuracy of predicting one class)."""
    counts = None
    for batch in loader:
        lab = batch["label"].flatten()
        lab = lab[lab >= 0]
        c = torch.bincount(lab)
        counts = c if counts is None else _add_padded(counts, c)
    if counts is None or counts.sum() == 0:
        return {"majority_acc": float("nan")}
    return {"majority_acc": 100.0 * float(counts.max()) / float(counts.sum())}


def _add_padded(a: Tensor, b: Tensor) -> Tensor:
    n = max(len(a), len(b))
    return F.pad(a, (0, n - len(a))) + F.pad(b, (0, n - len(b)))


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"selected": result.get("selected"), "chance": result.get("chance")}
    for key in ("no_crf", "crf", "kmeans_baseline"):
        if key in result:
            out[key] = {probe: res.to_dict() for probe, res in result[key].items() if probe in ("cluster", "linear")}
    return out


def format_results(result: dict[str, Any], cfg: DictConfig) -> str:
    lines = [
        f"## EQUSS results: {cfg.data.dataset}, backbone {cfg.backbone.name} "
        f"(checkpoint: {result['selected']['select_on']}, step {result['selected']['step']})",
        "",
        "| method | cluster Acc | cluster mIoU | linear Acc | linear mIoU |",
        "| --- | --- | --- | --- | --- |",
    ]
    chance = result.get("chance", {}).get("majority_acc", float("nan"))
    lines.append(f"| chance (majority class) | {chance:.1f} | — | — | — |")
    if "kmeans_baseline" in result:
        km = result["kmeans_baseline"]["cluster"]
        lines.append(f"| k-means on backbone features | {km.accuracy:.1f} | {km.miou:.1f} | — | — |")
    for key, name in (("no_crf", "EQUSS"), ("crf", "EQUSS + CRF")):
        if key in result:
            c, lin = result[key]["cluster"], result[key]["linear"]
            lines.append(f"| {name} | {c.accuracy:.1f} | {c.miou:.1f} | {lin.accuracy:.1f} | {lin.miou:.1f} |")
    return "\n".join(lines)


def run(cfg: DictConfig, resume: str | None = None) -> dict[str, Any]:
    """Build a :class:`Trainer` from ``cfg`` (optionally resuming), train, and return the final result."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        if trainer.dist.enabled and dist.is_initialized():
            dist.destroy_process_group()

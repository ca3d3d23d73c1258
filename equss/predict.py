"""Segment new images with a trained EQUSS checkpoint: label PNGs, colour overlays with a legend, optional CRF.

:class:`Predictor` holds what a checkpoint needs at prediction time (its configuration, frozen backbone,
model, class names and, for runs trained with labels, the cluster → class matching found by the run's
final evaluation) and segments images of **any size**: each image is resized (bilinear) so its shorter
side is the run's evaluation resolution ``data.val_res`` — the protocol's scale, at which the probes were
validated — then cropped to a multiple of the backbone's patch size (at most ``patch − 1`` pixels per
side, centred); the probe log-probabilities are computed there and upsampled bilinearly back to the
original ``H × W``, so every output is at the input's own resolution. Images of one size are batched.

Per image ``<name>`` it writes (:meth:`Predictor.predict_files`):

* ``<name>_cluster.png`` — uint8 ids of the cluster probe's prediction: class ids (matched as in the
  run's final evaluation) for labelled runs, cluster ids for unlabelled ones; 255 = a cluster no class
  was matched to;
* ``<name>_linear.png`` — the linear probe's class ids (labelled runs only: it was trained on labels);
* ``<name>_overlay.png`` — the image blended with the dataset palette, cluster (and linear) panels side by
  side, and a legend of the names present.

``scripts/predict.py`` is the command-line front end.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from equss.data.imagefolder import IMAGE_EXTENSIONS
from equss.normalization import IMAGENET_MEAN, IMAGENET_STD
from equss.palettes import IGNORE_COLOR, colorize, get_palette
from equss.pipeline import load_trained
from equss.progress import Progress

__all__ = ["Prediction", "Predictor", "find_images"]

log = logging.getLogger(__name__)

UNMATCHED = 255  # written for clusters that no class was matched to (and never a valid class id here)
_MIN_PANEL = 128  # overlay panels narrower than this (pixels) are enlarged


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from a mix of files, folders (searched recursively) and glob patterns, sorted, unique.

    Raises ``FileNotFoundError`` naming the first input that matches no image.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            matches = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            matches = [p]
        else:
            matches = sorted(Path(q) for q in glob.glob(str(item), recursive=True)
                             if Path(q).is_file() and Path(q).suffix.lower() in IMAGE_EXTENSIONS)
        if not matches:
            raise FileNotFoundError(f"--images {item}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found there")
        found.extend(matches)
    return sorted(dict.fromkeys(found))


@dataclass
class Prediction:
    """One image's result: ``cluster`` and ``linear`` ``int64 [H, W]`` maps at the image's own size
    (``linear`` is ``None`` for unlabelled runs) and the RGB image ``uint8 [H, W, 3]``."""

    name: str
    image: np.ndarray
    cluster: np.ndarray
    linear: np.ndarray | None


class Predictor:
    """A trained checkpoint ready to segment images (see the module docstring).

    Args:
        checkpoint: a ``best.ckpt``/``last.ckpt`` written by ``scripts/train.py``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        matching: JSON with the cluster → class matching (default: the ``results.json`` the run wrote next
            to the checkpoint); ignored for unlabelled runs.
        overrides: non-structural configuration overrides (e.g. ``backbone.weights=PATH`` when the
            weights moved).
        res: the shorter side images are resized to (default: the run's ``data.val_res``).
    """

    def __init__(self, checkpoint: str, device: str = "auto", matching: str | None = None,
                 overrides: Sequence[str] = (), res: int | None = None) -> None:
        self.cfg, self.model, self.backbone, ckpt, self.device = load_trained(checkpoint, overrides, device)
        self.class_names = list(ckpt["class_names"])
        self.n_classes = int(ckpt["n_classes"])
        self.res = int(res or self.cfg.data.val_res)
        self.patch = int(getattr(self.backbone, "patch_size", 8))
        self.labelled = bool(ckpt.get("labelled", True))
        self.assignment = self._matching(checkpoint, matching) if self.labelled else None
        try:
            self.palette = get_palette(self.cfg.data.dataset, self.n_classes)
        except ValueError:
            self.palette = get_palette(None, self.n_classes)

    def _matching(self, checkpoint: str, path: str | None) -> np.ndarray | None:
        path = path or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "results.json")
        try:
            assignment = json.loads(Path(path).read_text())["no_crf"]["cluster"]["assignment"]
        except (OSError, KeyError, TypeError, ValueError):
            log.warning("no cluster → class matching in %s: the cluster PNGs hold cluster ids "
                        "(pass --matching <results.json> of the run's evaluation)", path)
            return None
        n_clusters = self.model.cluster_probe.n_clusters
        if len(assignment) != n_clusters:
            raise ValueError(f"--matching {path}: {len(assignment)} clusters matched, the model has {n_clusters}")
        return np.asarray([a if a is not None and a >= 0 else UNMATCHED for a in assignment], dtype=np.int64)

    # ------------------------------------------------------------------------------------- transforms
    def _prepare(self, image: Image.Image) -> Tensor:
        """RGB image → normalised ``[3, h, w]`` at the prediction scale, a multiple of the patch size."""
        W, H = image.size
        scale = self.res / min(H, W)
        h, w = max(self.patch, round(H * scale)), max(self.patch, round(W * scale))
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        hc, wc = h - h % self.patch, w - w % self.patch
        top, left = (h - hc) // 2, (w - wc) // 2
        x = x[:, top : top + hc, left : left + wc]
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def _log_probs(self, batch: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Probe log-probabilities of a batch, upsampled to the original ``size``."""
        f = self.backbone(batch.to(self.device))
        cluster, linear = self.model.predict(f, tuple(batch.shape[-2:]))
        up = lambda t: F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False)  # noqa: E731
        return up(cluster).log_softmax(1), up(linear).log_softmax(1)

    # -------------------------------------------------------------------------------------- predicting
    def predict(self, images: Sequence[tuple[str, Image.Image]], batch_size: int = 8, crf: bool = False,
                crf_processes: int = 2, progress: bool = True) -> Iterable[Prediction]:
        """Segment ``(name, image)`` pairs; yields :class:`Prediction` in input order within each size group."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (_, im) in enumerate(images):
            groups[(im.size[1], im.size[0])].append(i)
        pool = None
        if crf:
            from equss.crf import CRFPool

            pool = CRFPool(crf_processes)
        try:
            bar = Progress(total=len(images), desc="predict", unit="img", enabled=progress)
            for size, idx in groups.items():
                for start in range(0, len(idx), batch_size):
                    chunk = idx[start : start + batch_size]
                    batch = torch.stack([self._prepare(images[i][1]) for i in chunk])
                    cluster_lp, linear_lp = self._log_probs(batch, size)
                    rgb = [np.asarray(images[i][1].convert("RGB")) for i in chunk]
                    if pool is not None:
                        from equss.crf import batched_crf

                        bgr = [np.ascontiguousarray(im[:, :, ::-1]) for im in rgb]  # the authors' channel order
                        cluster_lp = batched_crf(bgr, cluster_lp.cpu(), pool=pool).probs
                        linear_lp = batched_crf(bgr, linear_lp.cpu(), pool=pool).probs
                    cluster = cluster_lp.argmax(1).cpu().numpy()
                    linear = linear_lp.argmax(1).cpu().numpy()
                    for j, i in enumerate(chunk):
                        c = self.assignment[cluster[j]] if self.assignment is not None else cluster[j]
                        yield Prediction(images[i][0], rgb[j], c, linear[j] if self.labelled else None)
                    bar.update(len(chunk))
            bar.close()
        finally:
            if pool is not None:
                pool.close()

    def predict_files(self, paths: Sequence[Path], out_dir: str | os.PathLike, batch_size: int = 8,
                      crf: bool = False, crf_processes: int = 2, progress: bool = True) -> list[Path]:
        """Segment image files and write the PNGs of the module docstring to ``out_dir``; returns them."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = _unique_names(paths)
        images = [(names[p], Image.open(p)) for p in paths]
        written: list[Path] = []
        for pred in self.predict(images, batch_size, crf, crf_processes, progress):
            written.append(_save_ids(out / f"{pred.name}_cluster.png", pred.cluster))
            if pred.linear is not None:
                written.append(_save_ids(out / f"{pred.name}_linear.png", pred.linear))
            written.append(self.save_overlay(out / f"{pred.name}_overlay.png", pred))
        return written

    def save_overlay(self, path: Path, pred: Prediction, alpha: float = 0.55) -> Path:
        """Image | cluster overlay (| linear overlay), and a legend of the names present."""
        panels = [pred.image, self._blend(pred.image, pred.cluster, alpha)]
        titles = ["image", "cluster probe"]
        if pred.linear is not None:
            panels.append(self._blend(pred.image, pred.linear, alpha))
            titles.append("linear probe")
        # Small images are enlarged by an integer factor (nearest: every pixel keeps its colour) so the
        # panels are wide enough for their titles.
        scale = max(1, -(-_MIN_PANEL // pred.image.shape[1]))
        panels = [np.repeat(np.repeat(p, scale, axis=0), scale, axis=1) for p in panels]
        present = sorted(set(np.unique(pred.cluster).tolist()) | set(np.unique(pred.linear).tolist()
                                                                    if pred.linear is not None else []))
        H, W = panels[0].shape[:2]
        pad, header, row = 6, 18, 16
        legend_w = 150
        canvas = Image.new("RGB", (len(panels) * (W + pad) + pad + legend_w, max(H + header + pad,
                                                                               header + row * (len(present) + 1))),
                           (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for k, (panel, title) in enumerate(zip(panels, titles)):
            x0 = pad + k * (W + pad)
            canvas.paste(Image.fromarray(panel), (x0, header))
            draw.text((x0, 3), title, fill=(0, 0, 0))
        x0 = pad + len(panels) * (W + pad)
        for r, cid in enumerate(present):
            colour = tuple(int(v) for v in (self.palette[cid] if 0 <= cid < len(self.palette) else IGNORE_COLOR))
            name = self.class_names[cid] if 0 <= cid < len(self.class_names) else "unmatched"
            y = header + r * row
            draw.rectangle([x0, y + 2, x0 + 12, y + 12], fill=colour, outline=(0, 0, 0))
            draw.text((x0 + 18, y), name, fill=(0, 0, 0))
        canvas.save(path)
        return path

    def _blend(self, image: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
        colours = colorize(ids, self.palette).astype(np.float32)
        return (alpha * colours + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)


def _save_ids(path: Path, ids: np.ndarray) -> Path:
    Image.fromarray(np.where((ids >= 0) & (ids < 255), ids, UNMATCHED).astype(np.uint8)).save(path)
    return path


def _unique_names(paths: Sequence[Path]) -> dict[Path, str]:
    """File stems, disambiguated with the parent folder's name where two inputs share a stem."""
    stems = defaultdict(list)
    for p in paths:
        stems[p.stem].append(p)
    return {p: (p.stem if len(group) == 1 else f"{p.parent.name}_{p.stem}") for group in stems.values() for p in group}

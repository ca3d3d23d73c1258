"""The STEGO/EQUSS input pipeline for an (image, label map) pair.

Default (spec §7): resize with **nearest** interpolation so the shorter side is ``res``, centre crop
``res × res`` (same geometry for image and label), image to float in [0, 1] and normalised with the
ImageNet mean/std. Options, off by default because the pqgo model uses neither:

* ``geometric_aug``: random horizontal flip and ``RandomResizedCrop(res, scale=(0.8, 1.0))`` applied
  jointly to image (bilinear) and label (nearest) after the centre crop (STEGO's geometric transform).
* ``photometric_aug``: a photometrically augmented *copy* of the image, returned as ``img_aug``
  (ColorJitter 0.3/0.3/0.3/0.1, RandomGrayscale 0.2, GaussianBlur 5×5 with σ ∈ [0.1, 2] applied with
  probability 0.5 — STEGO's/EQUSS's ``aug_photometric_transform``). The label is unaffected.

Nearest resizing is done by index selection with PIL's pixel-centre rule
``src = floor((dst + 0.5) · in / out)``, identical for the uint8 image and the int64 label (interpolation
routines differ per dtype; an index gather cannot).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from equss.normalization import IMAGENET_MEAN, IMAGENET_STD

IGNORE_INDEX = -1


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel for nearest resizing (PIL's pixel-centre convention)."""
    idx = np.floor((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size)).astype(np.int64)
    return np.clip(idx, 0, in_size - 1)


def resize_nearest(x, size: tuple[int, int], channels_last: bool = False):
    """Nearest resize of ``x [..., H, W]`` (or ``[H, W, C]`` with ``channels_last``), numpy array or
    tensor of any dtype, to ``size = (h, w)``."""
    hw_axes = (0, 1) if channels_last else (x.ndim - 2, x.ndim - 1)
    H, W = x.shape[hw_axes[0]], x.shape[hw_axes[1]]
    h, w = size
    if (H, W) == (h, w):
        return x
    rows, cols = _nearest_indices(H, h), _nearest_indices(W, w)
    if isinstance(x, Tensor):
        return x.index_select(hw_axes[0], torch.from_numpy(rows)).index_select(hw_axes[1], torch.from_numpy(cols))
    return np.take(np.take(x, rows, axis=hw_axes[0]), cols, axis=hw_axes[1])


def shorter_side_size(H: int, W: int, res: int) -> tuple[int, int]:
    """Output size when the shorter side becomes ``res`` (torchvision ``Resize(int)`` rule)."""
    if H <= W:
        return res, int(res * W / H)
    return int(res * H / W), res


def center_crop_box(H: int, W: int, res: int) -> tuple[int, int]:
    """``(top, left)`` of the centre ``res × res`` crop (torchvision's offset rounding); needs H, W >= res."""
    if H < res or W < res:
        raise ValueError(f"center crop: input {H}x{W} is smaller than the crop {res}x{res}")
    return int(round((H - res) / 2.0)), int(round((W - res) / 2.0))


def to_arrays(img: Image.Image | np.ndarray, label: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """PIL/uint8 ``[H,W,3]`` image and int label ``[H,W]`` (None → all ignore) to ``uint8 [H,W,3]`` and
    ``int64 [H,W]`` arrays; checks that the two have the same size."""
    # np.array (a copy) rather than asarray: PIL buffers are read-only and torch warns on those
    arr = np.array(img.convert("RGB")) if isinstance(img, Image.Image) else np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    if label is None:
        lab = np.full(arr.shape[:2], IGNORE_INDEX, dtype=np.int64)
    else:
        lab = np.asarray(label)
        if lab.shape != arr.shape[:2]:
            raise ValueError(f"label shape {lab.shape} does not match image shape {arr.shape[:2]}")
        lab = lab.astype(np.int64, copy=False)
    return arr, lab


class SegmentationTransform:
    """Callable ``(img, label) -> dict`` implementing the pipeline described in the module docstring.

    Returns ``{"img": float32 [3,res,res], "label": int64 [res,res]}`` and, with ``photometric_aug``,
    ``"img_aug": float32 [3,res,res]``. Random augmentations draw from torch's global RNG (seeded per
    DataLoader worker by PyTorch).
    """

    def __init__(self, res: int, photometric_aug: bool = False, geometric_aug: bool = False):
        if not isinstance(res, int) or res < 1:
            raise ValueError(f"res must be a positive int, got {res!r}")
        self.res = res
        self.photometric_aug = photometric_aug
        self.geometric_aug = geometric_aug
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._mean_np = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
        self._std_np = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
        self._photometric = None
        if photometric_aug:
            import torchvision.transforms as T

            self._photometric = T.Compose(
                [
                    T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
                    T.RandomGrayscale(0.2),
                    T.RandomApply([T.GaussianBlur((5, 5), sigma=(0.1, 2.0))], p=0.5),
                ]
            )

    def normalize(self, img: Tensor) -> Tensor:
        """float [3,H,W] in [0,1] → ImageNet-normalised."""
        return (img - self._mean) / self._std

    def _geometric(self, img: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        import torchvision.transforms as T
        import torchvision.transforms.functional as TF

        if torch.rand(()) < 0.5:
            img, label = img.flip(-1), label.flip(-1)
        i, j, h, w = T.RandomResizedCrop.get_params(img, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3))
        img = TF.resized_crop(img, i, j, h, w, [self.res, self.res], antialias=True)
        label = resize_nearest(label[i : i + h, j : j + w], (self.res, self.res))
        return img.clamp_(0.0, 1.0), label

    def __call__(self, img: Image.Image | np.ndarray, label: np.ndarray | None) -> dict[str, Tensor]:
        # The default path is numpy: per-item work on small arrays, where torch's intra-op thread pool
        # only adds overhead (and stalls badly on a busy machine).
        arr, lab = to_arrays(img, label)
        size = shorter_side_size(arr.shape[0], arr.shape[1], self.res)
        arr = resize_nearest(arr, size, channels_last=True)
        lab = resize_nearest(lab, size)
        top, left = center_crop_box(size[0], size[1], self.res)
        arr = arr[top : top + self.res, left : left + self.res]
        lab = lab[top : top + self.res, left : left + self.res]
        img01 = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
        lab_t = torch.from_numpy(np.ascontiguousarray(lab))
        if not (self.geometric_aug or self.photometric_aug):
            return {"img": torch.from_numpy((img01 - self._mean_np) / self._std_np), "label": lab_t}
        img01 = torch.from_numpy(img01)
        if self.geometric_aug:
            img01, lab_t = self._geometric(img01, lab_t)
        out = {"img": self.normalize(img01), "label": lab_t.contiguous()}
        if self._photometric is not None:
            out["img_aug"] = self.normalize(self._photometric(img01))
        return out

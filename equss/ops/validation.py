"""Argument checks for the public PQ ops: clear ``TypeError``/``ValueError``/``IndexError`` naming the shapes.

Backends never see unchecked input: every public wrapper in :mod:`equss.ops` runs these first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from equss.ops.reference import METRICS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CODE_DTYPES = (torch.int32, torch.int64)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(t: object, name: str, op: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(t: object, name: str, op: str) -> Tensor:
    t = check_tensor(t, name, op)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype} (shape {_shape(t)})"
        )
    return t


def check_codes(codes: object, op: str, N: int | None = None, M: int | None = None) -> Tensor:
    codes = check_tensor(codes, "codes", op)
    if codes.dtype not in CODE_DTYPES:
        raise TypeError(f"{op}: codes must be int32 or int64, got {codes.dtype} (shape {_shape(codes)})")
    if codes.dim() != 2:
        raise ValueError(f"{op}: codes must be [N, M], got shape {_shape(codes)}")
    if N is not None and codes.shape[0] != N:
        raise ValueError(f"{op}: codes has N={codes.shape[0]} rows but x has N={N} (codes {_shape(codes)})")
    if M is not None and codes.shape[1] != M:
        raise ValueError(f"{op}: codes has M={codes.shape[1]} subspaces but codebooks has M={M} (codes {_shape(codes)})")
    return codes


def _host_checkable(t: Tensor) -> bool:
    """Values can be read on the host without a device sync or a graph break (eager CPU tensors)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


def check_codes_range(codes: Tensor, K: int, op: str) -> None:
    """Codes must lie in ``[0, K)``.

    Eager CPU tensors: raise ``IndexError`` naming the values found. Everywhere else (CUDA, meta and fake
    tensors, ``torch.compile``): ``torch._assert_async``, which never leaves the device, never breaks a
    graph and is a no-op on meta/fake tensors; on CUDA a violation is a device-side assert reported at the
    next synchronisation (like ``index_select``). Pass ``check_range=False`` to skip the check: every
    backend then gathers zeros for out-of-range codes and leaves them out of every sum (``reference.py``).
    """
    if codes.numel() == 0:
        return
    if _host_checkable(codes):
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= K:
            raise IndexError(f"{op}: codes must lie in [0, K={K}), got values in [{lo}, {hi}] (codes {_shape(codes)})")
        return
    torch._assert_async(
        ((codes >= 0) & (codes < K)).all(),
        f"{op}: codes must lie in [0, K={K}) (codes {_shape(codes)}); pass check_range=False to gather zeros instead",
    )


def check_codebooks(codebooks: object, op: str) -> Tensor:
    codebooks = check_float(codebooks, "codebooks", op)
    if codebooks.dim() != 3:
        raise ValueError(f"{op}: codebooks must be [M, K, Ds], got shape {_shape(codebooks)}")
    M, K, Ds = codebooks.shape
    if M == 0 or K == 0 or Ds == 0:
        raise ValueError(f"{op}: codebooks must have M, K, Ds >= 1, got shape {_shape(codebooks)}")
    return codebooks


def check_x_codebooks(x: object, codebooks: object, op: str) -> tuple[Tensor, Tensor]:
    """Check ``x [N, M, Ds]`` against ``codebooks [M, K, Ds]``: dtypes, ranks, M, Ds, device."""
    x = check_float(x, "x", op)
    codebooks = check_codebooks(codebooks, op)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [N, M, Ds], got shape {_shape(x)} (codebooks {_shape(codebooks)})")
    if x.shape[1] != codebooks.shape[0] or x.shape[2] != codebooks.shape[2]:
        raise ValueError(
            f"{op}: x [N, M, Ds] = {_shape(x)} does not match codebooks [M, K, Ds] = {_shape(codebooks)} "
            f"(need equal M and Ds)"
        )
    check_same_device(op, x=x, codebooks=codebooks)
    return x, codebooks


def check_same_device(op: str, **tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_metric(metric: object, op: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    return metric  # type: ignore[return-value]


def check_buffer(t: object, name: str, shape: tuple[int, ...], op: str, fp32: bool = True) -> Tensor:
    """An in-place buffer: exact shape, float32 (if ``fp32``), contiguous (a copy would not be updated)."""
    t = check_float(t, name, op)
    if _shape(t) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {_shape(t)}")
    if fp32 and t.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must be float32 (EMA statistics accumulate in fp32), got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} is updated in place and must be contiguous (strides {t.stride()})")
    return t


def check_ema_scalars(decay: float, eps: float, op: str) -> None:
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"{op}: decay must be in [0, 1], got {decay}")
    if not float(eps) > 0.0:
        raise ValueError(
            f"{op}: eps must be > 0, got {eps} (Laplace smoothing: with eps = 0 an unused codeword divides 0 by 0)"
        )

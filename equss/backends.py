"""Which implementation runs a PQ op: ``triton`` | ``ext`` (C++/CUDA extension) | ``torch`` (reference).

Selection happens at call time, per op call, from the device of the inputs:

* ``auto`` (default): Triton for CUDA tensors when it imports, else the C++ extension when it loaded and
  was built for that device, else the PyTorch reference.
* ``EQUSS_BACKEND=triton|ext|torch`` (environment) or ``with equss.use_backend("ext"):`` forces one.
  A forced backend that cannot run raises :class:`RuntimeError` with the reason it failed to load and
  the command that fixes it — never a silent fallback.

Availability is probed once, lazily, and the failure reasons are kept: ``equss.backends.describe()``
or ``python -m equss`` prints them.

Every backend implements the ops in :data:`OP_NAMES` with the signatures of the ``*_ref`` twins in
:mod:`equss.ops.reference`: the reference itself (``torch``), the ``<op>_triton`` launchers of
:mod:`equss.kernels` (``triton``) and the ``torch.ops.equss_C.<op>`` kernels of ``csrc/`` (``ext``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["BACKENDS", "BackendInfo", "available", "describe", "get_backend", "info", "select", "use_backend"]

BACKENDS = ("triton", "ext", "torch")
_CHOICES = ("auto",) + BACKENDS
OP_NAMES = ("pq_assign", "pq_assign_gather", "pq_gather", "pq_gather_backward", "pq_cluster_stats", "pq_ema_apply_")

_INSTALL_EXT = (
    "pip install --no-build-isolation -e .   (needs a C++ compiler; for CUDA also CUDA_HOME and a CUDA "
    "build of torch; see README 'Install')"
)
_INSTALL_TRITON = "pip install 'equss[triton]'   (or: pip install triton)"


@dataclass
class BackendInfo:
    """What was found for one backend: whether it loaded, on which devices it runs, and why not."""

    name: str
    loaded: bool
    devices: tuple[str, ...]
    detail: str
    fix: str = ""


_lock = threading.Lock()
_infos: dict[str, BackendInfo] = {}
_modules: dict[str, types.SimpleNamespace] = {}
_forced = threading.local()


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def impl_name(op: str, suffix: str) -> str:
    """``pq_assign`` → ``pq_assign_<suffix>``; in-place ops keep the trailing underscore last
    (``pq_ema_apply_`` → ``pq_ema_apply_ref_``, ``pq_ema_apply_triton_``)."""
    return f"{op[:-1]}_{suffix}_" if op.endswith("_") else f"{op}_{suffix}"


def ref_name(op: str) -> str:
    """``pq_assign`` → ``pq_assign_ref``: the reference twin's name in :mod:`equss.ops.reference`."""
    return impl_name(op, "ref")


def _probe_torch() -> None:
    from equss.ops import reference as ref

    _modules["torch"] = types.SimpleNamespace(**{name: getattr(ref, ref_name(name)) for name in OP_NAMES})
    _infos["torch"] = BackendInfo("torch", True, ("cpu", "cuda", "any"), "pure-PyTorch reference (always available)")


def extension_library_path() -> str | None:
    """Path of the built ``equss/_C*.so`` (or ``.pyd``), or ``None`` when it was not built."""
    candidates = sorted(glob.glob(os.path.join(_package_dir(), "_C*.so")) + glob.glob(os.path.join(_package_dir(), "_C*.pyd")))
    return candidates[0] if candidates else None


def _probe_ext() -> None:
    if os.environ.get("EQUSS_DISABLE_EXT", "0") == "1":
        _infos["ext"] = BackendInfo("ext", False, (), "disabled by EQUSS_DISABLE_EXT=1", _INSTALL_EXT)
        return
    path = extension_library_path()
    if path is None:
        _infos["ext"] = BackendInfo(
            "ext", False, (), f"no compiled library equss/_C*.so next to {_package_dir()} (not built)", _INSTALL_EXT
        )
        return
    try:
        torch.ops.load_library(path)
        ns = torch.ops.equss_C
        has_cuda = bool(ns.has_cuda())
    except Exception as exc:  # keep the reason: describe() shows it, forcing 'ext' raises it
        _infos["ext"] = BackendInfo("ext", False, (), f"failed to load {path}: {type(exc).__name__}: {exc}", _INSTALL_EXT)
        return
    _modules["ext"] = types.SimpleNamespace(**{name: getattr(ns, name) for name in OP_NAMES})
    devices = ("cpu", "cuda") if has_cuda else ("cpu",)
    detail = f"loaded {os.path.basename(path)}; devices: {', '.join(devices)}"
    if not has_cuda:
        detail += " (built without CUDA)"
    _infos["ext"] = BackendInfo("ext", True, devices, detail, _INSTALL_EXT)


def triton_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_triton() -> None:
    try:
        import triton  # noqa: F401

        import equss.kernels as kernels
    except Exception as exc:
        _infos["triton"] = BackendInfo("triton", False, (), f"cannot import: {type(exc).__name__}: {exc}", _INSTALL_TRITON)
        return
    _modules["triton"] = types.SimpleNamespace(**{name: getattr(kernels, impl_name(name, "triton")) for name in OP_NAMES})
    devices = ("cpu",) if triton_interpreted() else ("cuda",)
    where = "interpreter on CPU tensors (TRITON_INTERPRET=1)" if triton_interpreted() else "CUDA tensors"
    _infos["triton"] = BackendInfo("triton", True, devices, f"triton {triton.__version__}; runs on {where}", _INSTALL_TRITON)


_PROBES = {"torch": _probe_torch, "ext": _probe_ext, "triton": _probe_triton}


def info(name: str) -> BackendInfo:
    """Probe (once) and return the :class:`BackendInfo` of backend ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    with _lock:
        if name not in _infos:
            _PROBES[name]()
        return _infos[name]


def available(name: str, device: torch.device | str | None = None) -> bool:
    """Whether backend ``name`` loaded (and, if ``device`` is given, runs on tensors of that device type)."""
    i = info(name)
    if not i.loaded:
        return False
    if device is None:
        return True
    dev = torch.device(device).type
    return dev in i.devices or "any" in i.devices


def _requested() -> str:
    forced = getattr(_forced, "name", None)
    if forced is not None:
        return forced
    env = os.environ.get("EQUSS_BACKEND", "auto").strip().lower() or "auto"
    if env not in _CHOICES:
        raise ValueError(f"EQUSS_BACKEND={env!r} is not one of {_CHOICES}")
    return env


def select(device: torch.device | str) -> str:
    """Name of the backend that runs ops on ``device`` under the current setting (``auto`` resolved)."""
    requested = _requested()
    dev = torch.device(device).type
    if requested == "auto":
        order = ("triton", "ext", "torch") if dev == "cuda" else ("ext", "torch")
        for name in order:
            if available(name, dev):
                return name
        return "torch"
    i = info(requested)
    if not i.loaded:
        raise RuntimeError(f"equss backend {requested!r} was requested but is not available: {i.detail}. Fix: {i.fix}")
    if not available(requested, dev):
        hint = ""
        if requested == "triton" and dev == "cpu":
            hint = " Set TRITON_INTERPRET=1 before importing equss to run Triton kernels on CPU tensors."
        elif requested == "ext" and dev == "cuda":
            hint = " The extension was built without CUDA: rebuild with CUDA_HOME set and a CUDA build of torch."
        raise RuntimeError(
            f"equss backend {requested!r} cannot run on {dev} tensors (it runs on: {', '.join(i.devices) or 'nothing'}).{hint}"
        )
    return requested


def get_backend(device: torch.device | str) -> types.SimpleNamespace:
    """The namespace of op functions for ``device`` (see :func:`select`)."""
    name = select(device)
    info(name)
    return _modules[name]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (thread-local): ``with equss.use_backend("ext"): ...``.

    ``name`` is one of ``auto``, ``triton``, ``ext``, ``torch``. Availability is checked when an op runs,
    so the error names the device the op was called on.
    """
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def describe() -> str:
    """Human-readable report: versions, each backend, whether it loaded and why not, the auto choice."""
    lines = [
        f"equss backends (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})",
        f"  requested: {_requested()} (EQUSS_BACKEND={os.environ.get('EQUSS_BACKEND', '<unset>')})",
    ]
    for name in BACKENDS:
        i = info(name)
        state = "ok " if i.loaded else "MISSING"
        lines.append(f"  {name:<7} {state:<7} {i.detail}")
        if not i.loaded and i.fix:
            lines.append(f"          fix: {i.fix}")
    auto = []
    for dev in ("cpu", "cuda"):
        try:
            auto.append(f"{dev} -> {select(dev)}")
        except (RuntimeError, ValueError) as exc:
            auto.append(f"{dev} -> error ({exc})")
    lines.append("  dispatch: " + "; ".join(auto))
    return "\n".join(lines)


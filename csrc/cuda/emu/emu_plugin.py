"""pytest plugin: the ``ext`` backend on CPU runs the CPU-emulated CUDA kernels (pq_ema_apply_ stays the CPU
kernel). ``PYTHONPATH=.:csrc/cuda/emu python -m pytest -p emu_plugin tests/test_pq_*.py -k ext``."""

from __future__ import annotations

import collections
import types

import emu_build
import torch

torch.ops.load_library(emu_build.library_path())

from equss import backends  # noqa: E402

backends.info("ext")
_real = backends._modules["ext"]
_ns = getattr(torch.ops, emu_build.name())
CALLS: collections.Counter = collections.Counter()


def _wrap(op_name):
    fn = getattr(_ns, op_name)

    def call(*args, **kwargs):
        CALLS[op_name] += 1
        return fn(*args, **kwargs)

    return call


backends._modules["ext"] = types.SimpleNamespace(
    **{n: (_wrap(n) if n != "pq_ema_apply_" else _real.pq_ema_apply_) for n in backends.OP_NAMES}
)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"emulated CUDA kernel calls: {dict(CALLS)}")

"""pytest plugin for tests/test_ext.py: its raw-op calls (``_ops()``) go to the CPU-emulated CUDA kernels.
``PYTHONPATH=.:csrc/cuda/emu python -m pytest -p emu_ext_plugin tests/test_ext.py -k "kernel_ and cpu-scalar"``."""

from __future__ import annotations

import emu_build
import pytest
import torch

torch.ops.load_library(emu_build.library_path())


@pytest.fixture(autouse=True)
def _emulated_ops(monkeypatch, request):
    if hasattr(request.module, "_ops"):
        monkeypatch.setattr(request.module, "_ops", lambda: getattr(torch.ops, emu_build.name()))

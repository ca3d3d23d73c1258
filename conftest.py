"""Root pytest configuration shared by tests/ and benchmarks/.

* ``--benchmark``: time the suites under ``benchmarks/`` (``pytest benchmarks/ --benchmark``). Without it,
  benchmark functions run once each as a smoke test (pytest-benchmark's ``--benchmark-disable``), so a
  plain ``pytest`` stays fast; ``testpaths`` only collects ``tests/`` anyway.
* Without a CUDA device, Triton kernels run under the Triton interpreter on CPU tensors: set
  ``TRITON_INTERPRET=1`` here, before anything imports triton or ``equss.kernels``.
* ``HF_HUB_OFFLINE=1``: timm would otherwise retry the model hub for ~47 s before failing offline.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _no_cuda() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:
        return True


if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the pytest-benchmark suites with timing (otherwise each benchmark runs once, untimed)",
    )


def pytest_configure(config):
    if not config.getoption("--benchmark") and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True

"""Shared fixtures. ``backend`` runs a PQ-op test once per backend (and device) that can run it;
``one_thread`` limits a test to one intra-op thread.

``backend`` is parametrised over ``torch`` (the pure-PyTorch reference), ``ext`` (the C++ extension) and
``triton``; with a CUDA device also ``ext-cuda``. Triton runs on CUDA tensors when there is a GPU, else on
CPU tensors under the interpreter (the root ``conftest.py`` sets ``TRITON_INTERPRET=1``). A backend that
cannot run on its device is skipped with the reason :mod:`equss.backends` recorded (and the fix), never
silently replaced by another one: the fixture forces it with ``equss.use_backend(name)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import equss
from equss import backends

_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Backend:
    """The backend a test runs on: ``name`` (``torch`` | ``ext`` | ``triton``) and the tensors' ``device``."""

    name: str
    device: str

    def to(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` (drawn on CPU) on this backend's device, optionally cast to ``dtype``."""
        return t.to(device=self.device, dtype=dtype if dtype is not None else t.dtype)

    @property
    def deterministic(self) -> bool:
        """Bit-identical results for identical inputs: CPU backends add in a fixed order; the CUDA
        segment sums use atomics whose order varies between runs."""
        return self.device == "cpu"


_PARAMS = [
    pytest.param(Backend("torch", "cpu"), id="torch"),
    pytest.param(Backend("ext", "cpu"), id="ext"),
    # Without CUDA the Triton cases run under the interpreter, ~80 % of the cross-backend tests' time:
    # slow there, so `pytest -m "not slow"` keeps the quick loop quick (tests/test_triton.py still runs).
    pytest.param(Backend("triton", "cuda" if _CUDA else "cpu"), id="triton",
                 marks=[pytest.mark.triton] if _CUDA else [pytest.mark.triton, pytest.mark.slow]),
]
if _CUDA:
    _PARAMS.append(pytest.param(Backend("ext", "cuda"), id="ext-cuda", marks=pytest.mark.cuda))


@pytest.fixture(params=_PARAMS)
def backend(request):
    b: Backend = request.param
    if not backends.available(b.name, b.device):
        i = backends.info(b.name)
        reason = f"backend {b.name!r} cannot run on {b.device}: {i.detail}"
        if i.loaded:
            reason += f" (it runs on: {', '.join(i.devices) or 'nothing'})"
        elif i.fix:
            reason += f"; fix: {i.fix}"
        pytest.skip(reason)
    with equss.use_backend(b.name):
        yield b


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards. Tiny tensors gain nothing from threads, and on
    a loaded 2-core machine OpenMP's spin-waiting made small training tests up to ~40× slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""One ProductQuantizer training step (forward + backward + codebook update) per backend.

Group ``module-step``. The input is the EQUSS layout ``[B, D, H, W]`` (``channel_dim=1``), so the step
includes the layout change the real model pays. ``param``: forward, backward into the input and the
codebooks. ``ema``: forward, backward into the input, and the EMA update inside the forward.

CPU only, at ``CPU_SMALL`` (N = 4,096) so the suite stays affordable. On CUDA the module step is the
``module_step`` group of ``benchmarks/test_bench_gpu.py`` (EQUSS shape, validated against the torch backend,
with the vector-quantize-pytorch row), and this file skips. Backends that are not available are skipped
with the reason ``equss.backends`` recorded; Triton on CPU would only run under its interpreter, whose
timings mean nothing, so it is skipped too.

Run: ``pytest benchmarks/test_bench_module.py --benchmark`` (without ``--benchmark`` each case runs once).
"""

from __future__ import annotations

import pytest
import torch

import equss
from benchmarks.shapes import CPU_SMALL, PQShape
from equss.nn import ProductQuantizer

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on CUDA: the module_step group of benchmarks/test_bench_gpu.py"
)
DEVICE = torch.device("cpu")
SHAPE = CPU_SMALL


def _feature_map(shape: PQShape) -> tuple[int, int, int]:
    """``(B, H, W)`` with ``B·H·W = N``: 28×28 patches as in EQUSS when N allows, else 16×16."""
    side = 28 if shape.N % (28 * 28) == 0 else 16
    if shape.N % (side * side) != 0:
        raise ValueError(f"{shape}: N is not a multiple of {side}×{side}")
    return shape.N // (side * side), side, side


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("learning", ["param", "ema"])
@pytest.mark.parametrize("backend", ["torch", "ext", "triton"])
def test_module_step(benchmark, backend, learning):
    if DEVICE.type == "cpu" and backend == "triton":
        pytest.skip("triton on CPU runs only under TRITON_INTERPRET; interpreter timings are not meaningful")
    if not equss.backends.available(backend, DEVICE):
        info = equss.backends.info(backend)
        pytest.skip(f"backend {backend!r} not available on {DEVICE.type}: {info.detail}")

    B, H, W = _feature_map(SHAPE)
    torch.manual_seed(0)
    pq = ProductQuantizer(SHAPE.D, SHAPE.M, SHAPE.K, channel_dim=1, learning=learning, init="xavier").to(
        DEVICE
    )
    x = torch.randn(B, SHAPE.D, H, W, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(B, SHAPE.D, H, W, device=DEVICE)

    def step() -> None:
        with equss.use_backend(backend):
            pq.zero_grad(set_to_none=True)
            x.grad = None
            out = pq(x)
            torch.autograd.backward([out.quantized, out.loss], [grad_out, None])
        _sync()

    step()  # untimed: xavier init at the first training forward, JIT / autotune, allocator warm-up
    benchmark.group = "module-step"
    benchmark.extra_info.update(
        backend=backend,
        learning=learning,
        shape=str(SHAPE),
        input_shape=[B, SHAPE.D, H, W],
        # The assignment's matrix work (2·N·K·D multiply-adds) and one fp32 pass over the N·D features:
        # the module runs ~10 such elementwise passes (layout copies, normalisation, residual, gradients).
        assign_gflop=2.0 * SHAPE.N * SHAPE.K * SHAPE.D / 1e9,
        feature_pass_mb=4.0 * SHAPE.N * SHAPE.D / 1e6,
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        torch=torch.__version__,
    )
    benchmark(step)

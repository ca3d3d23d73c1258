"""Launch-time choices shared by the Triton PQ kernels: matmul precision, interpreter mode, block sizes.

Nothing here is autotuned: every launcher picks its configuration with a deterministic heuristic from a
finite set (each kernel module exposes it as ``CONFIGS`` and the heuristic as ``pick_config``), so
``tests/test_triton_compile.py`` can compile exactly the configurations that can run, ahead of time, for
sm_80 and sm_90; :func:`aot_spec` builds the ``triton.compile`` signature from the kernel's own parameters. ``@triton.autotune``
with several configs does not run under the interpreter, and a benchmark that autotunes measures a
moving target; a later GPU session can widen the sets from measurements.

Matmul precision (``EQUSS_TRITON_PRECISION``) only matters for float32 inputs of the assignment kernels:

========== ============================================================================================
``exact``  (default) the fp32 reference's codes, computed on tensor cores: x and the codewords are split
           into two bfloat16 pieces each and three bf16 products give every distance to ~2⁻¹⁴ relative;
           a row whose best and second-best distances are closer than a rigorous bound on that error
           (``kernels/pq_assign.py: _gap_bound``) — near-ties, ties, overflow — is recomputed in fp32
           FMA arithmetic with lowest-index tie-breaking. Codes equal the fp32 reference's except where
           two codewords are within fp32 rounding of each other (like ``ieee``), ``min_dist`` is the fp32
           distance of the chosen codeword. Uses the resident tensor-core kernel for K ≤ 1024 and
           Ds ≤ 32, else the ``ieee`` kernel.
``ieee``   true fp32 FMAs on CUDA cores for every distance (the streaming kernel). Same codes contract as
           ``exact``, several times slower.
``tf32x3`` three TF32 tensor-core products (hi·hi + hi·lo + lo·hi): ~fp32 accuracy (relative error
           ~2⁻²² per product) but no recheck: near-tie flips become slightly more frequent.
``tf32``   one TF32 product (10-bit mantissa, relative error ~10⁻³): on random data codes differ from
           the fp32 reference whenever the two best distances are within ~0.1 %.
========== ============================================================================================

bfloat16 inputs use the resident tensor-core kernel with native bf16 products (exact in fp32) and
fp32 accumulation, rows closer than the accumulation/packing bound again recomputed in FMA; float16 runs
its native products in the streaming kernel. The precision setting does not apply to either. float64
inputs are cast to float32 first, which is what the reference does (it accumulates in float32).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton

PRECISIONS = ("exact", "ieee", "tf32x3", "tf32")
DEFAULT_PRECISION = "exact"
PRECISION_ENV = "EQUSS_TRITON_PRECISION"

# Kernel dtypes: float64 is cast to float32 by the launchers (see the module docstring), so kernels only
# ever see these three (the gather copy and the EMA codebook store also handle float64, bit-exactly).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_TYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
}

# Subspace widths are tiled in chunks of BLOCK_D ∈ {16, 32} (tl.dot needs every dimension ≥ 16 on GPU;
# the interpreter accepts smaller tiles but the compiler rejects them). Ds > 32 loops over chunks (or, in
# the segment sum, spreads them over the grid): 64-wide fp32 tiles spilled registers in the
# ahead-of-time compile (scripts/triton_resources.py), and the typical PQ subspace is Ds = 32.
BLOCK_D_CHOICES = (16, 32)

# Without a GPU the segment reductions still split the rows over several programs, as if the device
# had this many SMs, so the tests exercise the cross-program atomics.
_INTERPRETER_SMS = 4
# Under the interpreter the launchers pick the configurations of this compute capability (tests set 80 to
# run the sm_80 classes).
_INTERPRETER_ARCH = 90


def resolve_precision(precision: str | None = None) -> str:
    """The matmul precision for fp32 inputs: the argument, else ``$EQUSS_TRITON_PRECISION``, else ``exact``."""
    source = "precision argument"
    if precision is None:
        precision = os.environ.get(PRECISION_ENV, "").strip().lower() or DEFAULT_PRECISION
        source = f"{PRECISION_ENV}"
    if precision not in PRECISIONS:
        raise ValueError(f"{source}={precision!r} is not one of {PRECISIONS}")
    return precision


def block_d(Ds: int) -> int:
    """Width of one Ds chunk: the next power of two ≥ Ds, clamped to [16, 32]."""
    return min(BLOCK_D_CHOICES[-1], max(BLOCK_D_CHOICES[0], triton.next_power_of_2(Ds)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Number of SMs of ``device`` (a fixed small number under the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _arch(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return 10 * props.major + props.minor


def device_arch(device: torch.device) -> int:
    """Compute capability of ``device`` as ``10·major + minor`` (``_INTERPRETER_ARCH`` under the interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_ARCH
    return _arch(device.index if device.index is not None else torch.cuda.current_device())


def _param_names(kernel) -> list[tuple[str, bool]]:
    """``(name, is_constexpr)`` of a ``@triton.jit`` kernel's parameters, in order (JIT or interpreted)."""
    params = getattr(kernel, "params", None)
    if params is not None:
        return [(p.name, bool(p.is_constexpr)) for p in params]
    sig = inspect.signature(kernel.fn)
    return [(n, "constexpr" in str(p.annotation)) for n, p in sig.parameters.items()]


def aot_spec(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict, options: dict) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile``, from the kernel itself.

    Walks the kernel's parameters in order: a name ending in ``_ptr`` is a pointer whose element type
    ``pointers`` must give (``"fp32"``, ``"i32"``, ...), a name in ``floats`` an fp32 scalar, any other
    runtime parameter an i32 scalar, and every constexpr needs a value in ``constexprs``. A parameter
    without a type, or a given name the kernel does not have, raises, so this cannot drift from the
    kernel's argument list.
    """
    params = _param_names(kernel)
    names = {n for n, _ in params}
    unknown = (set(pointers) | set(floats) | set(constexprs)) - names
    if unknown:
        raise ValueError(f"aot_spec: {sorted(unknown)} are not parameters of {kernel}")
    signature: dict[str, str] = {}
    for name, is_constexpr in params:
        if is_constexpr:
            if name not in constexprs:
                raise ValueError(f"aot_spec: constexpr {name!r} of {kernel} has no value")
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name not in pointers:
                raise ValueError(f"aot_spec: pointer {name!r} of {kernel} has no element type")
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    return kernel, signature, dict(constexprs), dict(options)


def check_grid_dim(value: int, limit: int, what: str) -> None:
    """CUDA limits grid axes 1 and 2 to 65535 programs: fail with the shape instead of a launch error."""
    if value > limit:
        raise ValueError(f"equss.kernels: {what} = {value} exceeds the CUDA grid limit {limit}")

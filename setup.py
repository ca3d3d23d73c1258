"""Build script for equss: the Python package plus the optional C++/CUDA op library ``equss._C``.

Install after torch: ``pip install --no-build-isolation -e .`` (torch is not a build requirement on
purpose; the extension must match the installed torch).

Environment knobs (all optional):

=====================  =========================================================================================
``EQUSS_BUILD_EXT``    ``1`` (default) build ``equss._C`` when a C++ compiler is found; ``0`` pure-Python install
``EQUSS_BUILD_CUDA``   ``auto`` (default): CUDA sources too when ``torch.version.cuda`` and ``CUDA_HOME`` are both
                       set; ``1``: require them (error otherwise); ``0``: CPU library only
``EQUSS_CUDA_ARCHS``   CUDA archs, e.g. ``"8.0;9.0"`` (default: ``TORCH_CUDA_ARCH_LIST`` if set, else the visible
                       GPUs, else ``"8.0;9.0"``; torch's helper needs a list when no GPU is visible)
``EQUSS_DEBUG``        ``1``: ``-O0 -g`` and device debug info instead of ``-O3``
``MAX_JOBS``           parallel compile jobs (read by torch's ninja builder)
=====================  =========================================================================================

The top-level ``kernels/`` folder (Triton kernels) is installed as ``equss.kernels``: a top-level
package named ``kernels`` would clash with an existing PyPI package.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _cuda_archs() -> str:
    explicit = os.environ.get("EQUSS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if explicit:
        return explicit
    import torch

    if torch.cuda.is_available():
        caps = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
        return ";".join(caps)
    return "8.0;9.0"


def _extensions() -> tuple[list, dict]:
    build_ext = _env("EQUSS_BUILD_EXT", "1")
    if build_ext not in ("0", "1"):
        raise SystemExit(f"EQUSS_BUILD_EXT must be 0 or 1, got {build_ext!r}")
    if build_ext == "0":
        print("equss: EQUSS_BUILD_EXT=0, installing without the C++ extension", file=sys.stderr)
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        print(f"equss: no C++ compiler ({cxx!r} not on PATH): installing without the C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(
            "equss: building the C++ extension needs torch installed first (pip install torch), then "
            "pip install --no-build-isolation -e .   (or set EQUSS_BUILD_EXT=0)"
        ) from exc

    build_cuda = _env("EQUSS_BUILD_CUDA", "auto")
    if build_cuda not in ("auto", "0", "1"):
        raise SystemExit(f"EQUSS_BUILD_CUDA must be auto, 0 or 1, got {build_cuda!r}")
    # CUDA_HOME must be set explicitly: torch's own guess (e.g. /usr/local from /usr/local/bin/nvcc) can
    # name a directory without libcudart, and the link then fails on machines that only have nvcc.
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cuda_possible = bool(torch.version.cuda) and bool(cuda_home)
    if build_cuda == "1" and not cuda_possible:
        raise SystemExit(
            f"equss: EQUSS_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
            f"CUDA_HOME={cuda_home!r}; both are needed"
        )
    with_cuda = cuda_possible and build_cuda != "0"

    debug = _env("EQUSS_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = [*opt, "-std=c++20", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    define_macros: list[tuple[str, str | None]] = []
    sources = [os.path.join("csrc", "registration.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    kwargs = dict(
        name="equss._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_archs()
        kwargs["sources"] = sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        kwargs["define_macros"] = define_macros + [("EQUSS_WITH_CUDA", None)]
        nvcc = [*opt, "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        if debug:
            nvcc.append("-G")
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        print(f"equss: building CPU + CUDA extension (archs {os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        reason = "EQUSS_BUILD_CUDA=0" if build_cuda == "0" else (
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}"
        )
        print(f"equss: building the CPU extension only ({reason})", file=sys.stderr)
        ext = cpp_extension.CppExtension(**kwargs)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["equss", "equss.*"]) + ["equss.kernels"],
    package_dir={"equss.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""Builds the CPU emulation of the equss CUDA kernels (see README.md) into build/cuda_emu[90]/ of the repo.

The torch-free kernel headers of csrc/cuda are copied with every ``kernel<<<cfg>>>(args)`` rewritten to
``emu::launch(kernel, cfg)(args)``; with EMU_SM90=1 the sm_90-only branches (vector atomics) are compiled
instead of the generic ones. Usage: ``python csrc/cuda/emu/emu_build.py`` (then see README.md).
"""

from __future__ import annotations

import os
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[2]
HEADERS = ["device_utils.cuh", "pq_assign_tile.cuh", "pq_segment_sum.cuh", "pq_gather_kernel.cuh"]


def sm90(value: bool | None = None) -> bool:
    """The variant: ``value`` if given, else the environment (``EMU_SM90=1``)."""
    return os.environ.get("EMU_SM90") == "1" if value is None else value


def name(variant: bool | None = None) -> str:
    return "equss_emu90" if sm90(variant) else "equss_emu"


def build_dir(variant: bool | None = None) -> pathlib.Path:
    return REPO / "build" / ("cuda_emu90" if sm90(variant) else "cuda_emu")


def library_path(variant: bool | None = None) -> str:
    return str(build_dir(variant) / f"{name(variant)}.so")


def rewrite_sources(dst: pathlib.Path, variant: bool | None = None) -> None:
    (dst / "cuda").mkdir(parents=True, exist_ok=True)
    for header in HEADERS:
        text = (REPO / "csrc" / "cuda" / header).read_text()
        if sm90(variant):
            text = text.replace("#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900", "#if 1")
        text, _ = re.subn(
            r"([;{}]\s*)([^;{}]*?)<<<(.*?)>>>\((.*?)\);", r"\1emu::launch(\2, \3)(\4);", text, flags=re.S
        )
        out = dst / "cuda" / header
        if not out.exists() or out.read_text() != text:  # unchanged copies keep their mtime: no rebuild
            out.write_text(text)


def build(variant: bool | None = None, verbose: bool = False) -> str:
    """Builds (or, when nothing changed, just loads) the emulation library into this process; returns its
    path. The ops are then ``getattr(torch.ops, name(variant))``."""
    from torch.utils import cpp_extension

    out = build_dir(variant)
    src = out / "src"
    rewrite_sources(src, variant)
    cpp_extension.load(
        name=name(variant),
        sources=[str(HERE / "emu_ops.cpp")],
        is_python_module=False,
        build_directory=str(out),
        extra_include_paths=[str(HERE / "include"), str(src), str(REPO / "csrc")],
        extra_cflags=[f"-DEMU_LIB={name(variant)}", "-O2", "-std=c++20", "-ffp-contract=off"],
        verbose=verbose,
    )
    return library_path(variant)


def main() -> None:
    print(build())


if __name__ == "__main__":
    main()

"""Static cost model of the Triton PQ kernels: predicted time and % of roofline on an H100 without a GPU.

For every kernel launch that the ``equss.kernels`` launchers make at the project's shapes
(:data:`benchmarks.shapes.GPU_SHAPES`: EQUSS training N=25,088 M=32 K=256 Ds=32; large N=10^6 M=64
K=1024 Ds=32) and dtypes (fp32 with each matmul precision, bf16), this script

1. **captures the real launch**: it calls the launcher (``pq_assign_triton``, ...) on *fake* CUDA tensors
   (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no memory, so N = 10^6 costs nothing) with
   ``JITFunction.run`` replaced by a recorder and the device's SM count reported as the modelled GPU's.
   The grid, the runtime scalars (``rows_per_prog`` ...), constexprs, ``num_warps``/``num_stages`` are
   therefore the launcher's own, never re-derived here. PyTorch ops the launcher runs around its Triton
   launches (``torch.zeros``, ``torch.where`` ...) are recorded with a ``TorchDispatchMode``;
2. **compiles it ahead of time** for sm_90 (H100/H200) and sm_80 (A100) with the specialisation the
   real launch gets: the argument types, constexprs and ``tt.divisibility`` attributes come from
   Triton's own binder (``create_function_from_signature`` + ``JITFunction._pack_args``, what
   ``JITFunction.run`` does before it compiles) applied to the captured arguments, with every tensor
   16-byte aligned (PyTorch allocations are) — so integers divisible by 16 (N, M, K, Ds here) get the
   hint and integers equal to 1 become constants, exactly as at run time;
3. **reads the SASS** (``cuobjdump --dump-sass`` bundled with Triton), finds the loops from the control
   flow (a backward ``BRA`` closes a loop; loops nest by address intervals) and counts instructions
   per class (:data:`CLASS_RULES`), with widths for memory operations and shapes for MMAs;
4. **reads the Triton IR** (TTIR, structured): the ``scf.for`` loops with their bounds, evaluated for
   every program of the grid from the launch's scalars and ``tl.program_id`` (vectorised), give the
   trip count of each loop; SASS loops are matched to TTIR loops by nesting order. The loads, stores
   and atomics of the TTIR, traced back to the kernel argument they address, give the bytes each
   program moves and which tensors are read/written (the minimum HBM bytes). A SASS loop whose body
   moves u ≥ 2 times the global bytes one iteration issues (the TTGIR's, layout replication counted, see
   below; the TTIR's where the TTGIR cannot be evaluated) was runtime-unrolled by ptxas: it counts
   1/u per iteration and the u − 1 remainder copies after it are not counted; ``CALL``-ed subroutines
   (ptxas slow paths, e.g. 64-bit division) are not counted. The counted SASS global bytes are
   cross-checked against the bytes the TTGIR's memory ops issue (``sass_vs_ttir_bytes`` in the JSON, name
   kept): the TTGIR gives each op its register layout, and an element held by several threads (a 1-D
   load in a ``#ttg.slice`` layout, a blocked or MMA layout wider than the tensor, a scalar) is loaded
   or stored by each of them in the SASS, while the TTIR counts it once (:func:`layout_replication`,
   :func:`ttgir_issued_bytes`; the TTIR's bytes, with a note, where the TTGIR cannot be evaluated). The
   predictions use the TTIR's compulsory and requested bytes, which this does not change;
5. **predicts the time** (:func:`predict`) and reports it against the roofline.

Why capture instead of re-deriving grids: the launchers' own code (``pick_config``, grid, the segment
sum's ``rows_per_prog`` from the SM count) runs unchanged, so a redesigned kernel is modelled as it will
launch. ``tests/test_kernel_model.py::test_capture_matches_a_real_launch`` checks at small shapes that the
capture equals a real (interpreted, intercepted) launch of the same launcher.

Time formula (per launch, per GPU; constants in :class:`GPU`)::

    per program, per pipe p:   c_p = Σ_instr  executions(instr) · warps · cost_p(instr)   [SM cycles]
        issue  1/4 cycle per warp-instruction (4 schedulers)     fma   FFMA/FADD/FMUL/IMAD: 32/fp32_lanes
        alu    int/compare/select: 32/alu_lanes                  xu    MUFU, conversions: 32/xu_lanes
        tensor HMMA/HGMMA FLOPs / tensor FLOPs per cycle of the input type (HMMA on sm_90 at mma_sync_eff)
        l1     shared/L1 data path: max(1, bytes per warp / 128) wavefronts per LDS/STS/LDG/STG/LDGSTS/RED
        shfl   SHFL/REDUX: 32/shfl_lanes                         fp64  DFMA/DADD/DMUL
    c   = max_p c_p                            (pipes overlap; the busiest one sets the pace)
    occupancy B programs/SM (registers, shared memory, warps: triton_resources.occupancy), S SMs,
    η(w) = min(1, w / warps_to_saturate), w = resident warps per scheduler
    T_compute = full_waves · B · c / η(B)  +  ceil(rem / S) · c / η(ceil(rem / S))   (P = full·B·S + rem)
    T_hbm     = minimum HBM bytes / (hbm_efficiency · HBM bandwidth)
    T_l2      = global bytes the kernel's loads/stores/atomics request / L2 bandwidth
    T_latency = ceil(P / (S·B)) · Σ_regions executions · load_chain · latency / overlap
                (regions: the straight-line code and each loop body; load_chain: dependent loads in the
                region, e.g. codes → codewords is 2; latency: DRAM for compulsory bytes, L2 for re-reads;
                overlap: num_stages − 1 for innermost loops the pipeliner prefetches, else 1)
    T = max(T_compute, T_hbm, T_l2, T_latency) + launch_overhead;   bottleneck = the argmax
    (the JSON also has every bound alone as a % of the roofline)

    roofline = max(minimum HBM bytes / HBM bandwidth, useful FLOPs / peak rate of the precision used)
    (useful FLOPs: the op's, e.g. 2·N·M·K·Ds for the assignment, attributed to the op's first launch;
    rate: bf16/fp16 tensor cores; TF32 tensor cores for "tf32", a third of it for "tf32x3" (three
    products); the FP32 FMA pipe for "ieee", which tensor cores cannot do); % of roofline = roofline / T.

Calibration: the constants of :class:`GPU` (latencies, L2 bandwidth, ``warps_to_saturate``, HBM
efficiency, launch overhead, the mma.sync rate on sm_90) are literature values, **uncalibrated**: there is
no GPU measurement of these kernels yet. ``--calibrate PATH`` reads the pytest-benchmark JSON of
``benchmarks/test_bench_gpu.py`` (or a ``{model key: µs}`` map, e.g. from a profiler) and prints the
model's error per case; the first real GPU run is the calibration point.

Assumptions and known blind spots:

* **Latency hiding**: pipes are assumed saturated from ``warps_to_saturate`` = 2 resident warps per
  scheduler on (the loops are unrolled with much ILP), linearly worse below; dependency chains inside
  the SASS are not followed, barrier stalls (``BAR.SYNC``) cost only their issue slot.
* **Memory-level parallelism**: only through ``T_latency`` (dependent loads per region × latency,
  overlapped by resident programs and pipelining stages); loads are assumed issued together otherwise.
* **Bank conflicts / broadcast**: a shared-memory access costs its bytes / 128 B wavefronts: no bank
  conflicts, no broadcast (an FMA-dot operand read that lanes share costs less on the GPU, a
  conflicting one more). HGMMA operands read from shared memory are not charged to the L1 pipe.
* **Atomics**: counted as bytes through L1 and L2; contention on the same addresses and the L2 atomic
  units' throughput are not modelled.
* **L2 hit rates**: HBM traffic is the compulsory minimum (every tensor the kernel touches once); all
  re-reads (codebook tiles per program, the segment sum's rows per k-tile) are assumed to hit L2 and
  cost L2 bandwidth; L2 capacity misses are not modelled.
* **Masks and branches**: every instruction outside loops runs once per program (both sides of an
  ``if``), masked lanes and predicated-off instructions count as executed (upper bound for tails).
* **Interpreter-only constexpr paths** (``EXACT_DOT``, ``UPCAST``) are never modelled: the launch is
  captured on fake CUDA tensors, so launchers pick their GPU path.
* **Loop matching**: SASS loops are matched to TTIR ``scf.for`` loops by nesting order; if ptxas
  unrolled, split or removed a loop the two trees differ and the row is flagged (``loop_match``).
* PyTorch ops inside a launcher are modelled as memory-bound kernels (their input + output bytes at the
  HBM rate + launch overhead); they appear in the op totals, not in the kernel rows.

Usage::

    python scripts/kernel_model.py                                   # tables on stdout
    python scripts/kernel_model.py --readme README.md --json benchmarks/results/kernel_model.json
    python scripts/kernel_model.py --compare benchmarks/results/kernel_model.json   # regression check
    python scripts/kernel_model.py --calibrate bench_gpu.json        # model error vs measured GPU times

Run it as its own process: ``main()`` removes ``TRITON_INTERPRET`` before triton is imported (see
``scripts/triton_resources.py``). The README section is between ``<!-- kernel-model:start -->`` and
``<!-- kernel-model:end -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_resources as TR  # noqa: E402

START_MARKER = "<!-- kernel-model:start -->"
END_MARKER = "<!-- kernel-model:end -->"
REGRESSION_TOLERANCE = 0.15  # a prediction more than 15 % slower than the committed one is a regression


# ---------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GPU:
    """Per-SM throughputs (lanes = thread-operations per SM per cycle) and memory system of one GPU.

    Sources: NVIDIA H100 / A100 whitepapers and the CUDA C Programming Guide's arithmetic-instruction
    throughput table (compute capability 9.0 / 8.0). Bandwidths are the data-sheet peaks; L2 bandwidth,
    latencies, ``mma_sync_eff`` and the launch overhead are approximate published measurements, to be
    replaced by calibrated values.
    """

    name: str
    arch: int
    sms: int
    clock_ghz: float
    hbm_GBps: float
    l2_GBps: float
    fp32_lanes: int = 128  # FFMA/FADD/FMUL (IMAD shares the FMA units)
    alu_lanes: int = 64  # integer add/logic/shift, compares, selects
    xu_lanes: int = 16  # MUFU, conversions
    shfl_lanes: int = 32
    fp64_lanes: int = 64
    l1_bytes_per_clk: int = 128  # shared memory / L1 data path
    tensor_flops_per_clk: dict = field(default_factory=dict)  # dense, per SM, by input type
    mma_sync_eff: float = 1.0  # HMMA (mma.sync) rate relative to the tensor peak
    hbm_efficiency: float = 0.9  # achievable fraction of the HBM peak for streaming kernels
    dram_latency_ns: float = 600.0
    l2_latency_ns: float = 250.0
    launch_us: float = 2.0  # launch + ramp-up/drain of one kernel
    warps_to_saturate: float = 2.0  # resident warps per scheduler from which pipes are assumed saturated
    schedulers: int = 4

    def rate(self, precision: str) -> float:
        """Peak useful FLOP/s of a matmul in ``precision`` (the roofline's compute rate)."""
        per_clk = {
            "ieee": 2 * self.fp32_lanes,
            "fp32": 2 * self.fp32_lanes,
            "tf32": self.tensor_flops_per_clk["tf32"],
            "tf32x3": self.tensor_flops_per_clk["tf32"] / 3,
            # the exact default: three bf16 products (bf16x3 split) on tensor cores; the FMA recheck of
            # near-tie rows is not useful work
            "exact": self.tensor_flops_per_clk["bf16"] / 3,
            "bf16": self.tensor_flops_per_clk["bf16"],
            "fp16": self.tensor_flops_per_clk["fp16"],
        }[precision]
        return per_clk * self.sms * self.clock_ghz * 1e9


_HOPPER_TC = {"bf16": 4096, "fp16": 4096, "tf32": 2048, "fp8": 8192, "int8": 8192, "fp64": 256}
_AMPERE_TC = {"bf16": 2048, "fp16": 2048, "tf32": 1024, "int8": 4096, "fp64": 128}
GPUS: dict[str, GPU] = {
    "H100": GPU("H100 SXM", 90, 132, 1.83, 3350, 5500, tensor_flops_per_clk=_HOPPER_TC, mma_sync_eff=0.67),
    "H200": GPU("H200 SXM", 90, 132, 1.83, 4800, 5500, tensor_flops_per_clk=_HOPPER_TC, mma_sync_eff=0.67),
    "A100": GPU(
        "A100 SXM 80GB", 80, 108, 1.41, 2039, 4000, fp32_lanes=64, fp64_lanes=32,
        tensor_flops_per_clk=_AMPERE_TC, dram_latency_ns=550.0, l2_latency_ns=220.0,
    ),
}
PRIMARY_GPU = "H100"


# --------------------------------------------------------------------------------- SASS: parsing
@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str  # "" or e.g. "@!P0"
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")


def parse_sass(text: str, function: str | None = None) -> list[Instr]:
    """Instructions of one function of ``cuobjdump --dump-sass`` output (the first if ``function`` is None).

    Instructions predicated on ``@!PT`` (never executed; ptxas pads with them) are dropped.
    """
    blocks = re.split(r"^\s*Function\s*:\s*(\S+)\s*$", text, flags=re.M)
    if len(blocks) > 1:
        named = dict(zip(blocks[1::2], blocks[2::2]))
        body = named.get(function) if function else None
        text = body if body is not None else blocks[2]
    out = []
    for line in text.splitlines():
        m = _SASS_LINE.match(line)
        if m is None:
            continue
        pred = (m.group(2) or "").strip()
        if pred == "@!PT":
            continue
        out.append(Instr(int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
    return out


def branch_target(ins: Instr) -> int | None:
    """Target address of a direct branch (``BRA 0x950``), else None."""
    if ins.base != "BRA":
        return None
    m = re.search(r"0x([0-9a-fA-F]+)\s*$", ins.operands)
    return int(m.group(1), 16) if m else None


@dataclass
class Loop:
    start: int  # address of the first instruction (the backward branch's target)
    end: int  # address of the backward branch
    parent: int | None = None  # index into the loop list
    depth: int = 0

    def contains(self, addr: int) -> bool:
        return self.start <= addr <= self.end


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Natural loops from backward branches, ordered by start address, with nesting (parent, depth).

    A branch to an address at or before itself closes a loop ``[target, branch]``; several backward
    branches to one target are one loop (the last one ends it). Not loops: self-branches (``BRA`` to its
    own address, ptxas's end-of-code trap after ``EXIT``); spin-waits (a backward branch around nothing
    but synchronisation, e.g. the mbarrier ``SYNCS.PHASECHK`` retry of TMA loads: it waits, it does no
    work); and re-entries (out-of-line code after a loop that branches back into its middle, e.g. that
    retry's slow path, which overlaps the loop instead of nesting in it).
    """
    ends: dict[int, int] = {}
    for ins in instrs:
        t = branch_target(ins)
        if t is not None and t < ins.addr:
            ends[t] = max(ends.get(t, t), ins.addr)
    work = lambda a, b: any(a <= i.addr <= b and instr_class(i.opcode) not in ("sync", "control") for i in instrs)
    spans = sorted(((s, e) for s, e in ends.items() if work(s, e)), key=lambda se: (se[0], -se[1]))
    spans = [(s, e) for s, e in spans if not any(s2 < s <= e2 < e for s2, e2 in spans)]  # drop re-entries
    loops = [Loop(s, e) for s, e in spans]
    for i, lp in enumerate(loops):
        outer = [j for j in range(len(loops)) if j != i and loops[j].start <= lp.start and lp.end <= loops[j].end]
        if outer:  # innermost enclosing loop: the shortest
            lp.parent = min(outer, key=lambda j: loops[j].end - loops[j].start)
    for lp in loops:
        d, p = 0, lp.parent
        while p is not None:
            d, p = d + 1, loops[p].parent
        lp.depth = d
    return loops


def subroutines(instrs: list[Instr]) -> list[tuple[int, int]]:
    """Address ranges ``[CALL target, its RET]`` of the subroutines ptxas emits (slow paths of 64-bit integer
    division, IEEE division ...). Triton inlines every function, so a ``CALL`` only reaches such a slow
    path, which the fast path guarding it skips at these shapes; the model does not count them."""
    targets = sorted({int(m.group(1), 16) for i in instrs if i.base == "CALL"
                      for m in [re.search(r"0x([0-9a-fA-F]+)\s*$", i.operands)] if m})
    out = []
    for t in targets:
        ret = next((i.addr for i in instrs if i.addr >= t and i.base == "RET"), None)
        if ret is not None:
            out.append((t, ret))
    return out


def global_warp_bytes(ins: Instr) -> int:
    """Global-memory bytes one warp requests with ``ins`` (0 for shared memory and non-memory instructions)."""
    return warp_bytes(ins) if instr_class(ins.opcode) in ("ldg", "stg", "ldgsts", "atom") and ins.base != "ATOMS" else 0


def unroll_factor(sass_bytes_per_iter: float, ttir_bytes_per_iter: float) -> int:
    """ptxas's runtime unroll factor of a loop: its SASS body moves an integer multiple (≥ 2, within 15 %)
    of the global bytes one TTIR iteration moves. 1 when it does not (or either side moves nothing)."""
    if sass_bytes_per_iter <= 0 or ttir_bytes_per_iter <= 0:
        return 1
    ratio = sass_bytes_per_iter / ttir_bytes_per_iter
    u = round(ratio)
    return u if u >= 2 and abs(ratio - u) <= 0.15 * u else 1


def innermost_loop(loops: list[Loop], addr: int) -> int | None:
    inside = [i for i, lp in enumerate(loops) if lp.contains(addr)]
    return max(inside, key=lambda i: loops[i].depth) if inside else None


# ------------------------------------------------------------------------------ SASS: classifying
# Coarse classes (the list), by base opcode. Order matters only for the prefix rule of "uniform".
CLASS_RULES: dict[str, tuple[str, ...]] = {
    "fp32": ("FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "FSWZADD", "HFMA2", "HADD2", "HMUL2", "HMNMX2"),
    "fp64": ("DFMA", "DADD", "DMUL"),
    "mma": ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BMMA", "OMMA", "UTCHMMA"),
    "imad": ("IMAD", "IMUL", "IMUL32I", "IMAD32I"),
    "int": (
        "IADD3", "IADD", "IADD32I", "VIADD", "VIADDMNMX", "IABS", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR",
        "LEA", "SGXT", "BMSK", "PRMT", "IMNMX", "VIMNMX", "MOV", "MOV32I", "BREV", "FLO", "POPC", "IDP", "IDP4A",
    ),
    "cmp/sel": ("ISETP", "FSETP", "DSETP", "HSETP2", "PSETP", "PLOP3", "SEL", "FSEL", "FMNMX", "FSET", "P2R", "R2P", "VOTE"),
    "conv": ("F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "I2I", "F2IP", "I2IP"),
    "mufu": ("MUFU",),
    "shfl": ("SHFL", "REDUX"),
    "lds": ("LDS", "LDSM"),
    "sts": ("STS", "STSM"),
    "ldg": ("LDG", "LD", "LDL"),
    "stg": ("STG", "ST", "STL"),
    "ldgsts": ("LDGSTS",),
    "tma": ("UTMALDG", "UTMASTG", "UBLKCP", "UTMAREDG", "UTMAPF", "UTMACCTL", "UBLKRED"),
    "atom": ("ATOM", "ATOMG", "RED", "REDG", "ATOMS"),
    "sync": (
        "BAR", "BSSY", "BSYNC", "WARPSYNC", "DEPBAR", "LDGDEPBAR", "MEMBAR", "SYNCS", "ARRIVES", "WARPGROUP",
        "ERRBAR", "CCTL", "FENCE", "NANOSLEEP", "CGAERRBAR", "ELECT",
    ),
    "control": ("BRA", "BRX", "EXIT", "RET", "CALL", "JMP", "JMX", "YIELD", "NOP", "KILL", "BPT", "ACQBULK"),
}
_CLASS_OF = {op: cls for cls, ops in CLASS_RULES.items() for op in ops}
MEMORY_CLASSES = ("lds", "sts", "ldg", "stg", "ldgsts", "atom")


def instr_class(opcode: str) -> str:
    """Coarse class of an opcode: one of :data:`CLASS_RULES`' keys, ``uniform`` (U* datapath) or ``other``."""
    base = opcode.split(".", 1)[0]
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    if base.startswith("U") or base in ("S2UR", "R2UR"):
        return "uniform"
    return "other"


def access_bytes(opcode: str) -> int:
    """Bytes per thread of a memory instruction from its width modifier (default 32-bit)."""
    toks = opcode.split(".")[1:]
    for t in toks:
        if t in ("128",):
            return 16
        if t in ("64",):
            return 8
        m = re.fullmatch(r"(?:B?F|S|U)(\d+)x(\d+)", t)  # F32x4 (vector atomics), F16x2
        if m:
            return int(m.group(1)) * int(m.group(2)) // 8
        if t in ("U16", "S16", "16") and opcode.split(".")[0] not in ("LDSM", "STSM"):
            return 2
        if t in ("U8", "S8"):
            return 1
    return 4


def warp_bytes(ins: Instr) -> int:
    """Bytes one warp moves with a memory instruction (all 32 lanes active)."""
    base = ins.base
    if base in ("LDSM", "STSM"):  # 8x8 16-bit matrices: .x1 / .2 / .4
        last = ins.opcode.split(".")[-1]
        return 128 * (int(last) if last in ("2", "4") else 1)
    return 32 * access_bytes(ins.opcode)


def mma_shape(opcode: str) -> tuple[int, int, int, str, bool] | None:
    """``(m, n, k, input type, warpgroup)`` of an HMMA/HGMMA/IMMA opcode, e.g. HGMMA.64x16x16.F32.BF16."""
    toks = opcode.split(".")
    base = toks[0]
    if base not in CLASS_RULES["mma"]:
        return None
    m = n = k = None
    for t in toks[1:]:
        g = re.fullmatch(r"(\d+)x(\d+)x(\d+)", t)
        if g:
            m, n, k = (int(v) for v in g.groups())
            break
        if re.fullmatch(r"\d{3,5}", t):  # 16816 = m16 n8 k16, 1688 = m16 n8 k8, 884 = m8 n8 k4
            if t.startswith("16"):
                m, n, k = 16, 8, int(t[3:])
            elif t.startswith("88"):
                m, n, k = 8, 8, int(t[2:])
            break
    if m is None:
        return None
    dtype = "fp16"
    for t in toks[1:]:
        tt = {"BF16": "bf16", "F16": "fp16", "TF32": "tf32", "E4M3": "fp8", "E5M2": "fp8", "S8": "int8",
              "U8": "int8", "F64": "fp64"}.get(t)
        if tt:
            dtype = tt  # the last type token is the input type (the first is the accumulator's)
    if base == "DMMA":
        dtype = "fp64"
    return m, n, k, dtype, base in ("HGMMA", "IGMMA", "QGMMA")


def mma_flops_per_warp(opcode: str) -> tuple[float, str]:
    """FLOPs one warp's execution of an MMA contributes (a warpgroup MMA is executed by its 4 warps)."""
    shape = mma_shape(opcode)
    if shape is None:
        return 0.0, "fp16"
    m, n, k, dtype, warpgroup = shape
    return 2.0 * m * n * k / (4 if warpgroup else 1), dtype


def mix_key(ins: Instr) -> str:
    """Detailed key of the instruction mix: the base opcode plus width (memory) or shape (MMA)."""
    cls = instr_class(ins.opcode)
    if cls == "mma":
        return ".".join(ins.opcode.split(".")[:2]) + "." + (mma_shape(ins.opcode) or (0, 0, 0, "?", 0))[3]
    if ins.base in ("LDSM", "STSM"):
        return f"{ins.base}.x{warp_bytes(ins) // 128}"  # 8x8 16-bit matrices per instruction
    if cls in MEMORY_CLASSES:
        return f"{ins.base}.{access_bytes(ins.opcode) * 8}"  # bits per lane
    return ins.base


PIPES = ("issue", "fma", "alu", "xu", "fp64", "tensor", "l1", "shfl")


def instr_cost(ins: Instr, gpu: GPU) -> dict[str, float]:
    """SM cycles one warp's execution of ``ins`` occupies on each pipe (see the module docstring)."""
    cls = instr_class(ins.opcode)
    cost = {"issue": 1.0 / gpu.schedulers}
    if cls == "fp32" or cls == "imad":
        cost["fma"] = 32.0 / gpu.fp32_lanes
    elif cls == "fp64":
        cost["fp64"] = 32.0 / gpu.fp64_lanes
    elif cls in ("int", "cmp/sel") or ins.base in ("F2FP", "I2FP"):
        cost["alu"] = 32.0 / gpu.alu_lanes
    elif cls in ("conv", "mufu"):
        cost["xu"] = 32.0 / gpu.xu_lanes
    elif cls == "shfl":
        cost["shfl"] = 32.0 / gpu.shfl_lanes
    elif cls == "mma":
        flops, dtype = mma_flops_per_warp(ins.opcode)
        rate = gpu.tensor_flops_per_clk.get(dtype, gpu.tensor_flops_per_clk["fp16"])
        if ins.base in ("HMMA", "IMMA", "DMMA"):
            rate *= gpu.mma_sync_eff
        cost["tensor"] = flops / rate
    if cls in MEMORY_CLASSES:
        cost["l1"] = max(1.0, warp_bytes(ins) / gpu.l1_bytes_per_clk)
    return cost


# ------------------------------------------------------------------------------------- Triton IR
@dataclass
class IRDef:
    op: str
    operands: list[str]
    text: str
    region: int  # innermost enclosing scf.for (index into IR.loops), -1 at the top level


@dataclass
class IRLoop:
    iv: str
    lb: str
    ub: str
    step: str
    parent: int  # -1: top level
    iter_args: dict[str, str]  # region argument → initial value
    results: list[str]


@dataclass
class MemOp:
    kind: str  # "load" | "store" | "atomic"
    ptr: str  # SSA name of the address operand
    bytes: int  # per execution, all elements (masks ignored)
    region: int
    text: str
    descriptor: bool = False  # a tensor-descriptor (TMA) access: no per-lane SASS bytes to compare with
    guards: tuple = ()  # enclosing scf.if conditions: (SSA name of the i1 condition, True: then / False: else)


@dataclass
class IR:
    args: list[str]
    defs: dict[str, IRDef]
    loops: list[IRLoop]
    memops: list[MemOp]
    dots: list = field(default_factory=list)  # (region, FLOPs) of every tt.dot


_ELEM_BYTES = {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "f16": 2, "bf16": 2, "i16": 2, "i8": 1, "i1": 1}
_MEM_OPS = {
    "tt.load": "load", "tt.descriptor_load": "load", "tt.descriptor_gather": "load",
    "tt.experimental_descriptor_load": "load",
    "tt.store": "store", "tt.descriptor_store": "store", "tt.descriptor_scatter": "store",
    "tt.atomic_rmw": "atomic", "tt.atomic_cas": "atomic", "tt.descriptor_reduce": "atomic",
    # TTGIR only (the TTIR has none): cp.async and TMA copies into shared memory
    "ttg.async_copy_global_to_local": "load", "ttng.async_tma_copy_global_to_local": "load",
}
# Ops through which an address flows from their first operand (arith.select: the true value).
_PTR_FORWARD = {
    "tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "tt.make_tensor_ptr",
    "tt.advance", "tt.make_tensor_descriptor", "ttg.convert_layout", "tt.bitcast", "tt.cat", "tt.join",
}


def _strip_locs(line: str) -> str:
    out, i = [], 0
    while True:
        j = line.find("loc(", i)
        if j < 0:
            out.append(line[i:])
            return "".join(out).rstrip()
        out.append(line[i:j])
        depth, k = 0, j + 3
        while k < len(line):
            depth += {"(": 1, ")": -1}.get(line[k], 0)
            k += 1
            if depth == 0:
                break
        i = k


def type_bytes(types: str) -> int:
    """Bytes of the first tensor (or scalar) type in an IR type list: ``tensor<64x32x!tt.ptr<f32>>`` → 8192."""
    m = re.search(r"tensor<((?:\d+x)+)(?:!tt\.ptr<)?([a-zA-Z]\w*)", types)
    if m:
        n = math.prod(int(d) for d in m.group(1).rstrip("x").split("x"))
        return n * _ELEM_BYTES.get(m.group(2), 4)
    m = re.search(r"!tt\.ptr<([a-zA-Z]\w*)>", types)
    return _ELEM_BYTES.get(m.group(1), 4) if m else 4


def parse_ttir(text: str) -> IR:
    """Arguments, SSA definitions, ``scf.for`` loops and memory operations of a TTIR module.

    MLIR's printer numbers SSA values per region: sibling regions (two loops, the two sides of an
    ``scf.if``) reuse names such as ``%20``. Names are therefore resolved through a stack of scopes (one
    per open region) and a name defined again gets a unique spelling (``20@1``), so every definition and
    every use refers to the right value."""
    args: list[str] = []
    defs: dict[str, IRDef] = {}
    loops: list[IRLoop] = []
    memops: list[MemOp] = []
    stack: list[int] = []  # open regions: loop index, or -2 for a non-loop region
    guards: list = []  # per open region: (condition, branch) of an scf.if region, else None
    dots: list[tuple[int, float]] = []
    scopes: list[dict[str, str]] = [{}]  # the function's scope, then one per open region
    used: Counter = Counter()

    def define(n: str, scope: dict | None = None) -> str:
        u = n if not used[n] else f"{n}@{used[n]}"
        used[n] += 1
        (scopes[-1] if scope is None else scope)[n] = u
        return u

    def resolve(n: str) -> str:
        base, hash_, idx = n.partition("#")
        for sc in reversed(scopes):
            if base in sc:
                return sc[base] + hash_ + idx
        return n

    def open_region(loop_index: int, guard) -> dict:
        stack.append(loop_index)
        guards.append(guard)
        scopes.append({})
        return scopes[-1]

    for raw in text.splitlines():
        line = _strip_locs(raw).strip()
        if not line or line.startswith("#loc"):
            continue
        if re.match(r"\}\s*else\s*\{", line):
            if guards and guards[-1] is not None:
                guards[-1] = (guards[-1][0], not guards[-1][1])
            if len(scopes) > 1:
                scopes[-1] = {}  # the else region: a new scope
            continue
        if line.startswith("tt.func"):
            args = re.findall(r"%([\w$.-]+)\s*:", line.split("(", 1)[1])
            for n in args:
                define(n)
            continue
        region = next((r for r in reversed(stack) if r >= 0), -1)
        opens = line.count("{") - line.count("}")
        m = re.match(r"(%[\w$.-]+)(?::(\d+))?\s*=\s*(\"?[\w.]+\"?)\s*(.*)$", line)
        if m:
            name, op, rest = m.group(1)[1:], m.group(3).strip('"'), m.group(4)
        else:
            name, op, rest = None, line.split(" ", 1)[0].strip('"'), line.split(" ", 1)[1] if " " in line else ""
        if op == "scf.for":
            lm = re.match(r"%([\w$.-]+)\s*=\s*%([\w$.#-]+)\s+to\s+%([\w$.#-]+)\s+step\s+%([\w$.#-]+)", rest)
            if lm:
                raw_iters = re.findall(r"%([\w$.-]+)\s*=\s*%([\w$.#-]+)", rest.split("iter_args", 1)[1]) if "iter_args" in rest else []
                lb, ub, st = (resolve(lm.group(i)) for i in (2, 3, 4))
                inits = [resolve(v) for _, v in raw_iters]
                nres = int(m.group(2) or (1 if name else 0)) if m else 0
                uname = define(name) if name else None
                results = [f"{uname}#{i}" for i in range(nres)] if nres > 1 else ([uname] if uname else [])
                inner = open_region(len(loops), None) if opens > 0 else {}
                iv = define(lm.group(1), inner)
                iters = {define(k, inner): v for (k, _), v in zip(raw_iters, inits)}
                loops.append(IRLoop(iv, lb, ub, st, region, iters, results))
                for r in results:
                    defs[r] = IRDef("scf.for", list(iters.values()), line, region)
                continue
        operand_part = rest.split(" : ", 1)[0]
        operands = [resolve(o) for o in re.findall(r"%([\w$.#-]+)", operand_part)]
        if name:
            d = IRDef(op, operands, line, region)
            uname = define(name)
            defs[uname] = d
            nres = int(m.group(2) or 1)
            for i in range(nres):
                defs[f"{uname}#{i}"] = d
        if op in _MEM_OPS and operands:
            types = rest.split(" : ", 1)[1] if " : " in rest else ""
            memops.append(MemOp(_MEM_OPS[op], operands[0], type_bytes(types), region, line, "descriptor" in op or "tma" in op,
                                tuple(g for g in guards if g is not None)))
        if op == "tt.dot":
            dm = re.search(r"tensor<(\d+)x(\d+)x[^>]*>\s*\*\s*tensor<\d+x(\d+)x", rest)
            if dm:
                dots.append((region, 2.0 * int(dm.group(1)) * int(dm.group(2)) * int(dm.group(3))))
        if opens > 0:
            open_region(-2, (operands[0], True) if op == "scf.if" and operands else None)
        elif opens < 0:
            for _ in range(-opens):
                if stack:
                    stack.pop()
                if guards:
                    guards.pop()
                if len(scopes) > 1:
                    scopes.pop()
    return IR(args, defs, loops, memops, dots)


def pointer_root(ir: IR, name: str) -> str | None:
    """The kernel argument an address is computed from (through addptr/splat/broadcast/loop-carried values)."""
    carried = {k: v for lp in ir.loops for k, v in lp.iter_args.items()}
    seen = set()
    while name not in ir.args:
        if name in seen:
            return None
        seen.add(name)
        if name in carried:
            name = carried[name]
            continue
        d = ir.defs.get(name)
        if d is None or not d.operands:
            return None
        if d.op in _PTR_FORWARD or d.op == "scf.for":
            name = d.operands[0]
        elif d.op == "arith.select" and len(d.operands) >= 2:
            name = d.operands[1]
        else:
            return None
    return name


_BINOPS = {
    "arith.addi": lambda a, b: a + b,
    "arith.subi": lambda a, b: a - b,
    "arith.muli": lambda a, b: a * b,
    "arith.divsi": lambda a, b: _trunc_div(a, b),
    "arith.divui": lambda a, b: a // b,
    "arith.remsi": lambda a, b: a - b * _trunc_div(a, b),
    "arith.remui": lambda a, b: a % b,
    "arith.ceildivsi": lambda a, b: -((-a) // b),
    "arith.ceildivui": lambda a, b: -((-a) // b),
    "arith.floordivsi": lambda a, b: a // b,
    "arith.maxsi": lambda a, b: _np().maximum(a, b),
    "arith.minsi": lambda a, b: _np().minimum(a, b),
    "arith.maxui": lambda a, b: _np().maximum(a, b),
    "arith.minui": lambda a, b: _np().minimum(a, b),
    "arith.andi": lambda a, b: a & b,
    "arith.ori": lambda a, b: a | b,
    "arith.xori": lambda a, b: a ^ b,
    "arith.shli": lambda a, b: a << b,
    "arith.shrsi": lambda a, b: a >> b,
    "arith.shrui": lambda a, b: a >> b,
}
_UNOPS = ("arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast", "arith.index_castui", "arith.bitcast")
_CMP = {"eq": "__eq__", "ne": "__ne__", "slt": "__lt__", "sle": "__le__", "sgt": "__gt__", "sge": "__ge__",
        "ult": "__lt__", "ule": "__le__", "ugt": "__gt__", "uge": "__ge__"}


def _np():
    import numpy

    return numpy


def _trunc_div(a, b):
    np = _np()
    q = np.abs(a) // np.abs(b)
    return np.where((np.asarray(a) < 0) != (np.asarray(b) < 0), -q, q)


def eval_scalar(ir: IR, name: str, env: dict, cache: dict | None = None):
    """Value of an integer SSA value (a numpy array over the programs, or a scalar) from ``env``.

    ``env`` maps argument names to the launch's values and ``"pid_x"/"pid_y"/"pid_z"`` /
    ``"num_x"/...`` to the program ids / grid; the induction variable of an enclosing loop evaluates to
    its lower bound (``env`` may hold it). Raises ``KeyError`` on an op it cannot evaluate.
    """
    cache = {} if cache is None else cache
    if name in env:
        return env[name]
    if name in cache:
        return cache[name]
    for lp in ir.loops:
        if lp.iv == name:
            return eval_scalar(ir, lp.lb, env, cache)
    d = ir.defs.get(name)
    if d is None:
        raise KeyError(f"no definition of %{name}")
    if d.op == "arith.constant":
        m = re.search(r"arith\.constant\s+(-?\d+|true|false)\b", d.text)
        if m is None:
            raise KeyError(f"non-integer constant %{name}")
        v = {"true": 1, "false": 0}.get(m.group(1))
        val = int(m.group(1)) if v is None else v
    elif d.op in ("tt.get_program_id", "tt.get_num_programs"):
        axis = re.search(r"\b(x|y|z)\b", d.text.split("=", 1)[1]).group(1)
        val = env[("pid_" if d.op == "tt.get_program_id" else "num_") + axis]
    elif d.op in _BINOPS:
        a, b = (eval_scalar(ir, o, env, cache) for o in d.operands[:2])
        val = _BINOPS[d.op](a, b)
    elif d.op in _UNOPS:
        val = eval_scalar(ir, d.operands[0], env, cache)
    elif d.op == "arith.select":
        c, a, b = (eval_scalar(ir, o, env, cache) for o in d.operands[:3])
        val = _np().where(c, a, b)
    elif d.op == "arith.cmpi":
        pred = re.search(r"arith\.cmpi\s+(\w+)", d.text).group(1)
        a, b = (_np().asarray(eval_scalar(ir, o, env, cache)) for o in d.operands[:2])
        val = getattr(a, _CMP[pred])(b)
    else:
        raise KeyError(f"cannot evaluate %{name} ({d.op})")
    cache[name] = val
    return val


def loop_trips(ir: IR, env: dict, unknown: list | None = None):
    """Trip count of every ``scf.for`` per program (numpy arrays), nested counts NOT multiplied.

    A bound that cannot be evaluated (data-dependent, e.g. loaded from memory) raises ``KeyError``; with
    ``unknown`` (a list) that loop alone gets 1 trip and the reason is appended to ``unknown``."""
    np = _np()
    cache: dict = {}
    out = []
    for lp in ir.loops:
        try:
            lb, ub, st = (np.asarray(eval_scalar(ir, v, env, cache), dtype=np.int64) for v in (lp.lb, lp.ub, lp.step))
        except KeyError as exc:
            if unknown is None:
                raise
            unknown.append(str(exc))
            out.append(np.ones((), dtype=np.int64))
            continue
        out.append(np.maximum(0, -((lb - ub) // st)))  # ceil((ub - lb) / step), ≥ 0
    return out


def load_chain(ir: IR, region: int) -> int:
    """Longest chain of dependent loads among the loads directly in ``region`` (values from other regions: 0)."""
    memo: dict[str, int] = {}
    loads = {mo.text: mo for mo in ir.memops if mo.kind == "load" and mo.region == region}
    load_defs = {n for n, d in ir.defs.items() if d.text in loads}

    def depth(name: str, guard: int = 0) -> int:
        if name in memo:
            return memo[name]
        d = ir.defs.get(name)
        if d is None or d.region != region or guard > 500:
            return 0
        memo[name] = 0  # cycles (loop-carried values) end here
        val = max((depth(o, guard + 1) for o in d.operands), default=0) + (1 if name in load_defs else 0)
        memo[name] = val
        return val

    return max((depth(n) for n in load_defs), default=0)


# ------------------------------------------------------------------- TTGIR: issued bytes per layout
def _balanced(text: str, start: int) -> str:
    """``text[start:]`` up to the ``>`` that closes the first ``<`` (inclusive)."""
    depth = 0
    for k in range(start, len(text)):
        c = text[k]
        if c == "<":
            depth += 1
        elif c == ">" and text[k - 1] != "-":  # not the "->" of a function type
            depth -= 1
            if depth == 0:
                return text[start:k + 1]
    return text[start:]


def parse_layouts(text: str) -> dict[str, str]:
    """The layout aliases of a TTGIR module: ``#blocked1`` → ``#ttg.blocked<{...}>``."""
    out = {}
    for raw in text.splitlines():
        m = re.match(r"\s*(#[\w.]+)\s*=\s*(#ttg\w*\.\w+<)", raw)
        if m:
            out[m.group(1)] = _balanced(raw, m.start(2))
    return out


def _int_list(layout: str, key: str) -> list[int] | None:
    m = re.search(rf"\b{key}\s*=\s*\[([\d,\s]*)\]", layout)
    return [int(v) for v in m.group(1).split(",") if v.strip()] if m else None


def _mma_as_blocked(layout: str) -> tuple:
    """An MMA accumulator layout (``#ttg.nvidia_mma``, mma.sync v2 or wgmma v3) as the blocked coverage it
    has for replication: per warp 16 rows of ``instrShape[1]`` columns, lanes 8 × 4, so (sizePerThread,
    threadsPerWarp, warpsPerCTA) = ([2, instrShape[1] / 4], [8, 4], warpsPerCTA). (None, None, None) if unread."""
    w, ins = _int_list(layout, "warpsPerCTA"), _int_list(layout, "instrShape")
    if not w or not ins or len(w) != 2 or len(ins) < 2:
        return None, None, None
    return [2, max(1, ins[1] // 4)], [8, 4], w


def layout_replication(layout: str, shape: list[int], aliases: dict[str, str]) -> float:
    """How many threads of a CTA hold (and so load or store) each element of a ``shape`` tensor in ``layout``.

    ``#ttg.blocked`` (sizePerThread s, threadsPerWarp t, warpsPerCTA w): Π_i max(1, s_i·t_i·w_i / S_i), the
    CTA's coverage beyond the tensor wraps onto the same elements. ``#ttg.slice<{dim = d, parent = P}>``: the
    t_d·w_d threads of P along the removed dimension hold the same element, times P's replication over the
    remaining dimensions. An MMA accumulator layout (as its own layout or a slice's parent) is read as the blocked
    layout it covers (:func:`_mma_as_blocked`). Any other layout (dot operands, shared, linear): 1."""
    layout = aliases.get(layout, layout)
    if layout.startswith("#ttg.blocked<"):
        s, t, w = (_int_list(layout, k) for k in ("sizePerThread", "threadsPerWarp", "warpsPerCTA"))
        if not (s and t and w) or not len(s) == len(t) == len(w) == len(shape):
            return 1.0
        return float(math.prod(max(1.0, si * ti * wi / n) for si, ti, wi, n in zip(s, t, w, shape)))
    if layout.startswith("#ttg.nvidia_mma<"):
        s, t, w = _mma_as_blocked(layout)
        if not (s and t and w) or not len(s) == len(t) == len(w) == len(shape):
            return 1.0
        return float(math.prod(max(1.0, si * ti * wi / n) for si, ti, wi, n in zip(s, t, w, shape)))
    if layout.startswith("#ttg.slice<"):
        dm = re.search(r"\bdim\s*=\s*(\d+)", layout)
        pm = re.search(r"\bparent\s*=\s*", layout)
        if dm is None or pm is None:
            return 1.0
        rest = layout[pm.end():]
        parent = _balanced(rest, 0) if rest.startswith("#ttg") else re.match(r"#[\w.]+", rest).group(0)
        parent = aliases.get(parent, parent)
        d = int(dm.group(1))
        s, t, w = _mma_as_blocked(parent) if parent.startswith("#ttg.nvidia_mma<") else (
            _int_list(parent, k) for k in ("sizePerThread", "threadsPerWarp", "warpsPerCTA"))
        if not (s and t and w) or not len(s) == len(t) == len(w) == len(shape) + 1 or d >= len(t):
            return 1.0
        rest_dims = [i for i in range(len(t)) if i != d]
        return float(t[d] * w[d] * math.prod(max(1.0, s[i] * t[i] * w[i] / n) for i, n in zip(rest_dims, shape)))
    return 1.0


def memop_replication(mo: MemOp, aliases: dict[str, str], num_warps: int) -> float:
    """Replication (:func:`layout_replication`) of a TTGIR memory op's address tensor; a scalar access is
    issued by every thread of the CTA (32 · num_warps)."""
    types = mo.text.split(" : ", 1)[1] if " : " in mo.text else ""
    i = types.find("tensor<")
    if i < 0:
        return 32.0 * num_warps
    body = _balanced(types, i + len("tensor"))[1:-1]
    shape = [int(v) for v in re.match(r"((?:\d+x)*)", body).group(1).rstrip("x").split("x") if v]
    depth, enc = 0, ""
    for k, c in enumerate(body):  # the encoding follows the element type after a top-level comma
        depth += {"<": 1, ">": -1}.get(c, 0)
        if c == "," and depth == 0:
            enc = body[k + 1:].strip()
            break
    return layout_replication(enc, shape, aliases) if enc and shape else 1.0

def ttgir_issued_bytes(ttgir: str, ttir: IR, env: dict, num_warps: int, P: int,
                       per_region: dict | None = None) -> tuple[float | None, str]:
    """Global bytes the TTGIR's memory ops issue over all ``P`` programs: Σ bytes × :func:`memop_replication`
    × executions (trip counts from the same ``env`` as the TTIR's; a data-dependent bound gets 1 trip, as
    there). ``(None, reason)`` when it cannot be evaluated: no TTGIR, an unevaluable loop bound, or loops
    nested differently from the TTIR's."""
    import numpy as np

    if not ttgir:
        return None, "no TTGIR"
    g = parse_ttir(ttgir)
    if [lp.parent for lp in g.loops] != [lp.parent for lp in ttir.loops]:
        return None, f"loop nest {[lp.parent for lp in g.loops]} vs the TTIR's {[lp.parent for lp in ttir.loops]}"
    unknown: list[str] = []
    trips = [np.broadcast_to(t, (P,)) for t in loop_trips(g, env, unknown)]
    bad = [u for u in unknown if "(tt.load)" not in u]
    if bad:
        return None, f"trip counts unknown: {bad[0]}"
    execs = []
    for i, lp in enumerate(g.loops):
        e, p = trips[i].astype(np.float64), lp.parent
        while p >= 0:
            e, p = e * trips[p], g.loops[p].parent
        execs.append(float(np.mean(e)))
    aliases = parse_layouts(ttgir)
    if per_region is not None:  # issued bytes of one execution of each loop body (-1: outside every loop)
        for mo in g.memops:
            if not mo.descriptor:
                per_region[mo.region] = per_region.get(mo.region, 0.0) + mo.bytes * memop_replication(mo, aliases, num_warps)
    total = sum(mo.bytes * memop_replication(mo, aliases, num_warps) * (execs[mo.region] if mo.region >= 0 else 1.0)
                for mo in g.memops if not mo.descriptor)
    return total * P, ""

# ------------------------------------------------------------------------------------ workloads
@dataclass(frozen=True)
class Shape:
    name: str
    N: int
    M: int
    K: int
    Ds: int


@dataclass(frozen=True)
class OpSpec:
    """One launcher and how to call it (explicit inputs, from the ``*_ref`` signatures)."""

    name: str  # equss op name (equss.backends.OP_NAMES)
    launcher: str  # attribute of equss.kernels
    dtypes: tuple[str, ...]  # "fp32-exact", "fp32-ieee", "fp32-tf32x3", "fp32-tf32", "bf16" (value dtype of the op)
    flops: object  # callable(shape) -> useful FLOPs of the op
    make: object  # callable(shape, torch dtype, tensor factory) -> the launcher's positional arguments


def fake_tensor(*shape, dtype):
    """A CUDA tensor for :func:`capture` (inside its ``FakeTensorMode`` it has no storage)."""
    import torch

    return torch.empty(*shape, dtype=dtype, device="cuda")


def _codes(s: Shape, t):
    import torch

    return t(s.N, s.M, dtype=torch.int32)


def _ops() -> list[OpSpec]:
    import torch

    f32 = torch.float32
    assign_dtypes = ("fp32-exact", "fp32-ieee", "fp32-tf32x3", "fp32-tf32", "bf16")
    plain_dtypes = ("fp32", "bf16")
    assign_flops = lambda s: 2.0 * s.N * s.M * s.K * s.Ds
    return [
        # the EQUSS layer gathers from the codebooks it assigned with (codebooks_out is codebooks)
        OpSpec("pq_assign", "pq_assign_triton", assign_dtypes, assign_flops,
               lambda s, dt, t: (t(s.N, s.M, s.Ds, dtype=dt), t(s.M, s.K, s.Ds, dtype=dt), "l2")),
        OpSpec("pq_assign_gather", "pq_assign_gather_triton", assign_dtypes, assign_flops,
               lambda s, dt, t: (lambda x, cb: (x, cb, cb, "l2", None))(t(s.N, s.M, s.Ds, dtype=dt), t(s.M, s.K, s.Ds, dtype=dt))),
        OpSpec("pq_gather", "pq_gather_triton", plain_dtypes, lambda s: 0.0,
               lambda s, dt, t: (_codes(s, t), t(s.M, s.K, s.Ds, dtype=dt))),
        OpSpec("pq_gather_backward", "pq_gather_backward_triton", plain_dtypes, lambda s: 1.0 * s.N * s.M * s.Ds,
               lambda s, dt, t: (t(s.N, s.M, s.Ds, dtype=dt), _codes(s, t), s.K)),
        OpSpec("pq_cluster_stats", "pq_cluster_stats_triton", plain_dtypes, lambda s: 1.0 * s.N * s.M * (s.Ds + 1),
               lambda s, dt, t: (t(s.N, s.M, s.Ds, dtype=dt), _codes(s, t), s.K)),
        OpSpec("pq_ema_apply_", "pq_ema_apply_triton_", plain_dtypes, lambda s: 6.0 * s.M * s.K * (s.Ds + 1),
               lambda s, dt, t: (t(s.M, s.K, dtype=f32), t(s.M, s.K, s.Ds, dtype=f32), t(s.M, s.K, dtype=f32),
                                 t(s.M, s.K, s.Ds, dtype=f32), t(s.M, s.K, s.Ds, dtype=dt), 0.99, 1e-5)),
    ]


def project_shapes() -> list[Shape]:
    from benchmarks.shapes import GPU_SHAPES

    return [Shape(s.name, s.N, s.M, s.K, s.Ds) for s in GPU_SHAPES]


def split_dtype(label: str):
    """``"fp32-tf32"`` → (torch.float32, "tf32"); ``"bf16"`` → (torch.bfloat16, "bf16")."""
    import torch

    base, _, prec = label.partition("-")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[base]
    return dt, prec or ("ieee" if base == "fp32" else base)


# -------------------------------------------------------------------------------------- capture
@dataclass
class Launch:
    """A captured ``kernel[grid](...)`` call and what Triton would compile for it."""

    fn: object  # JITFunction
    grid: tuple[int, int, int]
    bound: dict  # parameter name → value (fake tensors, ints, floats, constexprs)
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass
class TorchOp:
    name: str
    bytes: int


@contextlib.contextmanager
def capture(gpu: GPU):
    """Record Triton launches and PyTorch ops made on fake CUDA tensors, with ``gpu``'s SM count.

    Yields ``(launches, torch_ops)`` lists that fill while the block runs. Nothing is compiled or run.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    launches: list[Launch] = []
    torch_ops: list[TorchOp] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if func.is_view or name.startswith(("aten.empty", "prim.", "aten.detach", "aten.alias", "aten.lift")):
                return out
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            if outs:
                torch_ops.append(TorchOp(name, sum(t.numel() * t.element_size() for t in tensors + outs)))
            return out

    props = SimpleNamespace(name=gpu.name, multi_processor_count=gpu.sms, major=gpu.arch // 10,
                            minor=gpu.arch % 10, total_memory=80 << 30, L2_cache_size=50 << 20)
    saved = (torch.cuda.get_device_properties, torch.cuda.current_device)
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.current_device = lambda: 0
    _clear_kernel_caches()
    try:
        with intercept_launches(launches), FakeTensorMode(), Recorder():
            yield launches, torch_ops
    finally:
        torch.cuda.get_device_properties, torch.cuda.current_device = saved
        _clear_kernel_caches()


def param_names(fn) -> list[str]:
    """Parameter names of a ``@triton.jit`` kernel (JIT or interpreted)."""
    params = getattr(fn, "params", None)
    return [p.name for p in params] if params is not None else list(fn.arg_names)


def constexpr_names(fn) -> set[str]:
    """Names of the ``tl.constexpr`` parameters of a ``@triton.jit`` kernel (JIT or interpreted)."""
    import inspect

    params = getattr(fn, "params", None)
    if params is not None:
        return {p.name for p in params if p.is_constexpr}
    return {n for n, p in inspect.signature(fn.fn).parameters.items() if "constexpr" in str(p.annotation)}


def runtime_scalars(launch: Launch) -> dict:
    """The launch's non-constexpr int/float arguments (N, M, K, Ds, rows_per_prog, ...)."""
    consts = constexpr_names(launch.fn)
    return {k: v for k, v in launch.bound.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in consts}


@contextlib.contextmanager
def intercept_launches(launches: list):
    """Replace ``run`` of JIT and interpreted kernels: ``kernel[grid](...)`` appends a :class:`Launch` to
    ``launches`` instead of compiling or running anything."""
    from triton.runtime import interpreter as I
    from triton.runtime import jit as J

    def run(self, *args, grid, warmup, **kwargs):
        names = param_names(self)
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        g = grid(bound) if callable(grid) else grid
        g = tuple(int(v) for v in g) + (1,) * (3 - len(g))
        launches.append(Launch(self, g, bound, dict(kwargs)))
        return None

    saved = (J.JITFunction.run, I.InterpretedFunction.run)
    J.JITFunction.run = I.InterpretedFunction.run = run
    try:
        yield launches
    finally:
        J.JITFunction.run, I.InterpretedFunction.run = saved


def _clear_kernel_caches() -> None:
    """Drop ``functools.cache`` results (e.g. the SM count) of the kernel modules, before and after capture."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("equss.kernels") and mod is not None:
            for v in vars(mod).values():
                if callable(getattr(v, "cache_clear", None)):
                    v.cache_clear()


def compile_inputs(launch: Launch, arch: int):
    """``(ASTSource, target, options dict)`` for the launch, specialised as Triton's launcher would."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit as J

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = J.create_function_from_signature(fn.signature, fn.params, backend)
    args = [launch.bound[p.name] for p in fn.params if p.name in launch.bound]
    args = [J.MockTensor(a.dtype, list(a.shape)) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: v for k, v in launch.kwargs.items() if k not in launch.bound or k in ("num_warps", "num_stages")}
    kwargs.setdefault("debug", False)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(fn, signature, constexprs, attrs), target, options.__dict__, signature, constexprs


_COMPILED: dict = {}


def disassemble(cubin: bytes) -> str:
    """``cuobjdump --dump-resource-usage --dump-sass`` of a cubin, cached on disk by the cubin's hash
    (``$EQUSS_KERNEL_MODEL_CACHE``, default ``~/.cache/equss/kernel_model``; cuobjdump takes ~0.5 s a call)."""
    import hashlib

    cache = os.environ.get("EQUSS_KERNEL_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "equss", "kernel_model")
    path = os.path.join(cache, hashlib.sha256(cubin).hexdigest() + ".sass")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        pass
    text = TR.cuobjdump(cubin, "--dump-resource-usage", "--dump-sass")
    try:
        os.makedirs(cache, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError:
        pass
    return text


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile (cached per specialisation) and return TTIR, SASS, resources and occupancy."""
    import triton

    src, target, options, signature, constexprs = compile_inputs(launch, arch)
    key = (launch.name, arch, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
           repr(sorted(src.attrs.items())) if isinstance(src.attrs, dict) else repr(src.attrs),
           repr(sorted((k, repr(v)) for k, v in options.items())))
    if key in _COMPILED:
        return _COMPILED[key]
    t0 = time.perf_counter()
    ck = triton.compile(src, target=target, options=options)
    cubin = ck.asm["cubin"]
    dump = disassemble(cubin)
    usage = TR.parse_resource_usage(dump)
    shared = usage["shared"] + int(ck.metadata.shared)
    num_warps = int(ck.metadata.num_warps)
    out = {
        "ttir": ck.asm["ttir"],
        "ttgir": ck.asm.get("ttgir", ""),
        "sass": dump,
        "reg": usage["reg"],
        "spill": usage["stack"] + usage["local"],
        "shared": shared,
        "num_warps": num_warps,
        "num_stages": int(options.get("num_stages", 1) or 1),
        "occupancy": TR.occupancy(usage["reg"], shared, num_warps, arch),
        "compile_s": round(time.perf_counter() - t0, 2),
        "signature": signature,
        "divisible_by_16": sorted(p for (i,), a in src.attrs.items() if a for p in [list(signature)[i]]),
    }
    _COMPILED[key] = out
    return out


def launch_config(launch: Launch) -> str:
    """The kernel module's ``CONFIGS`` entry this launch uses (matched by ``compile_spec``), else a summary."""
    import importlib

    mod = importlib.import_module(launch.fn.fn.__module__)
    consts = {k: v for k, v in launch.bound.items() if k in {p.name for p in launch.fn.params if p.is_constexpr}}
    for cfg in getattr(mod, "CONFIGS", ()):
        kernel, signature, constexprs, options = mod.compile_spec(cfg)
        if kernel is not launch.fn or constexprs != consts:
            continue
        if any(options.get(k, 0) != launch.kwargs.get(k, options.get(k, 0)) for k in ("num_warps", "num_stages")):
            continue
        types = {n: s for n, s in signature.items() if s.startswith("*")}
        actual = {n: "*" + _ttype(launch.bound[n]) for n in types}
        if actual == types:
            return cfg.describe()
    return f"{launch.name} (not in CONFIGS) " + " ".join(f"{k}={v}" for k, v in consts.items())


def _ttype(t) -> str:
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
            torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8"}[t.dtype]


# ------------------------------------------------------------------------------------- analysis
def analyse(launch: Launch, comp: dict) -> dict:
    """Per-program instruction counts, loops, trip counts and bytes of a compiled launch (GPU-independent)."""
    import numpy as np
    import torch

    instrs = parse_sass(comp["sass"], launch.name)
    sloops = find_loops(instrs)
    ir = parse_ttir(comp["ttir"])
    P = launch.programs
    gx, gy, gz = launch.grid
    idx = np.arange(P, dtype=np.int64)
    env = {"pid_x": idx % gx, "pid_y": (idx // gx) % gy, "pid_z": idx // (gx * gy), "num_x": gx, "num_y": gy, "num_z": gz}
    for a in ir.args:
        v = launch.bound.get(a)
        if isinstance(v, bool | int):
            env[a] = int(v)
    notes = []
    unknown: list[str] = []
    trips = [np.broadcast_to(t, (P,)) for t in loop_trips(ir, env, unknown)]
    for why in unknown:  # that loop alone gets 1 trip
        if "(tt.load)" in why:  # a bound the kernel loads from memory (e.g. a count of flagged rows)
            notes.append(f"data-dependent trip count ({why}); 1 assumed for that loop")
        else:
            notes.append(f"trip counts unknown ({why}); 1 assumed for that loop")
    # executions of each TTIR loop body per program: product over its nest
    execs = []
    for i, lp in enumerate(ir.loops):
        e = trips[i].astype(np.float64)
        p = lp.parent
        while p >= 0:
            e = e * trips[p]
            p = ir.loops[p].parent
        execs.append(e)

    # SASS loops ↔ TTIR loops by nesting order (pre-order of both trees)
    def shape(parents):
        return [sum(1 for q in parents if q == i) for i in range(len(parents))]

    s_par = [-1 if lp.parent is None else lp.parent for lp in sloops]
    t_par = [lp.parent for lp in ir.loops]
    matched = len(sloops) == len(ir.loops) and s_par == t_par and shape(s_par) == shape(t_par)
    if not matched:
        notes.append(f"loop structure differs: SASS {len(sloops)} loops {s_par}, TTIR {len(ir.loops)} {t_par}; "
                     "SASS loops take the trips of the TTIR loop at the same position, else 1")
    s_exec = [float(np.mean(execs[i])) if i < len(execs) else 1.0 for i in range(len(sloops))]
    s_trips = [float(np.mean(trips[i])) if i < len(trips) else 1.0 for i in range(len(sloops))]

    # subroutines (not counted) and ptxas runtime unrolling (a SASS iteration = u TTIR iterations)
    subs = subroutines(instrs)
    if subs:
        instrs = [i for i in instrs if not any(a <= i.addr <= b for a, b in subs)]
        notes.append("ptxas slow-path subroutines (CALL targets) not counted")
    owner = [innermost_loop(sloops, i.addr) for i in instrs]
    nw = comp["num_warps"]
    # per loop body, the bytes its TTGIR memory ops issue (layout replication counted, as the SASS does):
    # the unroll test compares like with like (a replicated load is not a second unrolled iteration)
    issued_per_region: dict = {}
    issued_bytes, why_not = ttgir_issued_bytes(comp.get("ttgir", ""), ir, env, nw, P, issued_per_region)
    unroll = []
    for li in range(len(sloops)):
        sb = sum(global_warp_bytes(i) for i, o in zip(instrs, owner) if o == li) * nw
        if not matched:
            tb = 0
        elif issued_bytes is not None:
            tb = issued_per_region.get(li, 0.0)
        else:
            tb = sum(mo.bytes for mo in ir.memops if mo.region == li and not mo.descriptor)
        u = unroll_factor(sb, tb)
        # Lanes that load the same small vector (a per-column bias in an MMA layout) also multiply the SASS
        # bytes: a loop that issues exactly its TTIR iteration's MMAs once was not unrolled.
        s_mma = sum(mma_flops_per_warp(i.opcode)[0] for i, o in zip(instrs, owner) if o == li) * nw
        t_mma = sum(f for r, f in ir.dots if r == li) if matched else 0.0
        if u > 1 and s_mma > 0 and t_mma > 0 and abs(s_mma / t_mma - 1.0) <= 0.15:
            notes.append(f"{launch.name}: a loop moves {sb / tb:.2f}× its TTIR iteration's global bytes but issues "
                         "its MMAs once: redundant per-lane loads, not unrolling")
            u = 1
        unroll.append(u)
    weights = [1.0 if li is None else s_exec[li] / unroll[li] for li in owner]
    for li, u in enumerate(unroll):
        if u == 1:
            continue
        # the remainder ladder after the loop holds u - 1 more copies of one iteration: not executed as well
        budget = Counter({k: v * (u - 1) / u for k, v in Counter(mix_key(i) for i, o in zip(instrs, owner) if o == li).items()})
        for j, (ins, o) in enumerate(zip(instrs, owner)):
            k = mix_key(ins)
            if o is None and ins.addr > sloops[li].end and budget[k] > 0:
                take = min(weights[j], budget[k])
                weights[j] -= take
                budget[k] -= take
        notes.append(f"{launch.name}: ptxas unrolled a loop ×{u} (its remainder copies are not counted)")

    # instruction mix: per program per warp
    mix_cls: Counter = Counter()
    loop_mix = [Counter() for _ in sloops]
    loop_cls = [Counter() for _ in sloops]
    weighted: list[tuple[Instr, float]] = []
    for ins, li, w in zip(instrs, owner, weights):
        weighted.append((ins, w))
        mix_cls[instr_class(ins.opcode)] += w
        if li is not None:
            loop_mix[li][mix_key(ins)] += 1
            loop_cls[li][instr_class(ins.opcode)] += 1

    # bytes: per memory op per program, and which tensors the kernel reads / writes
    region_exec = lambda r: np.mean(execs[r]) if r >= 0 else 1.0
    traffic = Counter()
    touched: dict[int, dict] = {}
    unknown_roots = 0
    mo_tensor: list[int | None] = []  # id of the tensor each memory op addresses
    def never_runs(mo: MemOp) -> bool:
        """An access inside an ``scf.if`` whose condition is false for every program at this launch (e.g. a
        run-time ``fused`` flag that is 0): it moves no bytes. Conditions that cannot be evaluated count as true."""
        for cond, branch in mo.guards:
            try:
                v = np.asarray(eval_scalar(ir, cond, env)).astype(bool)
            except KeyError:
                continue
            if not np.any(v == branch):
                return True
        return False

    dead = 0
    for mo in ir.memops:
        if never_runs(mo):
            dead += 1
            mo_tensor.append(None)
            continue
        traffic[mo.kind] += mo.bytes * float(region_exec(mo.region)) * P
        root = pointer_root(ir, mo.ptr)
        t = launch.bound.get(root) if root else None
        t = getattr(t, "base", t)  # a host-side TensorDescriptor addresses its base tensor
        if not isinstance(t, torch.Tensor):
            unknown_roots += 1
            mo_tensor.append(None)
            continue
        mo_tensor.append(id(t))
        entry = touched.setdefault(id(t), {"arg": root, "bytes": t.numel() * t.element_size(), "kinds": set(),
                                           "requested": 0.0, "tensor": t})
        entry["kinds"].add(mo.kind)
        entry["requested"] += mo.bytes * float(region_exec(mo.region)) * P
    if unknown_roots:
        notes.append(f"{unknown_roots} memory ops with an address not traced to an argument (not in the minimum bytes)")
    if dead:
        notes.append(f"{launch.name}: {dead} memory ops in branches not taken at this launch (no bytes)")
    # cross-check: global bytes of the counted SASS instructions vs the bytes the TTGIR's memory ops issue
    # (each op's bytes × the threads its layout replicates each element over × its executions; like with
    # like: a 1-D load in a slice layout is issued by every lane of a row, the TTIR counts it once). A
    # large gap means a misread of the control flow. TTGIR not evaluable: the TTIR's bytes, with a note.
    sass_bytes = sum(global_warp_bytes(i) * w for i, w in weighted) * nw * P
    ttir_bytes = sum(mo.bytes * float(region_exec(mo.region)) * P for mo in ir.memops if not mo.descriptor)
    if issued_bytes is None:
        notes.append(f"{launch.name}: TTGIR not evaluable ({why_not}); SASS bytes compared with the TTIR's")
        issued_bytes = ttir_bytes
    bytes_ratio = sass_bytes / issued_bytes if issued_bytes else 1.0
    if not 0.67 <= bytes_ratio <= 1.5:
        notes.append(f"{launch.name}: counted SASS global bytes are {bytes_ratio:.2f}× the TTGIR's issued bytes")
    min_read = sum(e["bytes"] for e in touched.values() if "load" in e["kinds"])
    min_write = sum(e["bytes"] for e in touched.values() if e["kinds"] & {"store", "atomic"})

    # latency regions: top level (-1) and each innermost TTIR loop with loads
    inner = {i for i in range(len(ir.loops))} - {lp.parent for lp in ir.loops}
    # tensor → fraction of its requested load bytes that are compulsory (HBM); the rest are L2 re-reads
    compulsory = {tid: min(1.0, e["bytes"] / e["requested"]) for tid, e in touched.items() if e["requested"] > 0}
    regions = []
    for r in [-1] + list(range(len(ir.loops))):
        loads = [i for i, mo in enumerate(ir.memops) if mo.kind == "load" and mo.region == r]
        if not loads:
            continue
        fr = [compulsory.get(mo_tensor[i], 1.0) for i in loads]
        regions.append({
            "region": r,
            "executions": float(region_exec(r)),
            "load_chain": load_chain(ir, r),
            "hbm_fraction": float(np.mean(fr)),
            "overlap": max(1, comp["num_stages"] - 1) if r in inner else 1,
        })

    # hot loop: the SASS loop with the most executed instructions
    hot = max(range(len(sloops)), key=lambda i: s_exec[i] / unroll[i] * sum(loop_mix[i].values()), default=None)
    return {
        "instrs": weighted,
        "instr_per_warp": float(sum(w for _, w in weighted)),
        "mix_per_warp": {k: round(v, 1) for k, v in sorted(mix_cls.items(), key=lambda kv: -kv[1])},
        "loops": [
            {"start": hex(lp.start), "end": hex(lp.end), "depth": lp.depth, "trips": s_trips[i],
             "executions": s_exec[i], "unroll": unroll[i], "instr_per_iter": sum(loop_mix[i].values()),
             "classes": dict(loop_cls[i].most_common()), "mix": dict(loop_mix[i].most_common())}
            for i, lp in enumerate(sloops)
        ],
        "hot_loop": hot,
        "loop_match": matched,
        "sass_vs_ttir_bytes": round(bytes_ratio, 3),
        "ttir_loops": [{"trips_mean": float(np.mean(t)), "trips_max": int(np.max(t)) if len(t) else 0} for t in trips],
        "bytes": {"min_read": min_read, "min_write": min_write, "min": min_read + min_write,
                  "requested_load": traffic["load"], "requested_store": traffic["store"],
                  "requested_atomic": traffic["atomic"],
                  "requested": traffic["load"] + traffic["store"] + traffic["atomic"]},
        "tensors": sorted(f"{e['arg']}:{'/'.join(sorted(e['kinds']))}" for e in touched.values()),
        "written": {tid: e["tensor"] for tid, e in touched.items() if e["kinds"] & {"store", "atomic"}},
        "latency_regions": regions,
        "notes": notes,
    }


def eta(warps_per_scheduler: float, gpu: GPU) -> float:
    """Fraction of the pipes' peak that ``warps_per_scheduler`` resident warps sustain (latency hiding)."""
    return min(1.0, warps_per_scheduler / gpu.warps_to_saturate)


def wave_cycles(P: int, per_sm: int, sms: int, prog_cycles: float, num_warps: int, gpu: GPU) -> float:
    """Cycles of the busiest SM for ``P`` programs of ``prog_cycles`` each, ``per_sm`` resident at a time."""
    per_sm = max(1, per_sm)
    full, rem = divmod(P, per_sm * sms)
    t = full * per_sm * prog_cycles / eta(per_sm * num_warps / gpu.schedulers, gpu)
    if rem:
        k = -(-rem // sms)
        t += k * prog_cycles / eta(k * num_warps / gpu.schedulers, gpu)
    return t


def predict(a: dict, comp: dict, P: int, gpu: GPU, useful_flops: float, precision: str) -> dict:
    """Predicted time of one launch on ``gpu`` from its analysis ``a`` (see the module docstring)."""
    nw = comp["num_warps"]
    pipes = Counter()
    for ins, w in a["instrs"]:
        for p, c in instr_cost(ins, gpu).items():
            pipes[p] += c * w * nw
    per_sm = comp["occupancy"]["blocks_per_sm"]
    cyc = 1e6 / (gpu.clock_ghz * 1e9)  # µs per cycle
    comp_us = {p: wave_cycles(P, per_sm, gpu.sms, pipes[p], nw, gpu) * cyc for p in PIPES if pipes[p] > 0}
    b = a["bytes"]
    waves = -(-P // (max(1, per_sm) * gpu.sms))
    lat_ns = 0.0
    for r in a["latency_regions"]:
        lat = r["hbm_fraction"] * gpu.dram_latency_ns + (1 - r["hbm_fraction"]) * gpu.l2_latency_ns
        lat_ns += r["executions"] * r["load_chain"] * lat / r["overlap"]
    bounds = dict(comp_us)
    bounds["hbm"] = b["min"] / (gpu.hbm_efficiency * gpu.hbm_GBps * 1e9) * 1e6
    bounds["l2"] = b["requested"] / (gpu.l2_GBps * 1e9) * 1e6
    bounds["latency"] = waves * lat_ns * 1e-3
    bottleneck = max(bounds, key=bounds.get)
    t = bounds[bottleneck] + gpu.launch_us
    roof = max(b["min"] / (gpu.hbm_GBps * 1e9), useful_flops / gpu.rate(precision)) * 1e6
    return {
        "predicted_us": round(t, 2),
        "roofline_us": round(roof, 2),
        "hbm_floor_us": round(b["min"] / (gpu.hbm_GBps * 1e9) * 1e6, 2),
        "pct_of_roofline": round(100 * roof / t, 1),
        "bottleneck": bottleneck if bounds[bottleneck] > gpu.launch_us else "launch",
        "bounds_us": {k: round(v, 2) for k, v in bounds.items()},
        # each bound alone as a fraction of the roofline (100 %: that resource alone would reach it)
        "bounds_pct_of_roofline": {k: round(100 * roof / (v + gpu.launch_us), 1) for k, v in bounds.items()},
        "waves": waves,
    }


def _precision(dtype_label: str) -> str:
    """The matmul precision the roofline charges: ``fp32-tf32`` → ``tf32``, plain ``fp32`` → FP32 FMA, ``bf16``."""
    base, _, prec = dtype_label.partition("-")
    return (prec or "fp32") if base == "fp32" else base


# ------------------------------------------------------------------------------------- the model
def run_model(shapes: list[Shape] | None = None, gpus: tuple[str, ...] = ("H100", "H200", "A100"),
              ops: list[str] | None = None, log=None) -> dict:
    """Capture, compile, analyse and predict every launch of every op at every shape and dtype."""
    import equss.kernels as K
    import numpy  # noqa: F401  (fail early)
    import triton
    from equss.kernels import _config as C

    log = log or (lambda *a: None)
    shapes = shapes or project_shapes()
    archs = sorted({GPUS[g].arch for g in gpus}, reverse=True)
    rows, op_rows = [], []
    used_configs = set()
    for spec in _ops():
        if ops and spec.name not in ops:
            continue
        launcher = getattr(K, spec.launcher)
        for shape in shapes:
            for label in spec.dtypes:
                dtype, prec = split_dtype(label)
                # One capture per architecture, on its first GPU: the launchers pick configurations by
                # compute capability and size grids by SM count.
                captured = {}
                for arch in archs:
                    gpu_a = next(g for g in gpus if GPUS[g].arch == arch)
                    old = os.environ.get(C.PRECISION_ENV)
                    if label.startswith("fp32-"):
                        os.environ[C.PRECISION_ENV] = prec
                    try:
                        with capture(GPUS[gpu_a]) as (launches, torch_ops):
                            op_args = spec.make(shape, dtype, fake_tensor)
                            op_out = launcher(*op_args)
                    finally:
                        if old is None:
                            os.environ.pop(C.PRECISION_ENV, None)
                        else:
                            os.environ[C.PRECISION_ENV] = old
                    captured[arch] = (launches, torch_ops, op_args, op_out)
                primary = GPUS[gpus[0]].arch
                launches, _, op_args, op_out = captured[primary]
                if len({len(c[0]) for c in captured.values()}) != 1:
                    raise RuntimeError(f"{spec.name}@{shape.name}/{label}: the launch count differs between architectures")
                op_total = {g: 0.0 for g in gpus}
                written: dict[int, object] = {}
                for li, launch in enumerate(launches):
                    config = launch_config(launch)
                    used_configs.add(config)
                    row = {
                        "key": f"{spec.name}/{launch.name}@{shape.name}/{label}",
                        "op": spec.name, "kernel": launch.name, "shape": shape.name, "dtype": label,
                        "config": config, "grid": list(launch.grid), "programs": launch.programs,
                        "scalars": runtime_scalars(launch),
                        "arch": {}, "gpu": {},
                    }
                    flops = spec.flops(shape) if li == 0 else 0.0
                    row["useful_flops"] = flops
                    for arch in archs:
                        launch_a = captured[arch][0][li]
                        config_a = launch_config(launch_a)
                        used_configs.add(config_a)
                        log(f"  {row['key']} sm_{arch}")
                        comp = compile_launch(launch_a, arch)
                        a = analyse(launch_a, comp)
                        written.update(a.pop("written"))
                        hot = a["loops"][a["hot_loop"]] if a["hot_loop"] is not None else None
                        row["arch"][f"sm_{arch}"] = {
                            "config": config_a, "grid": list(launch_a.grid), "programs": launch_a.programs,
                            "scalars": runtime_scalars(launch_a),
                            "reg": comp["reg"], "spill": comp["spill"], "shared": comp["shared"],
                            "num_warps": comp["num_warps"], "num_stages": comp["num_stages"],
                            "occupancy": comp["occupancy"], "divisible_by_16": comp["divisible_by_16"],
                            "instr_per_warp": round(a["instr_per_warp"], 1), "mix_per_warp": a["mix_per_warp"],
                            "loops": a["loops"], "hot_loop": a["hot_loop"], "hot_loop_summary": hot_summary(hot),
                            "loop_match": a["loop_match"], "sass_vs_ttir_bytes": a["sass_vs_ttir_bytes"],
                            "ttir_loops": a["ttir_loops"], "bytes": a["bytes"],
                            "tensors": a["tensors"], "latency_regions": a["latency_regions"], "notes": a["notes"],
                        }
                        for g in gpus:
                            if GPUS[g].arch == arch:
                                row["gpu"][g] = predict(a, comp, launch_a.programs, GPUS[g], flops, _precision(label))
                                op_total[g] += row["gpu"][g]["predicted_us"]
                    rows.append(row)
                torch_us = {g: sum(o.bytes / (GPUS[g].hbm_efficiency * GPUS[g].hbm_GBps * 1e3) + GPUS[g].launch_us
                                   for o in captured[GPUS[g].arch][1]) for g in gpus}
                torch_ops = captured[primary][1]
                op_bytes = op_min_bytes(op_args, op_out, written)
                op_rows.append(op_summary(spec, shape, label, rows[-len(launches):] if launches else [], torch_ops,
                                          torch_us, op_total, gpus, op_bytes))
    unused = []
    for name in K.KERNEL_MODULES:
        import importlib

        mod = importlib.import_module(f"equss.kernels.{name}")
        unused += [c.describe() for c in getattr(mod, "CONFIGS", ()) if c.describe() not in used_configs]
    return {
        "generated_by": "scripts/kernel_model.py",
        "kernels_commit": kernels_commit(),
        "triton": triton.__version__,
        "gpus": {g: dataclasses.asdict(GPUS[g]) for g in gpus},
        "shapes": [dataclasses.asdict(s) for s in shapes],
        "rows": rows,
        "ops": op_rows,
        "configs_not_launched": sorted(set(unused)),
    }


def kernels_commit() -> str:
    """Short hash of the last commit touching ``kernels/`` (``+dirty`` with uncommitted changes there)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        return git("log", "-1", "--format=%h", "--", "kernels") + ("+dirty" if git("status", "--porcelain", "--", "kernels") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def op_min_bytes(op_args, op_out, written: dict) -> int:
    """Compulsory HBM bytes of one op call: its input tensors read once, its outputs (returned, or inputs
    a kernel writes in place) written once. Intermediates between the op's launches are not counted."""
    import torch

    leaves = lambda x: [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]
    size = lambda t: t.numel() * t.element_size()
    inputs = {id(t): t for t in leaves(op_args)}
    outputs = {id(t): t for t in leaves(op_out) if id(t) not in inputs}
    return (sum(size(t) for t in inputs.values()) + sum(size(t) for t in outputs.values())
            + sum(size(t) for tid, t in inputs.items() if tid in written))


def op_summary(spec: OpSpec, shape: Shape, label: str, rows: list[dict], torch_ops: list[TorchOp],
               torch_us: dict, kernel_us: dict, gpus, op_bytes: int) -> dict:
    """Totals of one op call: its Triton launches + PyTorch ops, and the op's own roofline."""
    out = {"key": f"{spec.name}@{shape.name}/{label}", "op": spec.name, "shape": shape.name, "dtype": label,
           "kernels": [r["kernel"] for r in rows], "torch_ops": dict(Counter(o.name for o in torch_ops)),
           "min_bytes": op_bytes, "useful_flops": spec.flops(shape), "gpu": {}}
    for g in gpus:
        gpu = GPUS[g]
        roof = max(op_bytes / (gpu.hbm_GBps * 1e9), spec.flops(shape) / gpu.rate(_precision(label))) * 1e6
        total = kernel_us[g] + torch_us[g]
        out["gpu"][g] = {"kernels_us": round(kernel_us[g], 2), "torch_ops_us": round(torch_us[g], 2),
                         "total_us": round(total, 2), "roofline_us": round(roof, 2),
                         "pct_of_roofline": round(100 * roof / total, 1) if total else 0.0}
    return out


def hot_summary(loop: dict | None) -> str:
    """``4× 861 instr: 532 fp32, 66 LDS.128, ...`` for the hot loop (per warp and iteration)."""
    if loop is None:
        return "no loop"
    cls = loop["classes"]
    parts = []
    mma = {k: v for k, v in loop["mix"].items() if instr_class(k.split(".")[0]) == "mma"}
    parts += [f"{v} {k}" for k, v in mma.items()]
    for c in ("fp32", "imad", "int", "cmp/sel", "conv", "mufu", "shfl"):
        if cls.get(c):
            parts.append(f"{cls[c]} {c}")
    mem = {k: v for k, v in loop["mix"].items() if instr_class(k.split(".")[0]) in MEMORY_CLASSES + ("tma",)}
    parts += [f"{v} {k}" for k, v in sorted(mem.items(), key=lambda kv: -kv[1])]
    if cls.get("sync"):
        parts.append(f"{cls['sync']} sync")
    trips = loop["trips"]
    t = f"{trips:.0f}" if abs(trips - round(trips)) < 1e-6 else f"{trips:.1f}"
    u = loop.get("unroll", 1)
    body = f"{loop['instr_per_iter']} instr" + (f" (unrolled ×{u}: per {u} iterations)" if u > 1 else "")
    return f"{t}× {body}: " + ", ".join(parts)


# ----------------------------------------------------------------------------------- reporting
MODEL_SUMMARY = (
    "How it works: each launch is captured from the launcher itself on fake CUDA tensors (grid, scalars, "
    "constexprs, warps, stages as at run time), compiled ahead of time with the real launch's specialisation "
    "(at these shapes `tt.divisibility` 16 on N, M, K, Ds and the pointers), its SASS loops found from backward branches and "
    "matched to the Triton IR's `scf.for` loops, whose bounds give the trip counts per program. Time = "
    "max(compute, HBM, L2, latency) + 2 µs launch, where compute = waves × resident programs × the busiest "
    "pipe's cycles per program (issue 4 warp-instr/clk/SM; FP32 FMA; ALU for integer/compare/select; MUFU and "
    "conversions; tensor cores at the input type's dense rate; shared/L1 at 128 B/clk with no bank conflicts "
    "and no broadcast; shuffles) divided by a latency-hiding factor min(1, resident warps per scheduler / 2); "
    "HBM = compulsory bytes (each tensor the kernel touches once) at 90 % of peak; L2 = every byte the "
    "kernel's loads/stores/atomics request (re-reads assumed to hit L2); latency = dependent global loads "
    "per loop iteration × DRAM/L2 latency, overlapped only by resident programs and pipelining stages. "
    "Roofline = max(compulsory bytes / peak bandwidth, the op's useful FLOPs / peak of the precision used). "
    "Blind spots: dependency stalls inside an iteration and barrier waits, shared-memory bank conflicts or "
    "broadcasts, atomic contention, L2 misses on re-reads, masked lanes (counted as active), both sides of "
    "branches counted, ptxas runtime-unrolled loops (detected and corrected, flagged in the notes); the "
    "interpreter-only constexpr paths are never compiled. Uncalibrated: `--calibrate` takes the JSON of "
    "`benchmarks/test_bench_gpu.py` and prints the model's error; the constants are to be fitted to the first "
    "GPU measurement (there is none yet)."
)


BOUND_NAMES = {"issue": "issue", "fma": "FMA pipe", "alu": "ALU pipe", "xu": "MUFU/conversion", "fp64": "FP64",
               "tensor": "tensor cores", "l1": "shared/L1", "shfl": "shuffle", "hbm": "HBM", "l2": "L2",
               "latency": "memory latency", "launch": "launch"}


def _unique_launches(result: dict, shape: str, arch: str) -> list[tuple[dict, list[str], str]]:
    """Rows of one shape with identical launches (kernel, config, grid, scalars) merged: (row, ops, dtype)."""
    groups: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        if r["shape"] != shape:
            continue
        a = r["arch"].get(arch, r)
        key = (r["kernel"], a.get("config", r["config"]), tuple(a.get("grid", r["grid"])),
               json.dumps(a.get("scalars", r["scalars"]), sort_keys=True))
        groups.setdefault(key, []).append(r)
    out = []
    for rows in groups.values():
        labels = sorted({r["dtype"] for r in rows})
        bases = sorted({lab.split("-")[0] for lab in labels})
        dtype = labels[0] if len(labels) == 1 else "/".join(bases) + (" (op dtypes)" if len(bases) > 1 else "")
        ops = []
        for r in rows:
            if r["op"] not in ops:
                ops.append(r["op"])
        out.append((rows[0], ops, dtype))
    return out


def to_markdown(result: dict, gpu: str = PRIMARY_GPU) -> str:
    """README section: one table per shape (distinct kernel launches), then the op totals."""
    g = GPUS[gpu]
    arch = f"sm_{g.arch}"
    others = [k for k in result["gpus"] if k != gpu]
    also = ", ".join(f"{result['gpus'][o]['name']} (sm_{result['gpus'][o]['arch']} SASS)" for o in others)
    lines = [
        "Predicted speed without a GPU: a static cost model (`python scripts/kernel_model.py --readme README.md "
        f"--json benchmarks/results/kernel_model.json`; Triton {result['triton']}, kernels at "
        f"{result.get('kernels_commit', '?')}) on an {g.name} ({g.sms} SMs, {g.clock_ghz} GHz, "
        f"{g.hbm_GBps / 1000:.2f} TB/s HBM) from sm_{g.arch} SASS" + (f"; also {also}" if also else "")
        + ". `tests/test_kernel_model.py` fails when a prediction regresses by more than 15 % against the "
        "committed `benchmarks/results/kernel_model.json`. **Uncalibrated: no GPU measurement yet.**",
        "",
        MODEL_SUMMARY,
        "",
        "Columns: REG = registers/thread, occ. = resident warps / 64, hot loop = trips per program × instructions "
        "per warp and iteration (by class; memory with bits per lane), µs = predicted, % roofline = roofline / "
        "predicted, bottleneck = the largest bound (a pipe, HBM, L2, memory latency, or launch when the launch "
        "overhead dominates). The JSON has every bound, the per-class instruction mix, bytes and trip counts.",
        "",
    ]
    for shape in result["shapes"]:
        lines += [f"**{shape['name']}** (N={shape['N']:,}, M={shape['M']}, K={shape['K']}, Ds={shape['Ds']})", ""]
        head = ("| kernel | dtype | launched by | config | REG | occ. | hot loop (per warp) | µs | roofline µs "
                "| % roofline | bottleneck |" + "".join(f" {o} µs |" for o in others))
        lines += [head, "| --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |" + " ---: |" * len(others)]
        for r, ops, dtype in _unique_launches(result, shape["name"], arch):
            a = r["arch"][arch]
            p = r["gpu"][gpu]
            flag = "" if a["loop_match"] else " (loops unmatched)"
            line = (f"| `{r['kernel']}` | {dtype} | {', '.join(ops)} | `{_short_config(r['config'])}` | {a['reg']} | "
                    f"{a['occupancy']['occupancy']:.0%} | {a['hot_loop_summary']}{flag} | {p['predicted_us']:,.1f} | "
                    f"{p['roofline_us']:,.1f} | {p['pct_of_roofline']:.0f}% | {BOUND_NAMES.get(p['bottleneck'], p['bottleneck'])} |")
            line += "".join(f" {r['gpu'][o]['predicted_us']:,.1f} |" for o in others)
            lines.append(line)
        lines.append("")
    lines += ["Op totals: the op's Triton launches + the PyTorch ops its launcher runs (each at the HBM rate + "
              "launch overhead); roofline from the op's own inputs and outputs and its useful FLOPs:", "",
              "| op | shape | dtype | Triton kernels | Triton µs | PyTorch ops µs (count) | total µs | roofline µs | % roofline |"
              + "".join(f" {o} total µs |" for o in others),
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(others)]
    for o in result["ops"]:
        p = o["gpu"][gpu]
        n_torch = sum(o["torch_ops"].values())
        line = (f"| {o['op']} | {o['shape']} | {o['dtype']} | {' + '.join(f'`{k}`' for k in o['kernels'])} | "
                f"{p['kernels_us']:,.1f} | {p['torch_ops_us']:,.1f} ({n_torch}) | {p['total_us']:,.1f} | "
                f"{p['roofline_us']:,.1f} | {p['pct_of_roofline']:.0f}% |")
        line += "".join(f" {o['gpu'][x]['total_us']:,.1f} |" for x in others)
        lines.append(line)
    if result.get("configs_not_launched"):
        lines += ["", f"{len(result['configs_not_launched'])} configurations in the modules' `CONFIGS` are not "
                  "picked at these shapes (other Ds or dtypes) and not modelled: "
                  + ", ".join(f"`{_short_config(c)}`" for c in result["configs_not_launched"]) + "."]
    differ = sorted({f"{sm}: `{_short_config(r['config'])}` → `{_short_config(a['config'])}`"
                     for r in result["rows"] for sm, a in r["arch"].items() if a.get("config", r["config"]) != r["config"]})
    if differ:
        lines += ["", "The launchers pick by compute capability; the other architectures' columns are their own "
                  "configurations where they differ: " + "; ".join(differ) + "."]
    notes = sorted({n for r in result["rows"] for a in r["arch"].values() for n in a["notes"]})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def _short_config(desc: str) -> str:
    return re.sub(r"BLOCK_", "", desc)


# --------------------------------------------------------------------------- regression / calibration
def compare(new: dict, old: dict, tolerance: float = REGRESSION_TOLERANCE) -> dict:
    """Per row key and GPU: predictions slower than ``old`` by more than ``tolerance``; added/removed keys."""
    def index(res):
        out = {}
        for r in res["rows"]:
            for g, p in r["gpu"].items():
                out[(r["key"], g)] = p["predicted_us"]
        for o in res.get("ops", []):
            for g, p in o["gpu"].items():
                out[("op:" + o["key"], g)] = p["total_us"]
        return out

    a, b = index(new), index(old)
    regressions = [
        {"key": k, "gpu": g, "old_us": b[(k, g)], "new_us": a[(k, g)], "ratio": round(a[(k, g)] / b[(k, g)], 3)}
        for (k, g) in sorted(set(a) & set(b)) if b[(k, g)] > 0 and a[(k, g)] > b[(k, g)] * (1 + tolerance)
    ]
    return {
        "regressions": regressions,
        "added": sorted({k for k, _ in set(a) - set(b)}),
        "removed": sorted({k for k, _ in set(b) - set(a)}),
        "improved": sorted({k for (k, g) in set(a) & set(b) if a[(k, g)] < b[(k, g)] * (1 - tolerance)}),
    }


# benchmarks/test_bench_gpu.py case → the model's ops it runs (Triton backend only).
BENCH_OPS = {
    ("test_assign", "triton-fused"): ("pq_assign_gather",),
    ("test_assign", "triton"): ("pq_assign", "pq_gather"),
    ("test_ema_update", "triton"): ("pq_cluster_stats", "pq_ema_apply_"),
}


def measured_times(bench: dict) -> dict[str, float]:
    """Measured µs keyed like the model: ``{row or op key: µs}``.

    Accepts a plain ``{key: µs}`` mapping (keys as in the model's JSON, e.g. from a profiler) or the
    pytest-benchmark JSON of ``benchmarks/test_bench_gpu.py`` (``benchmarks[].stats.median`` in s,
    ``extra_info`` with ``backend``, ``shape``, ``dtype``, ``triton_precision``), whose cases map to sums of
    op keys (:data:`BENCH_OPS`): the returned key is ``op:a+b@shape/dtype``.
    """
    if "benchmarks" not in bench:
        return {k: float(v) for k, v in bench.items()}
    out = {}
    for b in bench["benchmarks"]:
        info = b.get("extra_info", {})
        test = b.get("name", "").split("[", 1)[0]
        ops = BENCH_OPS.get((test, info.get("backend")))
        if not ops:
            continue
        shape = str(info.get("shape", "")).split("(", 1)[0]
        dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(info.get("dtype"), info.get("dtype"))
        median = info.get("do_bench_median_ms")
        us = float(median) * 1e3 if isinstance(median, int | float) else b["stats"]["median"] * 1e6
        prec = info.get("triton_precision") or "ieee"
        out[f"op:{'+'.join(ops)}@{shape}/{dtype}|{prec}"] = us
    return out


def calibration_report(result: dict, bench: dict, gpu: str = PRIMARY_GPU) -> str:
    """Model error per measured kernel/op: predicted vs measured µs and the ratio; geometric-mean ratio."""
    measured = measured_times(bench)
    pred = {}
    for r in result["rows"]:
        if gpu in r["gpu"]:
            pred[r["key"]] = r["gpu"][gpu]["predicted_us"]
    ops = {(o["op"], o["shape"], o["dtype"]): o["gpu"][gpu]["total_us"] for o in result["ops"] if gpu in o["gpu"]}
    lines = [f"| measured case | measured µs | predicted µs ({gpu}) | predicted / measured |", "| --- | ---: | ---: | ---: |"]
    ratios = []
    for key, us in sorted(measured.items()):
        if key.startswith("op:"):
            names, rest = key[3:].split("@", 1)
            shape, dl = rest.split("/", 1)
            dtype, _, prec = dl.partition("|")
            label = f"{dtype}-{prec}" if dtype == "fp32" and any(o[2].startswith("fp32-") for o in ops if o[0] == names.split("+")[0]) else dtype
            parts = [ops.get((n, shape, label), ops.get((n, shape, dtype))) for n in names.split("+")]
            p = None if any(v is None for v in parts) else sum(parts)
        else:
            p = pred.get(key)
        if p is None:
            lines.append(f"| {key} | {us:,.1f} | – (not modelled) | – |")
            continue
        ratios.append(p / us)
        lines.append(f"| {key} | {us:,.1f} | {p:,.1f} | {p / us:.2f} |")
    if ratios:
        gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        lines.append(f"\n{len(ratios)} cases; geometric mean predicted/measured = {gm:.2f} "
                     "(> 1: the model is pessimistic).")
    else:
        lines.append("\nno measured case matches a modelled one")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def _json_default(o):
    if isinstance(o, set):
        return sorted(o)
    return str(o)


def slim(result: dict) -> dict:
    """The result without the per-instruction data (for the committed JSON)."""
    return json.loads(json.dumps(result, default=_json_default))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", nargs="+", default=["H100", "H200", "A100"], choices=sorted(GPUS),
                        help="GPUs to predict (the first is the README's; default: H100 H200 A100)")
    parser.add_argument("--op", nargs="+", help="only these ops (default: all)")
    parser.add_argument("--shape", nargs="+", help="only these shapes by name (default: all GPU shapes)")
    parser.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    parser.add_argument("--readme", metavar="PATH", help="write the tables between the kernel-model markers of PATH")
    parser.add_argument("--compare", metavar="PATH", help="fail (exit 1) on predictions >15%% slower than PATH's")
    parser.add_argument("--calibrate", metavar="PATH", help="measured GPU times (pytest-benchmark JSON or {key: µs})")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported (module docstring)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    t0 = time.perf_counter()
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    shapes = [s for s in project_shapes() if not args.shape or s.name in args.shape]
    result = slim(run_model(shapes, tuple(args.gpu), args.op, log))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    table = to_markdown(result, args.gpu[0])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, sort_keys=False)
            f.write("\n")
    if args.readme:
        if not TR.write_readme(args.readme, table, START_MARKER, END_MARKER):
            print(f"{args.readme} has no {START_MARKER} / {END_MARKER} markers; table follows", file=sys.stderr)
            sys.stdout.write(table)
    elif not args.calibrate and not args.compare:
        sys.stdout.write(table)
    rc = 0
    if args.compare:
        with open(args.compare, encoding="utf-8") as f:
            diff = compare(result, json.load(f))
        for k in diff["added"]:
            print(f"new (not in {args.compare}): {k}", file=sys.stderr)
        for k in diff["removed"]:
            print(f"removed (only in {args.compare}): {k}", file=sys.stderr)
        for k in diff["improved"]:
            print(f"faster by >{REGRESSION_TOLERANCE:.0%}: {k}", file=sys.stderr)
        for r in diff["regressions"]:
            print(f"REGRESSION {r['key']} on {r['gpu']}: {r['old_us']} → {r['new_us']} µs (×{r['ratio']})", file=sys.stderr)
        rc = 1 if diff["regressions"] else 0
    if args.calibrate:
        with open(args.calibrate, encoding="utf-8") as f:
            sys.stdout.write(calibration_report(result, json.load(f), args.gpu[0]))
    print(f"{len(result['rows'])} launches modelled in {result['wall_s']} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())

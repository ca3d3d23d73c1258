"""The static kernel cost model (``scripts/kernel_model.py``): parsers, arithmetic, launch capture, regressions.

* Unit tests of the SASS parser and loop finder, the instruction classes/costs, the TTIR parser (loops,
  trip counts, pointer roots, dependent-load chains) and the time formula, on small embedded samples.
* ``test_capture_matches_a_real_launch``: the model captures each launch from the launcher itself on fake
  CUDA tensors (no memory, so N = 10^6 is free); this checks, at small shapes, that the grid, the runtime
  scalars, the tensor arguments and warps/stages equal those of a real launch of the same launcher
  (interpreted on CPU without a GPU, intercepted before it runs).
* ``test_predictions_do_not_regress`` (slow): runs the model in its own process (without
  ``TRITON_INTERPRET``) and fails when a prediction is more than 15 % slower than the committed
  ``benchmarks/results/kernel_model.json`` (per op / kernel / shape / dtype key and GPU); new and removed
  keys are printed. After an intended change, regenerate the file and the README table with
  ``python scripts/kernel_model.py --readme README.md --json benchmarks/results/kernel_model.json``.
  About 30 s with Triton's cache and the model's disassembly cache warm, 1–2 minutes cold on two cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kernel_model.py"
COMMITTED = ROOT / "benchmarks" / "results" / "kernel_model.json"
sys.path.insert(0, str(SCRIPT.parent))
import kernel_model as KM  # noqa: E402

# cuobjdump --dump-sass layout: an outer loop 0x40-0xb0 around an inner loop 0x50-0x80, a @!PT pad
# (never executed), a vector atomic after the loops and ptxas's end-of-code self-branch.
SASS = """
	code for sm_90a
		Function : k
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
                                                                                   /* 0x000e620000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                              /* 0x0000000000007919 */
                                                                                   /* 0x000eae0000002100 */
        /*0020*/              @!PT LDS RZ, [RZ] ;                                  /* 0x00000000fffff984 */
                                                                                   /* 0x000fe20000000800 */
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;                /* 0x0000000402047981 */
                                                                                   /* 0x000ea8000c1e1d00 */
        /*0040*/                   FFMA R8, R4, R5, R8 ;                           /* 0x0000000504087223 */
                                                                                   /* 0x004fe20000000008 */
        /*0050*/                   LDS.128 R12, [R3] ;                             /* 0x00000000030c7984 */
                                                                                   /* 0x000e240000000c00 */
        /*0060*/                   HGMMA.64x16x16.F32.BF16 R32, R48, gdesc[UR52].tnspB, R32 ;  /* 0x00 */
                                                                                   /* 0x000fe20008000820 */
        /*0070*/                   ISETP.GE.AND P0, PT, R9, R10, PT ;              /* 0x0000000a0900720c */
                                                                                   /* 0x000fda0003f06270 */
        /*0080*/               @P0 BRA 0x50 ;                                      /* 0xfffffffc00f00947 */
                                                                                   /* 0x000fea000383ffff */
        /*0090*/                   IMAD R9, R9, 0x2, RZ ;                          /* 0x0000000209097824 */
                                                                                   /* 0x000fca00078e02ff */
        /*00a0*/                   ISETP.NE.AND P1, PT, R9, RZ, PT ;               /* 0x000000ff0900720c */
                                                                                   /* 0x000fda0003f25270 */
        /*00b0*/               @P1 BRA 0x40 ;                                      /* 0xfffffff800e01947 */
                                                                                   /* 0x000fea000383ffff */
        /*00c0*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR44][R4.64], R12 ;  /* 0x00 */
                                                                                   /* 0x0029e4000c10f7ac */
        /*00d0*/                   EXIT ;                                          /* 0x000000000000794d */
                                                                                   /* 0x000fea0003800000 */
        /*00e0*/                   BRA 0xe0;                                       /* 0xfffffffc00fc7947 */
                                                                                   /* 0x000fc0000383ffff */
"""

# TTIR layout: a loop whose bound depends on the program id, carrying a pointer, with a dependent load
# (codes → mask → values), a reduce region, a nested loop, then an scf.if store and an atomic.
TTIR = """
module {
  tt.func public @k(%x_ptr: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc("x_ptr"(#loc)), %codes_ptr: !tt.ptr<i32> loc("codes_ptr"(#loc)), %out_ptr: !tt.ptr<f32> loc("out_ptr"(#loc)), %N: i32 {tt.divisibility = 16 : i32} loc("N"(#loc)), %K: i32 loc("K"(#loc))) attributes {noinline = false} {
    %c0_i32 = arith.constant 0 : i32 loc(#loc1)
    %c64_i32 = arith.constant 64 : i32 loc(#loc1)
    %c128_i32 = arith.constant 128 : i32 loc(#loc1)
    %cst = arith.constant dense<0.000000e+00> : tensor<64xf32> loc(#loc1)
    %pid = tt.get_program_id x : i32 loc(#loc2)
    %ub = arith.muli %pid, %c128_i32 : i32 loc(#loc2)
    %p0 = tt.splat %x_ptr : !tt.ptr<f32> -> tensor<64x!tt.ptr<f32>> loc(#loc2)
    %acc:2 = scf.for %i = %c0_i32 to %ub step %c64_i32 iter_args(%a = %cst, %ptr = %p0) -> (tensor<64xf32>, tensor<64x!tt.ptr<f32>>)  : i32 {
      %cp = tt.splat %codes_ptr : !tt.ptr<i32> -> tensor<64x!tt.ptr<i32>> loc(#loc3)
      %code = tt.load %cp : tensor<64x!tt.ptr<i32>> loc(callsite(#loc3 at #loc4))
      %m = arith.cmpi sge, %code, %code : tensor<64xi32> loc(#loc3)
      %v = tt.load %ptr, %m : tensor<64x!tt.ptr<f32>> loc(#loc3)
      %s = "tt.reduce"(%v) <{axis = 0 : i32}> ({
      ^bb0(%l: f32 loc(#loc5), %r: f32 loc(#loc5)):
        %t = arith.addf %l, %r : f32 loc(#loc5)
        tt.reduce.return %t : f32 loc(#loc5)
      }) : (tensor<64xf32>) -> f32 loc(#loc5)
      scf.for %j = %c0_i32 to %K step %c64_i32  : i32 {
        %w = tt.load %ptr : tensor<64x!tt.ptr<f32>> loc(#loc6)
      } loc(#loc6)
      %a2 = arith.addf %a, %v : tensor<64xf32> loc(#loc3)
      %next = tt.addptr %ptr, %c64_i32 : tensor<64x!tt.ptr<f32>>, i32 loc(#loc3)
      scf.yield %a2, %next : tensor<64xf32>, tensor<64x!tt.ptr<f32>> loc(#loc3)
    } loc(#loc7)
    %o = tt.splat %out_ptr : !tt.ptr<f32> -> tensor<64x!tt.ptr<f32>> loc(#loc8)
    %ok = arith.cmpi sgt, %N, %c0_i32 : i32 loc(#loc8)
    scf.if %ok {
      tt.store %o, %acc#0 : tensor<64x!tt.ptr<f32>> loc(#loc8)
    } loc(#loc8)
    %r = tt.atomic_rmw fadd, relaxed, gpu, %o, %acc#0 : (tensor<64x!tt.ptr<f32>>, tensor<64xf32>) -> tensor<64xf32> loc(#loc9)
    tt.return loc(#loc10)
  } loc(#loc)
} loc(#loc)
"""


# ------------------------------------------------------------------------------------------- SASS
def test_parse_sass_drops_never_executed_padding():
    ins = KM.parse_sass(SASS, "k")
    assert [i.addr for i in ins][:4] == [0x0, 0x10, 0x30, 0x40]  # @!PT LDS at 0x20 dropped
    assert len(ins) == 14
    bra = next(i for i in ins if i.addr == 0x80)
    assert (bra.pred, bra.base, KM.branch_target(bra)) == ("@P0", "BRA", 0x50)
    assert KM.parse_sass(SASS)[0].opcode == "LDC"  # the first function when none is named


def test_find_loops_nesting_and_self_branch():
    loops = KM.find_loops(KM.parse_sass(SASS))
    assert [(hex(lp.start), hex(lp.end), lp.depth, lp.parent) for lp in loops] == [
        ("0x40", "0xb0", 0, None),
        ("0x50", "0x80", 1, 0),
    ]  # BRA 0xe0 at 0xe0 (the trap after EXIT) is not a loop
    assert KM.innermost_loop(loops, 0x60) == 1
    assert KM.innermost_loop(loops, 0x90) == 0
    assert KM.innermost_loop(loops, 0xC0) is None


def test_find_loops_ignores_tma_spin_waits_and_re_entries():
    # the shape of a TMA-pipelined loop (Triton 3.8, sm_90): the mbarrier wait retries out of line after
    # EXIT and branches back into the loop body
    sass = """
        /*0ad0*/                   ELECT P0, URZ, PT ;
        /*0c80*/              @UP2 UTMALDG.2D [UR16], [UR6] ;
        /*0c90*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x4000], RZ ;
        /*0ca0*/               @!P0 BRA 0x1110 ;
        /*0cb0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0cc0*/                   FADD R4, R4, R5 ;
        /*0f90*/               @!P0 BRA 0xad0 ;
        /*1100*/                   EXIT ;
        /*1110*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x4000], RZ ;
        /*1120*/               @!P0 BRA 0x1110 ;
        /*1130*/                   BRA 0xcb0 ;
        /*1140*/                   BRA 0x1140;
    """
    loops = KM.find_loops(KM.parse_sass(sass))
    assert [(hex(lp.start), hex(lp.end)) for lp in loops] == [("0xad0", "0xf90")]


def test_instruction_classes_widths_and_mma_shapes():
    cls = KM.instr_class
    assert cls("FFMA") == "fp32" and cls("IMAD.MOV.U32") == "imad" and cls("ISETP.GE.AND") == "cmp/sel"
    assert cls("HGMMA.64x16x16.F32.BF16") == "mma" and cls("ULDC.64") == "uniform" and cls("BAR.SYNC.DEFER_BLOCKING") == "sync"
    assert cls("MUFU.RCP") == "mufu" and cls("F2FP.BF16.F32.PACK_AB") == "conv" and cls("REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU") == "atom"
    assert cls("LDGSTS.E.BYPASS.128") == "ldgsts" and cls("UTMALDG.2D") == "tma" and cls("S2R") == "other"
    assert KM.access_bytes("LDG.E.128") == 16 and KM.access_bytes("LDS.64") == 8 and KM.access_bytes("STS.U16") == 2
    assert KM.access_bytes("REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU") == 16 and KM.access_bytes("LDG.E") == 4
    assert KM.warp_bytes(KM.Instr(0, "", "LDSM.16.M88.4", "")) == 512
    assert KM.warp_bytes(KM.Instr(0, "", "LDSM.16.M88", "")) == 128
    assert KM.mma_shape("HGMMA.64x16x16.F32.BF16") == (64, 16, 16, "bf16", True)
    assert KM.mma_shape("HMMA.1688.F32.TF32") == (16, 8, 8, "tf32", False)
    # a warpgroup MMA is executed by its four warps: each contributes a quarter of the tile
    assert KM.mma_flops_per_warp("HGMMA.64x16x16.F32.BF16") == (2 * 64 * 16 * 16 / 4, "bf16")
    assert KM.mma_flops_per_warp("HMMA.16816.F32.BF16") == (2 * 16 * 8 * 16, "bf16")


def test_instruction_costs_per_pipe():
    h, a = KM.GPUS["H100"], KM.GPUS["A100"]
    cost = lambda op, g=h: KM.instr_cost(KM.Instr(0, "", op, ""), g)
    assert cost("FFMA") == {"issue": 0.25, "fma": 0.25}
    assert cost("FFMA", a)["fma"] == 0.5  # 64 FP32 lanes per SM on A100
    assert cost("LOP3.LUT")["alu"] == 0.5 and cost("MUFU.EX2")["xu"] == 2.0 and cost("SHFL.BFLY")["shfl"] == 1.0
    assert cost("HGMMA.64x64x16.F32.BF16")["tensor"] == 2 * 64 * 64 * 16 / 4 / 4096
    assert cost("HMMA.16816.F32.BF16")["tensor"] == pytest.approx(4096 / (4096 * h.mma_sync_eff))
    assert cost("LDS.128")["l1"] == 4.0 and cost("STS.U16")["l1"] == 1.0  # 512 B and 64 B per warp
    assert cost("BRA") == {"issue": 0.25}


def test_unroll_factor():
    assert KM.unroll_factor(32768, 8192) == 4  # ptxas ×4 runtime unrolling
    assert KM.unroll_factor(11264, 8448) == 1  # redundant per-warp loads of a small tensor: not unrolling
    assert KM.unroll_factor(0, 8192) == 1 and KM.unroll_factor(8192, 0) == 1


def test_subroutines_are_call_targets_up_to_ret():
    sass = """
        /*0000*/                   CALL.REL.NOINC 0x40 ;
        /*0010*/                   EXIT ;
        /*0020*/                   BRA 0x20;
        /*0040*/                   I2F.U64.RP R11, UR4 ;
        /*0050*/                   RET.REL.NODEC R10 0x0 ;
    """
    assert KM.subroutines(KM.parse_sass(sass)) == [(0x40, 0x50)]


# ------------------------------------------------------------------------------------------- TTIR
def test_parse_ttir_loops_and_memory_ops():
    ir = KM.parse_ttir(TTIR)
    assert ir.args == ["x_ptr", "codes_ptr", "out_ptr", "N", "K"]
    assert [(lp.iv, lp.ub, lp.parent) for lp in ir.loops] == [("i", "ub", -1), ("j", "K", 0)]
    assert ir.loops[0].iter_args == {"a": "cst", "ptr": "p0"} and ir.loops[0].results == ["acc#0", "acc#1"]
    kinds = [(mo.kind, mo.region, mo.bytes, KM.pointer_root(ir, mo.ptr)) for mo in ir.memops]
    assert kinds == [
        ("load", 0, 256, "codes_ptr"),
        ("load", 0, 256, "x_ptr"),  # through the loop-carried pointer
        ("load", 1, 256, "x_ptr"),
        ("store", -1, 256, "out_ptr"),  # inside scf.if: still the top level
        ("atomic", -1, 256, "out_ptr"),
    ]


def test_trip_counts_per_program_and_expressions():
    ir = KM.parse_ttir(TTIR)
    env = {"pid_x": np.arange(3), "num_x": 3, "N": 16, "K": 200}
    trips = KM.loop_trips(ir, env)
    assert trips[0].tolist() == [0, 2, 4]  # ceil(128·pid / 64)
    assert int(trips[1]) == 4  # ceil(200 / 64)
    assert KM._trunc_div(np.int64(-7), np.int64(2)) == -3  # arith.divsi truncates like C
    with pytest.raises(KeyError):
        KM.eval_scalar(ir, "a2", env)  # a float: not evaluable


# Two sibling loops that reuse SSA names (MLIR numbers values per region), a data-dependent loop bound and
# a store behind a run-time flag.
TTIR_SCOPES = """
module {
  tt.func public @k(%a_ptr: !tt.ptr<f32> loc(#loc), %b_ptr: !tt.ptr<f32> loc(#loc), %n_ptr: !tt.ptr<i32> loc(#loc), %fused: i32 loc(#loc)) attributes {noinline = false} {
    %c0_i32 = arith.constant 0 : i32 loc(#loc1)
    %c1_i32 = arith.constant 1 : i32 loc(#loc1)
    %c4_i32 = arith.constant 4 : i32 loc(#loc1)
    scf.for %i = %c0_i32 to %c4_i32 step %c1_i32  : i32 {
      %20 = tt.splat %a_ptr : !tt.ptr<f32> -> tensor<64x!tt.ptr<f32>> loc(#loc2)
      %v = tt.load %20 : tensor<64x!tt.ptr<f32>> loc(#loc2)
      %f = arith.cmpi ne, %fused, %c0_i32 : i32 loc(#loc2)
      scf.if %f {
        tt.store %20, %v : tensor<64x!tt.ptr<f32>> loc(#loc2)
      } else {
        tt.store %20, %v : tensor<64x!tt.ptr<f32>> loc(#loc2)
      } loc(#loc2)
    } loc(#loc3)
    %n = tt.load %n_ptr : !tt.ptr<i32> loc(#loc4)
    scf.for %j = %c0_i32 to %n step %c1_i32  : i32 {
      %20 = tt.splat %b_ptr : !tt.ptr<f32> -> tensor<32x!tt.ptr<f32>> loc(#loc5)
      %w = tt.load %20 : tensor<32x!tt.ptr<f32>> loc(#loc5)
    } loc(#loc6)
    tt.return loc(#loc7)
  } loc(#loc)
} loc(#loc)
"""


def test_ttir_scopes_guards_and_data_dependent_trips():
    ir = KM.parse_ttir(TTIR_SCOPES)
    roots = [(mo.kind, mo.region, mo.bytes, KM.pointer_root(ir, mo.ptr)) for mo in ir.memops]
    assert roots == [
        ("load", 0, 256, "a_ptr"), ("store", 0, 256, "a_ptr"), ("store", 0, 256, "a_ptr"),
        ("load", -1, 4, "n_ptr"), ("load", 1, 128, "b_ptr"),  # %20 of the second loop is not the first's
    ]
    then_, else_ = ir.memops[1].guards, ir.memops[2].guards
    assert len(then_) == 1 and then_[0][1] is True and else_ == ((then_[0][0], False),)
    assert KM.eval_scalar(ir, then_[0][0], {"fused": 0}) == 0
    with pytest.raises(KeyError):
        KM.loop_trips(ir, {"pid_x": 0, "num_x": 1, "fused": 0})
    unknown: list = []
    trips = KM.loop_trips(ir, {"pid_x": 0, "num_x": 1, "fused": 0}, unknown)
    assert [int(t) for t in trips] == [4, 1] and len(unknown) == 1 and "(tt.load)" in unknown[0]


def test_dependent_load_chain():
    ir = KM.parse_ttir(TTIR)
    assert KM.load_chain(ir, 0) == 2  # codes → mask → values
    assert KM.load_chain(ir, 1) == 1 and KM.load_chain(ir, -1) == 0


def test_type_bytes():
    assert KM.type_bytes("tensor<64x32x!tt.ptr<f32>>") == 64 * 32 * 4
    assert KM.type_bytes("tensor<64x!tt.ptr<bf16>>, tensor<64xbf16>") == 128
    assert KM.type_bytes("!tt.ptr<f32>") == 4
    assert KM.type_bytes("!tt.tensordesc<tensor<64x32xf16>> -> tensor<64x32xf16>") == 64 * 32 * 2


# ------------------------------------------------------------------------------------- arithmetic
def test_latency_hiding_and_waves():
    g = KM.GPUS["H100"]
    assert KM.eta(1.0, g) == 0.5 and KM.eta(2.0, g) == 1.0 and KM.eta(8.0, g) == 1.0
    # 264 programs, 2 resident per SM on 132 SMs: one full wave of two programs each
    assert KM.wave_cycles(264, 2, 132, 100.0, 8, g) == 200.0
    # 4-warp programs, one more than a wave: the full wave has 2 warps/scheduler (η = 1), the extra
    # program runs alone on its SM with 1 warp/scheduler (η = 0.5)
    assert KM.wave_cycles(265, 2, 132, 100.0, 4, g) == 2 * 100.0 + 100.0 / 0.5


def test_predict_takes_the_bottleneck_and_the_roofline():
    g = KM.GPUS["H100"]
    hgmma = KM.Instr(0, "", "HGMMA.64x64x16.F32.BF16", "")
    a = {
        "instrs": [(hgmma, 1000.0)],  # executions per warp and program
        "bytes": {"min": 10**6, "requested": 2 * 10**6},
        "latency_regions": [{"executions": 1.0, "load_chain": 1, "hbm_fraction": 1.0, "overlap": 1}],
    }
    comp = {"num_warps": 4, "occupancy": {"blocks_per_sm": 4}}
    P = 2 * 4 * g.sms  # two full waves of 4 programs per SM, 4 warp/scheduler: η = 1
    p = KM.predict(a, comp, P, g, useful_flops=1e12, precision="bf16")
    tensor_cycles = 1000 * (2 * 64 * 64 * 16 / 4 / 4096) * 4  # per program: flops per warp / rate × warps
    cyc_us = 1e6 / (g.clock_ghz * 1e9)
    tensor_us = 2 * 4 * tensor_cycles * cyc_us  # waves × programs per SM × cycles
    # (bounds are rounded to 0.01 µs)
    assert p["bounds_us"]["tensor"] == pytest.approx(tensor_us, abs=0.01)
    assert p["bounds_us"]["issue"] == pytest.approx(2 * 4 * 1000 * 0.25 * 4 * cyc_us, abs=0.01)
    assert p["bounds_us"]["hbm"] == pytest.approx(1e6 / (0.9 * 3350e9) * 1e6, abs=0.01)
    assert p["bounds_us"]["l2"] == pytest.approx(2e6 / 5500e9 * 1e6, abs=0.01)
    assert p["bounds_us"]["latency"] == pytest.approx(2 * 0.6, abs=0.01)  # 2 waves × one DRAM round trip
    assert p["bottleneck"] == "tensor" and p["waves"] == 2
    assert p["predicted_us"] == pytest.approx(tensor_us + g.launch_us, abs=0.01)
    roof = max(1e6 / 3350e9, 1e12 / (4096 * g.sms * g.clock_ghz * 1e9)) * 1e6
    assert p["roofline_us"] == pytest.approx(roof, abs=0.01)
    assert p["pct_of_roofline"] == pytest.approx(100 * roof / p["predicted_us"], abs=0.1)
    # a kernel whose every bound is below the launch overhead is "launch"-bound
    tiny = KM.predict({**a, "instrs": [(hgmma, 1.0)]}, comp, 1, g, useful_flops=0.0, precision="bf16")
    assert tiny["bottleneck"] == "launch"


def test_roofline_rate_of_each_precision():
    g = KM.GPUS["H100"]
    assert g.rate("ieee") == pytest.approx(256 * 132 * 1.83e9)  # FP32 FMA: no tensor cores for IEEE fp32
    assert g.rate("tf32") == pytest.approx(2 * g.rate("tf32x3") * 3 / 2)
    assert g.rate("bf16") == pytest.approx(989e12, rel=0.01)
    assert KM._precision("fp32-tf32x3") == "tf32x3" and KM._precision("fp32") == "fp32" and KM._precision("bf16") == "bf16"


def _result(us: dict[str, float], ops: dict[str, float] | None = None) -> dict:
    rows = [{"key": k, "gpu": {"H100": {"predicted_us": v}}} for k, v in us.items()]
    op_rows = [{"key": k, "op": k.split("@")[0], "shape": k.split("@")[1].split("/")[0], "dtype": k.split("/")[1],
                "gpu": {"H100": {"total_us": v}}} for k, v in (ops or {}).items()]
    return {"rows": rows, "ops": op_rows}


def test_compare_flags_regressions_and_reports_added_and_removed():
    old = _result({"a/k@s/fp32": 100.0, "b/k@s/fp32": 100.0, "gone/k@s/fp32": 5.0})
    new = _result({"a/k@s/fp32": 114.0, "b/k@s/fp32": 120.0, "new/k@s/fp32": 1.0})
    d = KM.compare(new, old)
    assert [(r["key"], r["ratio"]) for r in d["regressions"]] == [("b/k@s/fp32", 1.2)]
    assert d["added"] == ["new/k@s/fp32"] and d["removed"] == ["gone/k@s/fp32"]
    assert KM.compare(old, new)["improved"] == ["b/k@s/fp32"]


def test_calibration_report_from_pytest_benchmark_json():
    bench = {"benchmarks": [
        {"name": "test_assign[triton-fused-equss_train(N=25088,M=32,K=256,Ds=32)-float32]",
         "stats": {"median": 1e-3},
         "extra_info": {"backend": "triton-fused", "shape": "equss_train(N=25088,M=32,K=256,Ds=32)",
                        "dtype": "float32", "triton_precision": "ieee"}},
        {"name": "test_assign[triton-equss_train(N=25088,M=32,K=256,Ds=32)-float32]",
         "stats": {"median": 1e-3},
         "extra_info": {"backend": "triton", "shape": "equss_train(N=25088,M=32,K=256,Ds=32)", "dtype": "float32",
                        "triton_precision": "ieee", "do_bench_median_ms": 0.5}},
        {"name": "test_assign[torch-equss_train-float32]", "stats": {"median": 1.0}, "extra_info": {"backend": "torch"}},
    ]}
    res = _result({}, {"pq_assign_gather@equss_train/fp32-ieee": 800.0, "pq_assign@equss_train/fp32-ieee": 300.0,
                       "pq_gather@equss_train/fp32": 100.0})
    measured = KM.measured_times(bench)
    assert measured == {"op:pq_assign_gather@equss_train/fp32|ieee": 1000.0,
                        "op:pq_assign+pq_gather@equss_train/fp32|ieee": 500.0}  # do_bench preferred
    report = KM.calibration_report(res, bench)
    assert "| 1,000.0 | 800.0 | 0.80 |" in report and "| 500.0 | 400.0 | 0.80 |" in report
    assert "geometric mean predicted/measured = 0.80" in report
    assert "not modelled" in KM.calibration_report(res, {"op:pq_assign@large/fp32|ieee": 1.0})


# --------------------------------------------------------------------------------- launch capture
SMALL_SHAPES = [KM.Shape("small", 300, 4, 64, 32), KM.Shape("ds16", 257, 3, 100, 16), KM.Shape("ds48", 130, 2, 48, 48)]


def _signature(launch) -> dict:
    import torch

    tensors = {k: (v.dtype, tuple(v.shape)) for k, v in launch.bound.items() if isinstance(v, torch.Tensor)}
    opts = {k: launch.kwargs.get(k) for k in ("num_warps", "num_stages")}
    return {"kernel": launch.name, "grid": launch.grid, "scalars": KM.runtime_scalars(launch), "tensors": tensors, **opts}


@pytest.mark.triton
@pytest.mark.parametrize("op", [s.name for s in KM._ops()])
def test_capture_matches_a_real_launch(op, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    import equss.kernels as K
    from equss.kernels import _config as C

    spec = {s.name: s for s in KM._ops()}[op]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = dataclasses.replace(KM.GPUS["H100"], sms=C.sm_count(device))
    real_tensor = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, device=device)
    for shape in SMALL_SHAPES:
        for label in spec.dtypes:
            dtype, prec = KM.split_dtype(label)
            monkeypatch.setenv(C.PRECISION_ENV, prec if label.startswith("fp32-") else "ieee")
            real: list = []
            with KM.intercept_launches(real):
                getattr(K, spec.launcher)(*spec.make(shape, dtype, real_tensor))
            with KM.capture(gpu) as (fake, _):
                getattr(K, spec.launcher)(*spec.make(shape, dtype, KM.fake_tensor))
            assert real, f"{op} {shape} {label}: no launch intercepted"
            assert [_signature(f) for f in fake] == [_signature(r) for r in real], f"{op} {shape} {label}"
            if device.type == "cuda":  # interpreted launches take the interpreter-only constexpr paths
                for f, r in zip(fake, real):
                    consts = KM.constexpr_names(f.fn)
                    assert {k: f.bound[k] for k in consts} == {k: r.bound[k] for k in consts}


# ------------------------------------------------------------------------------------- regression
@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """One run of the model in its own process (no TRITON_INTERPRET), compared with the committed JSON."""
    pytest.importorskip("triton")
    assert COMMITTED.exists(), "run: python scripts/kernel_model.py --json benchmarks/results/kernel_model.json"
    out = tmp_path_factory.mktemp("kernel_model") / "model.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quiet", "--json", str(out), "--compare", str(COMMITTED)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200,
    )
    assert out.exists(), f"the model failed before writing its JSON:\n{proc.stderr[-4000:]}"
    return proc, json.loads(out.read_text())


@pytest.mark.slow  # ~30 s warm, 1-2 minutes cold (module docstring)
@pytest.mark.triton
def test_predictions_do_not_regress(model_run):
    proc, result = model_run
    print(proc.stderr)  # new / removed / faster keys are reported, not failures
    assert result["rows"], "no launch modelled"
    regressions = [line for line in proc.stderr.splitlines() if line.startswith("REGRESSION")]
    assert proc.returncode == 0 and not regressions, "\n".join(regressions) or proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.triton
def test_model_reads_every_kernel(model_run):
    """The model's own sanity checks: SASS loops matched to the TTIR's, trip counts evaluated, and the
    counted SASS global bytes within [0.67, 1.5]× the TTIR's. A failure means a kernel's control flow is
    beyond what the model reads (see the row's notes): extend scripts/kernel_model.py, do not trust its row."""
    _, result = model_run
    for r in result["rows"]:
        for arch, a in r["arch"].items():
            assert a["loop_match"], f"{r['key']} {arch}: SASS and TTIR loops differ: {a['notes']}"
            # a bound the kernel loads from memory ("data-dependent trip count", e.g. the assign kernel's
            # flagged-row recheck) gets 1 trip and a note; any other unevaluable bound fails here
            assert not any("trip counts unknown" in n for n in a["notes"]), f"{r['key']} {arch}: {a['notes']}"
            assert 0.67 <= a["sass_vs_ttir_bytes"] <= 1.5, f"{r['key']} {arch}: control flow misread: {a['notes']}"
        for g, p in r["gpu"].items():
            assert p["predicted_us"] > 0 and p["roofline_us"] >= 0, (r["key"], g)


def test_layout_replication_from_ttgir():
    """Issued bytes per TTGIR layout: the threads of a slice's removed dimension (and a layout's coverage
    beyond the tensor) load the same element; scalars are issued by every thread; unknown layouts count 1."""
    ttgir = """#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [4, 1], order = [1, 0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
"""
    al = KM.parse_layouts(ttgir)
    assert KM.layout_replication("#ttg.slice<{dim = 1, parent = #blocked}>", [64], al) == 32  # every lane of a row
    assert KM.layout_replication("#blocked1", [64], al) == 2  # 128 threads over 64 elements
    assert KM.layout_replication("#blocked", [64, 32], al) == 1
    assert KM.layout_replication("#ttg.slice<{dim = 0, parent = #mma}>", [64], al) == 32  # 8 lanes × 4 warps per column
    assert KM.layout_replication("#shared", [64], al) == 1
    mo = KM.MemOp("load", "p", 4, -1, "%1 = tt.load %0 : !tt.ptr<i32>")
    assert KM.memop_replication(mo, al, 4) == 128
    mo = KM.MemOp("load", "p", 256, -1, "%1 = tt.load %0 : tensor<64x!tt.ptr<i32>, #ttg.slice<{dim = 1, parent = #blocked}>>")
    assert KM.memop_replication(mo, al, 4) == 32

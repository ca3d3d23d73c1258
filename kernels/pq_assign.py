"""Triton PQ assignment: nearest codeword per row and subspace, the N×M×K distances never leave registers.

Two kernels, one contract (:mod:`equss.ops.reference`: int32 codes, ties → lowest index, invalid codewords
never win, invalid rows → code 0 and ``min_dist`` NaN):

``_assign_tc_kernel`` (float32 with the default precision ``"exact"``, and bfloat16; K ≤ 1024, Ds ≤ 32)
    Persistent: program ``(p, m)`` owns subspace ``m`` and a contiguous run of ``BLOCK_N``-row tiles. Its
    prologue loads the subspace's codebook ONCE, in ``NG`` groups of ``KG = 64`` codewords, computes
    ``‖c‖²``, the codeword-validity mask and ``max ‖c‖`` once, and hands the groups to ``tl.dot`` as
    loop-invariant operands, which the compiler keeps resident in shared memory for the whole program
    (the ``local_alloc`` is hoisted out of the row loop), so x is read once from HBM and the codebook
    once per program. (The ``stream`` classes — K ≤ 1024 on sm_90, every fp32 class on sm_80 — instead
    write the codebook's pieces to a per-program scratch in the prologue and load each group per row
    tile, software-pipelined, from L2: no registers or shared memory per group, at the cost of L2
    traffic.) Per row tile each group costs one tensor-core product (bfloat16 inputs) or three
    (float32: ``x·c ≈ xh·ch + xh·cl + xl·ch`` with x and c split into two bfloat16 pieces each), plus,
    for l2, one small product that adds ``‖c‖²`` (its three bfloat16 pieces times a column of ones; the
    streamed classes add it in fp32), so the accumulator holds the distances. Then, in the accumulator's own
    register layout (``[BLOCK_N, A, 8]``: ``A = KG/8`` columns that one thread owns per row, 8 across a
    quad), a two-partition top-2 (:func:`_two_partition_top2`): P, by (a, thread), keeps the element-wise
    minimum over the groups (and over the thread's two columns); Q, by (group, column), the minimum over
    ``a`` (thread-local) with the group index packed into its low bits and a running best and second best
    over the groups. A P part and a Q part meet in one distance, so the winner is where P's and Q's best
    parts meet and the second best is the smaller of their second bests: 2.4 ALU operations per distance
    in the sm_90 SASS, where a running top-2 of packed keys took four (three min/max and the pack), and
    no shuffles, shared memory or barriers.
    ONE best/second-best/index reduction per row over the quad's four threads ends the tile.

    The keys are approximate on purpose: a row whose gap ``second − best`` exceeds a rigorous bound on
    every key's error (:func:`_gap_bound`, derivation there) has the exact argmin as its winner, so
    its code is final; every other row (near-ties, ties, overflow, a padded or invalid winner) is
    *flagged*, appended to a per-program list, and recomputed at the end of the program in fp32 FMA
    arithmetic over all K codewords with exact lowest-index tie-breaking (:func:`_fma_rows`). ``min_dist``
    of a final row is recomputed in fp32 from the chosen codeword. Codes therefore equal the fp32
    reference's except where two codewords are within fp32 rounding of each other, like ``"ieee"``.

``_assign_generic_kernel`` (the other precisions ``ieee | tf32x3 | tf32``, float16, K > 1024 or Ds > 32)
    Persistent the same way; streams the codebook in ``BLOCK_K`` chunks (‖c‖² and validity computed once
    per program into a scratch row), keeps a per-thread element-wise running (value, chunk) in the
    product's own layout across chunks with strict ``<`` (the earlier chunk keeps a tie) and ends each
    row tile with one lexicographic (value, lowest index) reduction. The flagged-row recheck of the
    tensor-core kernel is this same code (:func:`_fma_rows`).

Both kernels compute the training forward's epilogue when ``fused`` is set (``pq_assign_gather_triton``):
``quantized = codebooks_out[m, code]`` (bit-exact copy), ``sq_err = ‖x − quantized‖²`` and the step's
statistics, per-codeword counts and (``stats == 2``) sums of ``stats_x``, as fp32 atomics of each row
into ``[M, K]`` / ``[M, K, Ds]``; invalid rows (of x or of stats_x) enter neither.

NaN safety. The tensor-core kernel's reductions use NaN-*propagating* min/max (``tl.PropagateNan.ALL``):
a NaN key (an overflowing product) can only make the row's best or gap NaN, and the flag test is
written ``not (gap > bound)``, which a NaN fails, so such a row is recomputed; it can never be taken
as final. The FMA recheck and the generic kernel compare with strict ``d < best`` from ``best = +inf``:
a NaN distance compares false and never enters the state, and invalid codewords carry a ``+inf`` bias.

Shapes: ``x [N, M, Ds]``, ``codebooks [M, K, Ds]``, ``codes / min_dist [N, M]``. Offsets are int64.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from equss.kernels import _config as C
from equss.kernels.pq_segment_sum import segment_sum_triton

__all__ = ["AssignConfig", "CONFIGS", "pick_config", "pq_assign_triton", "pq_assign_gather_triton", "compile_spec"]

_INF = tl.constexpr(float("inf"))
# Keys at or above _BIG_KEY (2^126) are never final (flagged); invalid/padded l2 codewords get the finite
# bias _INVALID_BIAS = 2^127 so that their packed key stays a finite number above that limit.
_BIG_KEY = tl.constexpr(2.0**126)
_INVALID_BIAS = tl.constexpr(2.0**127)


# ------------------------------------------------------------------------------------------ helpers
@triton.jit
def _rn_bf16(v):
    """Interpreter only: ``v`` rounded to the nearest bfloat16 (ties to even), as an fp32 value.

    The interpreter's own fp32 → bf16 cast truncates, the GPU's ``cvt.rn`` rounds to nearest; this
    integer version equals the latter for every finite value, so both backends split identically."""
    b = v.to(tl.uint32, bitcast=True)
    r = b + 0x7FFF + ((b >> 16) & 1)
    return (r & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _split(v, EXACT_DOT: tl.constexpr):
    """``v ≈ hi + lo``: two bfloat16 pieces (round to nearest each), as bf16 (GPU) or fp32 (interpreter)."""
    if EXACT_DOT:
        hi = _rn_bf16(v)
        lo = _rn_bf16(v - hi)
    else:
        hi16 = v.to(tl.bfloat16)
        lo = (v - hi16.to(tl.float32)).to(tl.bfloat16)
        # Opaque copies: the layout optimiser would otherwise re-materialise the split inside every group
        # (in the tensor-core operand layout, ~60 instructions per group) instead of converting it once.
        hi = _opaque(hi16)
        lo = _opaque(lo)
    return hi, lo


@triton.jit
def _trunc_bf16(v):
    """fp32 ``v`` truncated to bfloat16 precision (its low 16 bits cleared), as fp32: ``|v − t| < 2⁻⁷|v|``,
    ``v − t`` exact, and never rounded up (no overflow to inf near the fp32 maximum)."""
    return (v.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _split_trunc(v, EXACT_DOT: tl.constexpr):
    """``v ≈ hi + lo`` with ``hi`` = :func:`_trunc_bf16` ``(v)`` and ``lo`` = RN_bf16(v − hi) (residual
    ≤ 2⁻¹⁶|v|). On GPU the bf16 ``hi`` is the upper half of each fp32 (a byte permute per pair), where
    rounding takes a conversion and a shift per element."""
    lo = v - _trunc_bf16(v)
    if EXACT_DOT:
        return _trunc_bf16(v), _rn_bf16(lo)
    else:
        hi = (v.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return _opaque(hi), _opaque(lo.to(tl.bfloat16))


@triton.jit
def _split3(v, EXACT_DOT: tl.constexpr):
    """``v ≈ p0 + p1 + p2`` in three bfloat16 pieces (fp32 values under the interpreter), relative error
    < 2⁻²⁵: ``p0`` = :func:`_trunc_bf16` ``(v)``, then :func:`_split` of the exact remainder."""
    p0 = _trunc_bf16(v)
    p1, p2 = _split(v - p0, EXACT_DOT)
    if not EXACT_DOT:
        p0 = p0.to(tl.bfloat16)
    return p0, p1, p2


@triton.jit
def _opaque(v):
    """GPU only: an identity (``mov``) the compiler cannot look through or duplicate."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=v.dtype, is_pure=False, pack=2)


@triton.jit
def _mm(a, bt, acc, EXACT_DOT: tl.constexpr):
    """``acc + a @ bt`` with fp32 accumulation: a tensor-core ``tl.dot`` on GPU; under the interpreter an
    explicit fp32 product-and-sum (numpy's matmul neither rounds bf16 products like the GPU nor gives
    bit-identical results for identical codewords at different positions)."""
    if EXACT_DOT:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * bt.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, bt, acc)


@triton.jit
def _pack(v, a, A: tl.constexpr, EXACT_DOT: tl.constexpr):
    """fp32 ``v`` with its ``log2 A`` low mantissa bits replaced by ``a`` (an int32 tensor in ``[0, A)``).

    One ``lop3`` per element on GPU (``(v & ~(A-1)) | a``); ``a`` is loaded from memory so that it lives in
    ordinary registers (a constant is rematerialised in the loop or costs a second instruction). The key moves
    ``v`` by less than ``A`` ulps (relative error < 2^(log2 A − 23)) and keeps its sign."""
    bits = v.to(tl.int32, bitcast=True)
    if EXACT_DOT:
        key = (bits & (-A)) | a
    else:
        key = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $3, $2, 0xEA;", "=r,r,r,n", [bits, a, -A], dtype=tl.int32, is_pure=True, pack=1
        )
    return key.to(tl.float32, bitcast=True)


@triton.jit
def _pack_const(v, g: tl.constexpr, mask_reg, NB: tl.constexpr, EXACT_DOT: tl.constexpr):
    """:func:`_pack` with a compile-time position ``g < NB``: ``(v & ~(NB-1)) | g`` as one ``lop3`` with ``g``
    an immediate and the mask ``-NB`` in a register (``mask_reg``, derived from a loaded value)."""
    bits = v.to(tl.int32, bitcast=True)
    if EXACT_DOT:
        key = (bits & (-NB)) | g
    else:
        key = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $3, $2, 0xEC;", "=r,r,r,n", [bits, mask_reg, g], dtype=tl.int32, is_pure=True, pack=1
        )
    return key.to(tl.float32, bitcast=True)


@triton.jit
def _top2(a1, a2, c1, c2):
    """Best and second best of two (best, second) pairs; NaN-propagating (module docstring)."""
    lo = tl.minimum(a1, c1, propagate_nan=tl.PropagateNan.ALL)
    hi = tl.maximum(a1, c1, propagate_nan=tl.PropagateNan.ALL)
    return lo, tl.minimum(tl.minimum(a2, c2, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _top2_idx(a1, a2, ia, c1, c2, ic):
    """:func:`_top2` carrying the best one's index (ties between keys need no order: they are flagged)."""
    lo, second = _top2(a1, a2, c1, c2)
    return lo, second, tl.where(c1 < a1, ic, ia)


@triton.jit
def _dmask(d, Ds, ALIGNED: tl.constexpr):
    """``d < Ds``; with ``ALIGNED`` (the tensor-core kernel runs only for Ds % 4 == 0) written so that it is
    visibly constant over aligned groups of 4. Together with offsets declared multiples of 4 (with
    ``tl.multiple_of`` in the function that loads: the hint does not survive a helper's return) this
    gives 16-byte (fp32) / 8-byte (bf16) vector loads, stores and atomics without knowing Ds."""
    if ALIGNED:
        return ((d // 4) * 4) < Ds
    else:
        return d < Ds


@triton.jit
def _group_top2(key, EXACT_DOT: tl.constexpr):
    """``[R, A, 8]`` keys → best and second best over axis 1 (the thread-local axis), NaN-propagating.

    GPU: one ``tl.reduce`` with :func:`_top2` (3 min/max per key). The interpreter runs custom combine
    functions element by element in Python, so it gets the same result from vectorised min/argmin."""
    if EXACT_DOT:
        A: tl.constexpr = key.shape[1]
        nan = key != key
        bad = tl.max(nan.to(tl.int32), axis=1) > 0
        kc = tl.where(nan, _INF, key)
        b1, i1 = tl.min(kc, axis=1, return_indices=True)
        b2 = tl.min(tl.where(tl.arange(0, A)[None, :, None] == i1[:, None, :], _INF, kc), axis=1)
        return tl.where(bad, float("nan"), b1), tl.where(bad, float("nan"), b2)
    else:
        return tl.reduce((key, tl.full(key.shape, _INF, tl.float32)), 1, _top2)


@triton.jit
def _row_top2(b1, b2, pos, EXACT_DOT: tl.constexpr):
    """``[R, 8]`` (best, second, index of best) per position → per row (value, second, index)."""
    if EXACT_DOT:
        W: tl.constexpr = b1.shape[1]
        bad = tl.max(((b1 != b1) | (b2 != b2)).to(tl.int32), axis=1) > 0
        c1 = tl.where(b1 != b1, _INF, b1)
        c2 = tl.where(b2 != b2, _INF, b2)
        v1, i1 = tl.min(c1, axis=1, return_indices=True)
        hit = tl.arange(0, W)[None, :] == i1[:, None]
        k1 = tl.sum(tl.where(hit, pos, 0), axis=1)
        v2 = tl.minimum(tl.min(c2, axis=1), tl.min(tl.where(hit, _INF, c1), axis=1))
        return tl.where(bad, float("nan"), v1), tl.where(bad, float("nan"), v2), k1
    else:
        return tl.reduce((b1, b2, pos), 1, _top2_idx)


@triton.jit
def _group_dist(xh, xl, ct_hi, ct_lo, one, bt, bias_ptr, kk, BLOCK_N: tl.constexpr, KG: tl.constexpr,
                SPLIT: tl.constexpr, L2: tl.constexpr, BIAS_MMA: tl.constexpr, EXACT_DOT: tl.constexpr):
    """One 64-codeword group of a row tile: its tensor-core distances as ``[BLOCK_N, KG // 8, 8]`` (column
    ``8a + j`` at ``[:, a, j]``; in the accumulator's layout axis 1 is thread-local, axis 2 spans a quad).

    l2 adds ``||c||²``: with ``BIAS_MMA`` in the product itself (one more MMA of ``one [BLOCK_N, 16]``, ones
    in columns 0–2, with ``bt [16, KG]``, its three bfloat16 pieces in rows 0–2), so a distance costs no
    add; else as an fp32 add of the bias row (``bias_ptr + kk``, an L1 hit): the streamed classes, where
    a streamed bias operand would move 8× the bias row's bytes through L2.
    float32 (SPLIT): ``d = [l2]||c||² + xh·ch + xh·cl + xl·ch`` with the pieces of x and of −2c;
    bfloat16: ``d = ||c||² + x·(−2c)`` (l2) or ``x·(−c)`` (dot)."""
    acc = tl.zeros([BLOCK_N, KG], dtype=tl.float32)
    if L2 and BIAS_MMA:
        acc = _mm(one, bt, acc, EXACT_DOT)
    acc = _mm(xh, ct_hi, acc, EXACT_DOT)
    if SPLIT:
        acc = _mm(xh, ct_lo, acc, EXACT_DOT)
        acc = _mm(xl, ct_hi, acc, EXACT_DOT)
    if L2 and not BIAS_MMA:
        acc = acc + tl.load(bias_ptr + kk)[None, :]
    return tl.reshape(acc, [BLOCK_N, KG // 8, 8])


@triton.jit
def _streamed(base, g, kk, d, KG: tl.constexpr, BLOCK_D: tl.constexpr):
    """Group ``g`` of a streamed codebook piece (``[NG·KG, BLOCK_D]`` bf16 at ``base``) as a ``[BLOCK_D, KG]``
    dot operand."""
    return tl.trans(tl.load(base + ((g * KG + kk)[:, None] * BLOCK_D + d[None, :])))


@triton.jit
def _minnan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pair_min(k):
    """``[R, A, 8]`` → ``[R, A, 4]``: the minimum of columns ``j = 2t`` and ``2t + 1`` (one thread's pair)."""
    R: tl.constexpr = k.shape[0]
    A: tl.constexpr = k.shape[1]
    ke, ko = tl.split(tl.reshape(k, [R, A, 4, 2]))
    return _minnan(ke, ko)


@triton.jit
def _min_axis1(k, EXACT_DOT: tl.constexpr):
    """``[R, A, W]`` → ``[R, W]``: the minimum over axis 1, NaN-propagating (vectorised under the interpreter)."""
    if EXACT_DOT:
        bad = tl.max((k != k).to(tl.int32), axis=1) > 0
        return tl.where(bad, float("nan"), tl.min(tl.where(k != k, _INF, k), axis=1))
    else:
        return tl.reduce(k, 1, _minnan)


@triton.jit
def _fold_group(pg, q1, k3, qg):
    """One more group into the partition state (:func:`_two_partition_top2`): ``k3`` its distances, ``qg``
    their minimum over ``a`` with the group index packed. Returns P's and Q's new minima and
    ``max(q1, qg)``, the loser, which is the caller's candidate for Q's second best."""
    hi = tl.maximum(q1, qg, propagate_nan=tl.PropagateNan.ALL)
    return _minnan(pg, _pair_min(k3)), _minnan(q1, qg), hi


@triton.jit
def _two_partition_top2(pg, q1, q2, aa, A: tl.constexpr, NG: tl.constexpr, KG: tl.constexpr, EXACT_DOT: tl.constexpr):
    """Per row: ``(best, second, index of best)`` of its distances, from two partitions of them.

    ``pg [R, A, 4]``: the minimum over the groups and over columns ``j = 2t, 2t + 1`` of the distances at
    columns ``8a + j`` (:func:`_pair_min`); ``q1, q2 [R, 8]``: best
    and second best over the groups of the minimum over ``a`` at column ``j``, the group index packed into
    the low ``log2 NG`` bits. P's parts are (a, thread) — a thread holds the columns j = 2t, 2t + 1 — and
    Q's are (group, j). A P part and a Q part meet in exactly one distance, so with a unique minimum the
    winner is the intersection of P's and Q's best parts, and the second best is the smaller of P's and
    Q's second-best parts: every other distance lies outside the winner's P part or outside its Q part.
    Where the two argmins differ (two distances within packing error of each other) one of them is the
    other partition's second best, so the gap is below the flag bound and the row is rechecked. Per thread
    P is reduced over a (packed with a) and Q over its two columns, then one (best, second, index)
    reduction over the quad's four threads. NaN-propagating throughout (module docstring)."""
    R: tl.constexpr = pg.shape[0]
    p = _pack(pg, aa[None, :, None], A, EXACT_DOT)  # [R, A, 4]: parts (a, thread)
    bp, sp = _group_top2(p, EXACT_DOT)  # [R, 4]
    qe1, qo1 = tl.split(tl.reshape(q1, [R, 4, 2]))
    qe2, qo2 = tl.split(tl.reshape(q2, [R, 4, 2]))
    bq = _minnan(qe1, qo1)
    hi = tl.maximum(qe1, qo1, propagate_nan=tl.PropagateNan.ALL)
    sq = _minnan(_minnan(qe2, qo2), hi)
    e = (qo1 < qe1).to(tl.int32)
    t4 = tl.arange(0, 4)[None, :]
    pos = (bq.to(tl.int32, bitcast=True) & (NG - 1)) * KG + (bp.to(tl.int32, bitcast=True) & (A - 1)) * 8 + 2 * t4 + e
    return _row_top2(bq, _minnan(sp, sq), pos, EXACT_DOT)


@triton.jit
def _argmin_lowest(v, idx):
    """Per row of ``[R, W]``: the minimum value and the lowest index holding it (two plain reductions,
    so the interpreter runs them vectorised). ``v`` is never NaN here."""
    best = tl.min(v, axis=1)
    code = tl.min(tl.where(v == best[:, None], idx, 2147483647), axis=1)
    return best, code


@triton.jit
def _fma_rows(
    x_ptr,
    rows,  # [R] int64 row indices
    rmask,  # [R] rows that exist
    m,  # int64 subspace
    cb_ptr,
    bias_ptr,  # [K_pad] fp32 of this program: ||c||² (l2) or 0 (dot) for valid codewords, +inf otherwise
    M,
    K,
    Ds,
    R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_LOOP: tl.constexpr,
    PRECISION: tl.constexpr,
    NATIVE: tl.constexpr,  # half inputs: the products run in the input dtype (exact in fp32)
    ALIGNED: tl.constexpr,  # Ds % 4 == 0 (see _al)
    EXACT_DOT: tl.constexpr,
):
    """Exact-tie assignment of ``R`` rows over all ``K`` codewords: returns ``(best, code, x_sq, xf)``
    (``xf``: the rows as fp32 ``[R, BLOCK_D]`` without ``D_LOOP``, for the epilogue; zeros with it).

    ``best`` is the minimum of ``bias_k − 2 x·c_k`` in fp32 (``PRECISION="ieee"``: FMA chains, i.e. the
    fp32 reference's rounding up to the order of the Ds-term sums). Per thread and column position an
    element-wise running (value, chunk start) with strict ``<`` (the earlier chunk keeps a tie, a NaN
    never enters), then one lexicographic reduction per row: ties → lowest index, all-+inf → code 0.
    """
    d = tl.arange(0, BLOCK_D)
    kk = tl.arange(0, BLOCK_K)
    if ALIGNED:
        x_rows = x_ptr + tl.multiple_of(rows * (M * Ds) + m * Ds, 4)
    else:
        x_rows = x_ptr + rows * (M * Ds) + m * Ds
    if not D_LOOP:
        dm = _dmask(d, Ds, ALIGNED)
        xt = tl.load(x_rows[:, None] + d[None, :], mask=rmask[:, None] & dm[None, :], other=0.0)
        xf = xt.to(tl.float32)
        x_sq = tl.sum(xf * xf, axis=1)
        if not NATIVE:
            xt = xf
    else:
        xf = tl.zeros([R, BLOCK_D], dtype=tl.float32)
        x_sq = tl.zeros([R], dtype=tl.float32)
        for d0 in range(0, Ds, BLOCK_D):
            dd = d0 + d
            xc = tl.load(x_rows[:, None] + dd[None, :], mask=rmask[:, None] & (dd < Ds)[None, :], other=0.0)
            xc = xc.to(tl.float32)
            x_sq += tl.sum(xc * xc, axis=1)
    best = tl.full([R, BLOCK_K], _INF, dtype=tl.float32)
    base = tl.zeros([R, BLOCK_K], dtype=tl.int32)
    cb_base = cb_ptr + m * K * Ds
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kk
        km = ks < K
        bias = tl.load(bias_ptr + ks, mask=km, other=_INF)
        if not D_LOOP:
            if ALIGNED:
                c_el = tl.multiple_of(ks * Ds, 4)
            else:
                c_el = ks * Ds
            ct = tl.load(cb_base + c_el[:, None] + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
            if not NATIVE:
                ct = ct.to(tl.float32)
            if EXACT_DOT:
                dots = tl.sum(xf[:, None, :] * ct.to(tl.float32)[None, :, :], axis=2)
            else:
                dots = tl.dot(xt, tl.trans(ct), input_precision=PRECISION)
        else:
            dots = tl.zeros([R, BLOCK_K], dtype=tl.float32)
            for d0 in range(0, Ds, BLOCK_D):
                dd = d0 + d
                ddm = dd < Ds
                xc = tl.load(x_rows[:, None] + dd[None, :], mask=rmask[:, None] & ddm[None, :], other=0.0)
                cc = tl.load(cb_base + ks[:, None] * Ds + dd[None, :], mask=km[:, None] & ddm[None, :], other=0.0)
                if not NATIVE:
                    xc = xc.to(tl.float32)
                    cc = cc.to(tl.float32)
                if EXACT_DOT:
                    dots += tl.sum(xc.to(tl.float32)[:, None, :] * cc.to(tl.float32)[None, :, :], axis=2)
                else:
                    dots = tl.dot(xc, tl.trans(cc), dots, input_precision=PRECISION)
        dist = bias[None, :] - 2.0 * dots  # invalid codewords: +inf (or NaN) — never strictly below +inf
        better = dist < best
        best = tl.where(better, dist, best)
        base = tl.where(better, k0, base)
    v, code = _argmin_lowest(best, base + kk[None, :])
    return v, code, x_sq, xf


@triton.jit
def _finish_rows(
    x_ptr,
    el_base,  # scalar: element offset shared by the rows (t·BLOCK_N·M·Ds + m·Ds, or 0) ...
    el_off,  # [R] ... plus each row's own: x[n, m, :] starts at el_base + el_off (int32 within a tile)
    out_base,  # scalar and
    out_off,  # [R]: the rows' output index n·M + m = out_base + out_off
    xf,  # [R, BLOCK_D] fp32 rows (used without D_LOOP; reloaded chunk by chunk with it)
    done,  # [R] rows whose outputs this call writes
    row_ok,  # [R] valid rows (finite ||x||²): only they enter the statistics
    code,  # [R] int32 final codes (0 for invalid rows)
    md,  # [R] fp32 min_dist
    m,
    M,
    K,
    Ds,
    cbo_ptr,
    sx_ptr,
    codes_ptr,
    dist_ptr,
    q_ptr,
    err_ptr,
    counts_ptr,
    sums_ptr,
    fused,  # runtime 0/1: write quantized, sq_err and the statistics
    stats,  # runtime 0: none, 1: counts, 2: counts and sums of stats_x
    R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_LOOP: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Store codes and min_dist, and (``fused``) the training forward's epilogue for these rows:
    ``quantized`` (a bit-exact copy of ``codebooks_out[m, code]``), ``sq_err`` and the statistics as fp32
    atomics into ``counts [M, K]`` / ``sums [M, K, Ds]`` (rows invalid in x or in stats_x enter neither)."""
    # Scalar bases first: pointer + int64 scalar, then + the per-row (int32 within a tile) offsets.
    tl.store(codes_ptr + out_base + out_off, code, mask=done)
    tl.store(dist_ptr + out_base + out_off, md, mask=done)
    if fused != 0:
        # Without ALIGNED the loads cannot be vectorised and every element carries its own 64-bit address:
        # the epilogue then walks Ds in 8-wide chunks (a full tile of pointers cost ~90 registers).
        EPI_D: tl.constexpr = BLOCK_D if ALIGNED else 8
        d = tl.arange(0, EPI_D)
        if ALIGNED:
            row_el = tl.multiple_of(el_base + el_off, 4)
            cw_el = tl.multiple_of(m * K * Ds + code * Ds, 4)
        else:
            row_el = el_base + el_off
            cw_el = m * K * Ds + code * Ds
        x_rows = x_ptr + row_el
        sx_rows = sx_ptr + row_el
        q_dst = q_ptr + row_el
        q_src = cbo_ptr + cw_el
        s_dst = sums_ptr + cw_el
        keep = done & row_ok
        if ALIGNED and not D_LOOP:
            dmk = _dmask(d, Ds, ALIGNED)
            msk = done[:, None] & dmk[None, :]
            qc = tl.load(q_src[:, None] + d[None, :], mask=msk, other=0.0)
            tl.store(q_dst[:, None] + d[None, :], qc, mask=msk)
            diff = xf - qc.to(tl.float32)
            tl.store(err_ptr + out_base + out_off, tl.sum(diff * diff, axis=1), mask=done)
            if stats == 2:
                smsk = keep[:, None] & dmk[None, :]
                sx = tl.load(sx_rows[:, None] + d[None, :], mask=smsk, other=0.0).to(tl.float32)
                keep = keep & (tl.sum(sx * sx, axis=1) < _INF)
                tl.atomic_add(s_dst[:, None] + d[None, :], sx, mask=keep[:, None] & dmk[None, :], sem="relaxed")
        else:
            err = tl.zeros([R], dtype=tl.float32)
            for d0 in range(0, Ds, EPI_D):
                dd = d0 + d
                msk = done[:, None] & (dd < Ds)[None, :]
                qc = tl.load(q_src[:, None] + dd[None, :], mask=msk, other=0.0)
                tl.store(q_dst[:, None] + dd[None, :], qc, mask=msk)
                xc = tl.load(x_rows[:, None] + dd[None, :], mask=msk, other=0.0).to(tl.float32)
                diff = xc - qc.to(tl.float32)
                err += tl.sum(diff * diff, axis=1)
            tl.store(err_ptr + out_base + out_off, err, mask=done)
            if stats == 2:
                sx_sq = tl.zeros([R], dtype=tl.float32)
                for d0 in range(0, Ds, EPI_D):
                    dd = d0 + d
                    sx = tl.load(sx_rows[:, None] + dd[None, :], mask=keep[:, None] & (dd < Ds)[None, :], other=0.0)
                    sx = sx.to(tl.float32)
                    sx_sq += tl.sum(sx * sx, axis=1)
                keep = keep & (sx_sq < _INF)
                for d0 in range(0, Ds, EPI_D):
                    dd = d0 + d
                    msk = keep[:, None] & (dd < Ds)[None, :]
                    sx = tl.load(sx_rows[:, None] + dd[None, :], mask=msk, other=0.0).to(tl.float32)
                    tl.atomic_add(s_dst[:, None] + dd[None, :], sx, mask=msk, sem="relaxed")
        if stats != 0:
            tl.atomic_add(counts_ptr + m * K + code, tl.full([R], 1.0, tl.float32), mask=keep, sem="relaxed")


# -------------------------------------------------------------------------------- tensor-core kernel
@triton.jit
def _assign_tc_kernel(
    x_ptr,  # [N, M, Ds] float32 | bfloat16
    cb_ptr,  # [M, K, Ds]   codebooks used for the distances
    cbo_ptr,  # [M, K, Ds]  codebooks gathered into quantized (fused)
    sx_ptr,  # [N, M, Ds]   stats_x (fused, stats == 2)
    codes_ptr,  # [N, M] int32
    dist_ptr,  # [N, M] fp32
    q_ptr,  # [N, M, Ds]    quantized (fused)
    err_ptr,  # [N, M] fp32 (fused)
    counts_ptr,  # [M, K] fp32, zero-initialised (fused, stats ≥ 1)
    sums_ptr,  # [M, K, Ds] fp32, zero-initialised (fused, stats == 2)
    bias_ptr,  # [M·P, 2·NG·KG] fp32 scratch: each program's two bias rows (written in its prologue)
    flag_ptr,  # [M, P·tiles_per_prog·BLOCK_N] int32 scratch: each program's flagged rows
    nflag_ptr,  # [M·P] int32 scratch: each program's flagged-row count
    tile_ptr,  # [M·P, 4·BLOCK_N + 32] int32/fp32 scratch: each program's per-row verdicts (double-buffered), 0…31
    cbs_ptr,  # STREAM: [M·P, 2, NG·KG, BLOCK_D] bf16 scratch: each program's tensor-core codebook pieces
    N,
    M,
    K,
    Ds,
    tiles_per_prog,
    n_groups,  # cdiv(K, KG) ≤ NG
    fused,
    stats,
    keep_tc,  # 0; 1 only in tests: every valid row keeps the tensor-core winner (no recheck)
    gap_a,  # flag bound: the keys are within gap_a·||x||·max||c|| + gap_b·max||c||² of the distances
    gap_b,
    BLOCK_N: tl.constexpr,
    KG: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,  # float32 inputs: three bf16 products of split pieces; else one native product
    L2: tl.constexpr,
    BLOCK_F: tl.constexpr,  # rows per FMA recheck tile
    BIAS_MMA: tl.constexpr,  # l2: ||c||² added by the tensor cores (else by an fp32 add per distance)
    STREAM: tl.constexpr,  # the codebook pieces stream from cbs_ptr (L2) per group instead of staying resident
    EXACT_DOT: tl.constexpr,  # interpreter only (see _mm, _split, _pack)
):
    A: tl.constexpr = KG // 8
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    m = tl.program_id(1).to(tl.int64)
    prog = m * P + pid
    d = tl.arange(0, BLOCK_D)
    dm = _dmask(d, Ds, True)  # Ds % 4 == 0 (pick_config)
    kk = tl.arange(0, KG)
    bias_row = bias_ptr + prog * (2 * NG * KG)  # the keys' bias (invalid: 2^127) ...
    fma_bias = bias_row + NG * KG  # ... and the FMA recheck's (invalid: +inf; valid ||c||² may exceed 2^127)
    cbs_hi = cbs_ptr + prog * (2 * NG * KG * BLOCK_D)  # STREAM: this program's pieces of −2c (or −c) ...
    cbs_lo = cbs_hi + NG * KG * BLOCK_D  # ... and (SPLIT) their low parts
    # A streamed bias operand would move 8× the bytes of the bias row (the L2 traffic sets the pace there).
    tl.static_assert(not (STREAM and BIAS_MMA), "the streamed codebook adds the bias in fp32")

    # ---- prologue: the subspace's codebook, once per program ---------------------------------------
    # Invalid (non-finite ||c||²) and padded (k ≥ K) codewords become zero vectors; l2 also gives them
    # the bias 2^127, so their keys are finite and above the never-final limit 2^126. With "dot" a zero
    # codeword's key is exactly 0 (its distance): it can at most shrink the gap (more flags) or win, and a
    # winner k ≥ K or with non-finite ||c||² is flagged below.
    cmax2 = 0.0
    cts = ()
    ctl = ()
    bts = ()
    r16 = tl.arange(0, 16)[:, None]
    for g in tl.static_range(NG):
        ks = g * KG + kk
        km = ks < K
        c = tl.load(cb_ptr + tl.multiple_of((m * K + ks) * Ds, 4)[:, None] + d[None, :], mask=km[:, None] & dm[None, :], other=0.0)
        cf = c.to(tl.float32)
        c_sq = tl.sum(cf * cf, axis=1)
        c_ok = km & (c_sq < _INF)  # c_sq ≥ 0 or NaN: NaN and +inf fail
        # The keys' bias: ||c||² (l2) or 0 (dot) for valid codewords; invalid and padded ones get 2^127 (finite, so
        # that their packed l2 keys stay finite and above the never-final limit; the FMA recheck has its own row, fma_bias, with +inf).
        bias = tl.where(c_ok, c_sq if L2 else 0.0, _INVALID_BIAS)
        tl.store(bias_row + ks, bias)
        tl.store(fma_bias + ks, tl.where(c_ok, c_sq if L2 else 0.0, _INF))
        cmax2 = tl.maximum(cmax2, tl.max(tl.where(c_ok, c_sq, 0.0), axis=0))
        cf = tl.where(c_ok[:, None], cf, 0.0)
        if SPLIT:
            ch, cl = _split(-2.0 * cf, EXACT_DOT)  # −2c is exact; d = ||c||² + x·(−2c)
        else:
            # −2c (l2) and −c (dot) are exact in bf16 (a valid codeword has |c_d| < 2^64: no overflow)
            ch = (cf * (-2.0 if L2 else -1.0)).to(c.dtype)
            cl = ch  # unused second piece
        if STREAM:  # kept in this program's scratch (an L2-resident copy), loaded per group and row tile
            tl.store(cbs_hi + (ks[:, None] * BLOCK_D + d[None, :]), ch.to(tl.bfloat16))
            if SPLIT:
                tl.store(cbs_lo + (ks[:, None] * BLOCK_D + d[None, :]), cl.to(tl.bfloat16))
        else:  # loop-invariant dot operands: resident in shared memory for the whole program
            cts = cts + (tl.trans(ch),)
            ctl = ctl + (tl.trans(cl),)
        if L2 and BIAS_MMA:  # the bias as the B operand of one more product: its three bf16 pieces in rows 0-2
            b0, b1_, b2_ = _split3(bias, EXACT_DOT)
            bts = bts + (tl.where(r16 == 0, b0[None, :], tl.where(r16 == 1, b1_[None, :], tl.where(r16 == 2, b2_[None, :], 0.0))).to(tl.bfloat16),)
        else:
            bts = bts + (0,)  # unused
    # The A operand that multiplies the bias pieces: ones in columns 0-2 of every row.
    one = tl.where(tl.arange(0, 16)[None, :] < 3, 1.0, 0.0) + tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    one = one.to(tl.bfloat16)
    cmax = tl.sqrt(cmax2)
    # A row is final when second − best > 2E·(1 + 2⁻¹⁰) + 2⁻¹⁰⁰·(||x|| + max||c||), E = gap_a·||x||·max||c|| +
    # gap_b·max||c||² (_gap_bound): per row that is thr_a·||x|| + thr_b.
    thr_a = 2.0 * (1.0 + 2.0**-10) * gap_a * cmax + 2.0**-100
    thr_b = 2.0 * (1.0 + 2.0**-10) * gap_b * cmax2 + 2.0**-100 * cmax
    tl.store(nflag_ptr + prog, 0)
    pos_tab = tile_ptr + prog * (4 * BLOCK_N + 32) + 4 * BLOCK_N  # 0, 1, …, 31 (read back below)
    tl.store(pos_tab + tl.arange(0, 32), tl.arange(0, 32))
    tl.debug_barrier()  # the bias row and the counter are visible to every thread of the program

    nn = tl.arange(0, BLOCK_N)
    j8 = tl.arange(0, 8)
    # Packing constants read back from memory, so that they stay in ordinary registers (see _pack)
    aa = tl.load(pos_tab + tl.arange(0, A))  # 0 … A−1
    gzero = tl.load(pos_tab + j8 * 0)[None, :]  # 0, + g in STREAM: the packed group index
    gmask = gzero - NG  # −NG (see _pack_const)
    n_rows_cap = tiles_per_prog * BLOCK_N
    flag_list = flag_ptr + m * (P * n_rows_cap) + pid * n_rows_cap
    t_begin = pid * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, tl.cdiv(N, BLOCK_N))
    # Addresses: an int64 scalar base per tile plus loop-invariant int32 offsets inside the tile (the
    # launcher checks BLOCK_N·M·Ds < 2^31), so a tile costs no 64-bit arithmetic per element.
    el_off = nn * (M * Ds)
    out_off = nn * M
    for t in range(t_begin, t_end):
        row0 = t.to(tl.int64) * BLOCK_N if not EXACT_DOT else t * BLOCK_N
        el_base = row0 * (M * Ds) + m * Ds
        rmask = nn < N - t * BLOCK_N  # int32: t·BLOCK_N < N < 2^31
        xm = rmask[:, None] & dm[None, :]
        x_tile = x_ptr + tl.multiple_of(el_base + el_off, 4)[:, None] + d[None, :]
        # ---- phase A: tensor-core distances, packed-key top-2, the row's verdict ----------------------
        xt = tl.load(x_tile, mask=xm, other=0.0)
        xa = xt.to(tl.float32)
        x_sq = tl.sum(xa * xa, axis=1)
        if SPLIT:
            xh, xl = _split_trunc(xa, EXACT_DOT)  # x: the high piece truncated (fewer instructions per tile)
        else:
            xh, xl = xt, xt
        # Top-2 over the row's K distances from two partitions of them: P by (a, thread), Q by (group, j)
        # (:func:`_two_partition_top2`). Per distance: one min into P (elementwise over the groups) and
        # 7/8 of a min into Q (over a, thread-local), instead of a running top-2's three min/max and a pack.
        # Group 0 always exists; the state takes its register layout (zero-initialised loop state would
        # be placed in a default layout and converted through shared memory at every merge).
        if STREAM:
            k3 = _group_dist(xh, xl, _streamed(cbs_hi, 0, kk, d, KG, BLOCK_D), _streamed(cbs_lo, 0, kk, d, KG, BLOCK_D),
                             one, 0, bias_row, kk, BLOCK_N, KG, SPLIT, L2, BIAS_MMA, EXACT_DOT)
        else:
            k3 = _group_dist(xh, xl, cts[0], ctl[0], one, bts[0], bias_row, kk, BLOCK_N, KG, SPLIT, L2, BIAS_MMA, EXACT_DOT)
        pg = _pair_min(k3)
        q1 = _pack_const(_min_axis1(k3, EXACT_DOT), 0, gmask, NG, EXACT_DOT)
        if STREAM:
            q2 = q1 + _INF  # +inf in q1's layout (NaN or −inf: NaN, a row that is flagged anyway)
            for gr in range(1, n_groups):  # runtime loop: the pipeliner prefetches the next group's pieces
                k3 = _group_dist(xh, xl, _streamed(cbs_hi, gr, kk, d, KG, BLOCK_D), _streamed(cbs_lo, gr, kk, d, KG, BLOCK_D),
                                 one, 0, bias_row + gr * KG, kk, BLOCK_N, KG, SPLIT, L2, BIAS_MMA, EXACT_DOT)
                pg, q1, hi = _fold_group(pg, q1, k3, _pack(_min_axis1(k3, EXACT_DOT), gzero + gr, NG, EXACT_DOT))
                q2 = _minnan(q2, hi)
        else:
            for g in tl.static_range(1, NG):
                # The runtime guard also ends a basic block per group, which keeps ptxas from hoisting every
                # group's MMAs above the first epilogue (one live accumulator instead of NG).
                if g < n_groups:
                    k3 = _group_dist(xh, xl, cts[g], ctl[g], one, bts[g], bias_row + g * KG, kk, BLOCK_N, KG, SPLIT, L2,
                                     BIAS_MMA, EXACT_DOT)
                    pg, q1, hi = _fold_group(pg, q1, k3, _pack_const(_min_axis1(k3, EXACT_DOT), g, gmask, NG, EXACT_DOT))
                    if g == 1:
                        q2 = hi
                    else:
                        q2 = _minnan(q2, hi)
                elif g == 1:  # one group (K ≤ KG): no second best from Q
                    q2 = q1 + _INF  # +inf in q1's layout (NaN or −inf: NaN, a row that is flagged anyway)
        v1, v2, k1 = _two_partition_top2(pg, q1, q2, aa, A, NG, KG, EXACT_DOT)
        row_ok = rmask & (x_sq < _INF)
        gap_ok = (v2 - v1 > thr_a * tl.sqrt(x_sq) + thr_b) | (keep_tc != 0)
        clear = row_ok & gap_ok & (tl.abs(v1) < _BIG_KEY) & (k1 < K)  # NaN anywhere → False
        if not L2:
            # A zeroed (invalid or padded) codeword's key is exactly its 3 position bits: a winner that small
            # is rechecked (a valid one there has |x·c| < 2^-120: harmless), so phase B needs no validity look-up.
            clear = clear & (tl.abs(v1) > 2.0**-120)
        # The verdict (code, or −1: recheck, −2: invalid row) goes through this program's scratch slots: a
        # memory round trip is the one boundary the layout optimiser does not cross. Without it, it
        # re-materialises the row reduction (and every group's state feeding it) in the layouts of the
        # gathers below: one shared-memory conversion per group, the reduction duplicated per consumer.
        slot_buf = tile_ptr + prog * (4 * BLOCK_N + 32) + (t % 2) * (2 * BLOCK_N)  # double-buffered: one barrier
        tl.store(slot_buf + nn, tl.where(clear, k1, tl.where(row_ok, -1, -2)))
        if L2:
            tl.store(slot_buf + BLOCK_N + nn, x_sq.to(tl.int32, bitcast=True))
        tl.debug_barrier()
        # ---- phase B: exact min_dist of the winner, outputs ---------------------------------------------
        cand = tl.load(slot_buf + nn)
        row_ok = cand > -2
        clear = cand >= 0
        k1 = tl.maximum(cand, 0)
        # x again (an L2 hit; the distinct cache hint keeps the compiler from merging it with phase A's
        # load, which would keep the fp32 tile, in a second layout, live through every group)
        xf = tl.load(x_tile, mask=xm, other=0.0, cache_modifier=".cg").to(tl.float32)
        # min_dist of the winner in fp32, from the fp32 codeword (and, l2, its ||c||² of the prologue).
        cw = tl.load(cb_ptr + tl.multiple_of(m * K * Ds + k1 * Ds, 4)[:, None] + d[None, :], mask=xm, other=0.0).to(tl.float32)
        dot = tl.sum(xf * cw, axis=1)
        if L2:  # ||c||² of the winner (an invalid winner, bias 2^127, has a key ≥ 2^126: not clear)
            w_bias = tl.load(bias_row + k1, mask=rmask, other=_INF)
            final = clear
            md = (w_bias - 2.0 * dot) + tl.load(slot_buf + BLOCK_N + nn).to(tl.float32, bitcast=True)
            md = tl.where(md < 0.0, 0.0, md)
        else:
            final = clear
            md = -dot
        flag = row_ok & ~final
        md = tl.where(final, md, float("nan"))
        code = tl.where(final, k1, 0)
        done = rmask & ~flag  # final rows and invalid rows (code 0, NaN)
        _finish_rows(
            x_ptr, el_base, el_off, row0 * M + m, out_off, xf, done, row_ok, code, md, m, M, K, Ds, cbo_ptr, sx_ptr,
            codes_ptr, dist_ptr, q_ptr, err_ptr, counts_ptr, sums_ptr, fused, stats, BLOCK_N, BLOCK_D, False, True,
        )
        slot = tl.atomic_add(nflag_ptr + prog + nn * 0, 1, mask=flag, sem="relaxed")
        tl.store(flag_list + slot, (row0 + nn).to(tl.int32), mask=flag)

    # ---- the flagged rows, in fp32 FMA arithmetic over all K with exact tie-breaking ---------------------
    tl.debug_barrier()
    n_flag = tl.load(nflag_ptr + prog)
    ff = tl.arange(0, BLOCK_F)
    for f0 in range(0, n_flag, BLOCK_F):
        fmask = f0 + ff < n_flag
        rows = tl.load(flag_list + f0 + ff, mask=fmask, other=0).to(tl.int64)
        best, code, x_sq, xf = _fma_rows(
            x_ptr, rows, fmask, m, cb_ptr, fma_bias, M, K, Ds, BLOCK_F, 32, BLOCK_D, False, "ieee", False, True, EXACT_DOT
        )
        if L2:
            md = best + x_sq
            md = tl.where(md < 0.0, 0.0, md)
        else:
            md = 0.5 * best
        _finish_rows(
            x_ptr, m * Ds, rows * (M * Ds), m, rows * M, xf, fmask, fmask, code, md, m, M, K, Ds, cbo_ptr, sx_ptr,
            codes_ptr, dist_ptr, q_ptr, err_ptr, counts_ptr, sums_ptr, fused, stats, BLOCK_F, BLOCK_D, False, True,
        )


# -------------------------------------------------------------------------------- generic kernel
@triton.jit
def _assign_generic_kernel(
    x_ptr,
    cb_ptr,
    cbo_ptr,
    sx_ptr,
    codes_ptr,
    dist_ptr,
    q_ptr,
    err_ptr,
    counts_ptr,
    sums_ptr,
    bias_ptr,  # [M·P, K_pad] fp32 scratch
    N,
    M,
    K,
    Ds,
    tiles_per_prog,
    fused,
    stats,
    l2_weight,  # fp32: 1.0 for "l2", 0.0 for "dot"
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_LOOP: tl.constexpr,
    PRECISION: tl.constexpr,
    NATIVE: tl.constexpr,
    EXACT_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    m = tl.program_id(1).to(tl.int64)
    prog = m * P + pid
    K_pad = tl.cdiv(K, BLOCK_K) * BLOCK_K
    bias_row = bias_ptr + prog * K_pad
    d = tl.arange(0, BLOCK_D)
    kk = tl.arange(0, BLOCK_K)
    # ||c||² and validity once per program (into this program's scratch row), not once per row tile.
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kk
        km = ks < K
        c_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, Ds, BLOCK_D):
            dd = d0 + d
            c = tl.load(cb_ptr + (m * K + ks[:, None]) * Ds + dd[None, :], mask=km[:, None] & (dd < Ds)[None, :], other=0.0)
            c = c.to(tl.float32)
            c_sq += tl.sum(c * c, axis=1)
        c_ok = km & (c_sq < _INF)
        tl.store(bias_row + ks, tl.where(c_ok, l2_weight * c_sq, _INF), mask=km)
    tl.debug_barrier()

    nn = tl.arange(0, BLOCK_N)
    t_begin = pid * tiles_per_prog
    t_end = tl.minimum(t_begin + tiles_per_prog, tl.cdiv(N, BLOCK_N))
    for t in range(t_begin, t_end):
        rows = (t * BLOCK_N + nn).to(tl.int64)  # < N < 2^31: the product fits int32
        rmask = rows < N
        best, code, x_sq, xf = _fma_rows(
            x_ptr, rows, rmask, m, cb_ptr, bias_row, M, K, Ds, BLOCK_N, BLOCK_K, BLOCK_D, D_LOOP, PRECISION,
            NATIVE, False, EXACT_DOT,
        )
        if l2_weight != 0.0:
            md = best + x_sq
            md = tl.where(md < 0.0, 0.0, md)
        else:
            md = 0.5 * best
        row_ok = rmask & (x_sq < _INF)
        code = tl.where(row_ok, code, 0)
        md = tl.where(row_ok, md, float("nan"))
        _finish_rows(
            x_ptr, m * Ds, rows * (M * Ds), m, rows * M, xf, rmask, row_ok, code, md, m, M, K, Ds, cbo_ptr, sx_ptr,
            codes_ptr, dist_ptr, q_ptr, err_ptr, counts_ptr, sums_ptr, fused, stats, BLOCK_N, BLOCK_D, D_LOOP, False,
        )


# ------------------------------------------------------------------------------------ error bound
def _gap_bound(cfg: AssignConfig) -> tuple[float, float]:
    """``(gap_a, gap_b)``: every key of a valid row and codeword is within
    ``E = gap_a·‖x‖·c_max + gap_b·c_max²`` of the exact distance (``c_max = max ‖c‖`` over the valid
    codewords); a row is final only when ``second − best > 2E`` (times 1 + 2⁻¹⁰ for the bound's own
    fp32 evaluation, plus 2⁻¹⁰⁰·(‖x‖ + c_max) for bfloat16 underflow). Then for every other codeword
    ``D_k ≥ key_k − E ≥ second − E > best + E ≥ D_winner``: the winner is the exact argmin.

    Units: the keys approximate ``D = [l2]‖c‖² − 2 x·c`` (float32 "split", and bfloat16 l2) or ``−x·c``
    (bfloat16 dot). Write ``B = Σ_d |x_d·2c_d| ≤ 2‖x‖·‖c‖`` (Cauchy–Schwarz), ``u = 2⁻²⁴`` (fp32), ``p``
    packed bits, ``n`` terms in the tensor-core sum.

    * Split representation (float32): ``v = hi + lo + r`` with lo = RN_bf16(v − hi) and hi = RN_bf16(v)
      for c (``|v − hi| ≤ 2⁻⁸|v|``), hi = v truncated to bf16 for x (``|v − hi| < 2⁻⁷|v|``,
      :func:`_split_trunc`); ``|r| ≤ 2⁻⁹|v − hi| ≤ 2⁻¹⁶|v|`` either way (bf16 has 8 significant bits).
      With c scaled by the exact −2, ``x·(−2c)`` minus the three computed products ``xh·ch + xh·cl +
      xl·ch`` is ``Σ_d [xl·cl + (xh+xl)·rc + rx·(ch+cl) + rx·rc]``: ``|xl·cl| ≤ 2⁻¹⁵(1 + 2⁻⁸)|x_d||2c_d|``,
      the others ≤ 2⁻¹⁶(1 + 2⁻⁷)|x_d||2c_d|: in all ≤ 4.02·2⁻¹⁶·B. bfloat16 products are exact.
    * ``fl(‖c‖²)`` is within (Ds + 1)u·‖c‖². With ``bias_mma`` the l2 bias enters the same sum as three more
      terms (bias pieces × 1, :func:`_split3`), within 2⁻²⁵ of it, their magnitudes summing to ≤ 1.011·c_max²;
      otherwise it is added in fp32 (one rounding, u·|d|).
    * Tensor-core accumulation: products of bf16 pieces are exact in fp32 and are summed in fp32 with, at
      worst, one truncation per term (relative error ≤ 2⁻²³ = 2u; tensor cores may truncate instead of
      rounding): ≤ (n + 2)·2⁻²³·Σ|terms|, with Σ|terms| ≤ 1.02·B (split) or B (bf16), plus 1.011·c_max²
      (``bias_mma``); ``n = 3·BLOCK_D`` (split) or ``BLOCK_D`` (bf16), + 3 with ``bias_mma``.
    * A packed key moves ``d`` by < 2^(p−23)·|d| (p: the larger of P's log2 A and Q's log2 NG bits),
      ``|d| ≤ [l2]1.011·c_max² + 2.0001·‖x‖·c_max``.

    Collecting the coefficients of ``‖x‖·c_max`` and ``c_max²`` gives the two numbers returned.
    """
    p = max(int(math.log2(cfg.BLOCK_K // 8)), int(math.log2(cfg.NG)))  # P packs a, Q the group index
    pack = 2.0 ** (p - 23)
    u = 2.0**-24
    l2 = cfg.metric == "l2"
    split = cfg.precision == "exact"
    fold = l2 and cfg.bias_mma  # the bias enters the tensor-core sum; else one fp32 add (rounding u·|d|)
    n = (3 if split else 1) * cfg.BLOCK_D + (3 if fold else 0)
    acc = (n + 2) * 2.0**-23
    add = 0.0 if fold or not l2 else u
    if split or l2:  # keys ≈ [l2]||c||² − 2 x·c; per unit of B = Σ|x||2c| ≤ 2||x|| c_max
        per_b = (4.02 * 2.0**-16 + 1.02 * acc) if split else acc
        a = 2.0 * per_b + 2.0001 * (pack + add)
    else:  # bfloat16 dot: keys ≈ −x·c, exact products
        a = acc + 1.0001 * (u + pack)
    b = 0.0
    if l2:
        b = (cfg.BLOCK_D + 2) * u + (2.0**-25 + 1.011 * acc if fold else u) + 1.011 * pack
    return a, b


# ------------------------------------------------------------------------------------------ configs
@dataclass(frozen=True)
class AssignConfig:
    """One compiled variant of an assignment kernel (everything that is a constexpr or a type).

    ``kernel="tc"``: the resident tensor-core kernel; ``precision`` is ``"exact"`` (float32 split into
    bfloat16 pieces, flagged rows rechecked in FMA) or ``"native"`` (bfloat16 products); ``NG`` groups
    of ``KG`` codewords are the most it holds (K ≤ NG·KG); ``metric`` is a constexpr. ``kernel="generic"``:
    streaming kernel, ``precision`` ∈ ieee | tf32x3 | tf32 (float32) or native (float16/bfloat16), metric
    at run time (``metric=None``). ``fused`` is a run-time flag of both kernels, not a variant. ``arch``:
    the compute capability whose launches pick it (0: every one), the only one it is compiled for;
    ``per_sm``: resident programs per SM the launcher sizes the grid for.
    """

    kernel: str
    dtype: torch.dtype
    precision: str
    metric: str | None
    BLOCK_D: int
    D_LOOP: bool
    num_warps: int
    num_stages: int
    BLOCK_N: int
    BLOCK_K: int  # tc: KG (codewords per group); generic: codewords per streamed chunk
    NG: int = 0
    arch: int = 0
    per_sm: int = 4
    bias_mma: bool = True
    stream: bool = False

    def describe(self) -> str:
        if self.kernel == "tc":
            return (
                f"assign_tc[{C.TRITON_TYPE[self.dtype]},{self.precision},{self.metric}] BLOCK_N={self.BLOCK_N} "
                f"KG={self.BLOCK_K} NG={self.NG} (K<={self.BLOCK_K * self.NG}) BLOCK_D={self.BLOCK_D} "
                f"warps={self.num_warps} stages={self.num_stages}" + ("" if self.bias_mma else " bias=add")
                + (" stream" if self.stream else "")
                + (f" sm_{self.arch}" if self.arch else "")
            )
        return (
            f"assign_generic[{C.TRITON_TYPE[self.dtype]},{self.precision}] BLOCK_N={self.BLOCK_N} BLOCK_K={self.BLOCK_K} "
            f"BLOCK_D={self.BLOCK_D} D_LOOP={self.D_LOOP} warps={self.num_warps} stages={self.num_stages}"
        )


class TCClass(NamedTuple):
    """One size class of the tensor-core kernel: ``NG`` groups of ``KG`` codewords (K ≤ KG·NG)."""

    KG: int
    NG: int
    num_warps: int
    BLOCK_N: int
    num_stages: int
    per_sm: int  # resident programs per SM the grid is sized for (registers/shared memory of the compile)
    bias_mma: bool = True  # l2: ||c||² added on the tensor cores (else one fp32 add per distance)
    stream: bool = False  # the codebook pieces stream from an L2-resident scratch per group (else resident)


# Per precision and architecture (compute capability 90 or 80; others use the nearest below, at least 80),
# the classes from small to large K. Each is compiled for its architecture without register spills
# (scripts/triton_resources.py); the per-SM counts follow from the registers and shared memory of the compile.
# Resident classes keep the split codebook in shared memory for the whole program; streamed ones
# (``stream``) load each group's pieces per row tile from an L2-resident per-program copy (software
# pipelined), which costs L2 bandwidth but neither registers nor shared memory per group.
# sm_90: a 64-row tile per warpgroup (4 warps) — one wgmma per product, the accumulator's columns all in one
# warp, so every reduction over a row is thread-local plus a quad. fp32 K ≤ 256 resident with one
# pipelining stage (192 registers, two programs per SM; two stages take 255 and spill); K ≤ 1024 streamed
# (resident, the 48 shared-memory descriptors of 16 groups × 3 operands live in registers and 64- and
# 128-row tiles spill 104-112 B), 256 rows over two warpgroups sharing each streamed group (128 rows
# move twice the codebook bytes per row through L2, which then sets the pace).
# sm_80 (mma.sync) holds a resident codebook's operands in registers: fp32 64-row resident tiles spill
# (96-184 B) there, so fp32 streams (128 rows over 8 warps, one stage: two spill 8 B); bfloat16 (one
# product) fits resident.
TC_CLASSES: dict[str, dict[int, tuple[TCClass, ...]]] = {
    "native": {
        90: (TCClass(64, 4, 4, 64, 2, 2), TCClass(64, 16, 8, 128, 2, 1)),
        80: (TCClass(64, 4, 4, 64, 2, 2), TCClass(64, 16, 8, 128, 2, 1)),
    },
    "exact": {
        90: (TCClass(64, 4, 4, 64, 1, 2), TCClass(64, 16, 8, 256, 3, 1, bias_mma=False, stream=True)),
        80: (TCClass(64, 4, 8, 128, 1, 1, bias_mma=False, stream=True), TCClass(64, 16, 8, 128, 1, 1, bias_mma=False, stream=True)),
    },
}
TC_ARCHS = (90, 80)
_TC_MAX_BLOCK_N = max(c.BLOCK_N for table in TC_CLASSES.values() for classes in table.values() for c in classes)
TC_MAX_DS = 32
TC_BLOCK_F = 32
_TC_DTYPES = ((torch.float32, "exact"), (torch.bfloat16, "native"))


def _generic_dtype_precisions() -> list[tuple[torch.dtype, str]]:
    return [(torch.float32, p) for p in ("ieee", "tf32x3", "tf32")] + [(torch.float16, "native"), (torch.bfloat16, "native")]


_GENERIC_D = ((32, False), (16, True))


def _generic_launch(dtype: torch.dtype, d_loop: bool) -> tuple[int, int, int, int]:
    """(num_warps, num_stages, BLOCK_N, BLOCK_K) of the streaming kernel. fp32 products (FMA chains or the
    split tf32 forms) hold their operands' whole Ds chunk per thread, and the per-thread element-wise
    state adds a value and an index per output: 8 warps, 32-codeword chunks and (for Ds > 32) 16-wide
    Ds chunks keep every variant within the registers of sm_80 and sm_90 (4 warps or 64 codewords spilled)."""
    return 8, (1 if d_loop else 2), 64, 32

def _tc_config(dtype: torch.dtype, precision: str, metric: str, c: TCClass, arch: int) -> AssignConfig:
    return AssignConfig("tc", dtype, precision, metric, TC_MAX_DS, False, c.num_warps, c.num_stages, c.BLOCK_N, c.KG,
                        c.NG, arch, c.per_sm, c.bias_mma, c.stream)


def _tc_arch(prec: str, c: TCClass, arch: int) -> int:
    """``arch``, or 0 where every architecture's table has this class (one config compiled for all)."""
    return 0 if all(c in TC_CLASSES[prec][a] for a in TC_ARCHS) else arch


def _table_arch(arch: int) -> int:
    """The class table a compute capability uses: the nearest listed one at or below it (at least 80)."""
    return max([a for a in TC_ARCHS if a <= arch] or [min(TC_ARCHS)])


CONFIGS: tuple[AssignConfig, ...] = tuple(dict.fromkeys(
    _tc_config(dtype, prec, metric, c, _tc_arch(prec, c, arch))
    for (dtype, prec) in _TC_DTYPES
    for arch in TC_ARCHS
    for c, metric in itertools.product(TC_CLASSES[prec][arch], ("l2", "dot"))
)) + tuple(
    AssignConfig("generic", dtype, prec, None, bd, loop, *_generic_launch(dtype, loop))
    for (dtype, prec), (bd, loop) in itertools.product(_generic_dtype_precisions(), _GENERIC_D)
)


def pick_config(
    dtype: torch.dtype, Ds: int, precision: str, fused: bool = False, K: int | None = None, metric: str = "l2",
    arch: int = 90,
) -> AssignConfig:
    """The configuration the launcher uses on a GPU of compute capability ``arch`` (always a member of
    :data:`CONFIGS`).

    ``fused`` does not change the variant (it is a run-time flag); it stays in the signature for callers
    that describe both ops. ``K=None`` means a K that fits the smaller tensor-core class (K ≤ 256).
    """
    K = 256 if K is None else K
    tc_precision = {torch.float32: "exact", torch.bfloat16: "native"}.get(dtype)
    classes = TC_CLASSES[tc_precision][_table_arch(arch)] if tc_precision else ()
    use_tc = (
        tc_precision is not None
        and (dtype != torch.float32 or precision == "exact")
        and Ds <= TC_MAX_DS
        and Ds % 4 == 0  # 16-byte rows: vector loads without knowing Ds (kernels' _al)
        and K <= classes[-1].KG * classes[-1].NG
    )
    if use_tc:
        c = next(c for c in classes if K <= c.KG * c.NG)
        return _tc_config(dtype, tc_precision, metric, c, _tc_arch(tc_precision, c, _table_arch(arch)))
    if dtype == torch.float32:
        prec = "ieee" if precision == "exact" else precision  # exact = fp32 FMA where the tc kernel does not fit
    else:
        prec = "native"
    loop = Ds > 32
    return AssignConfig("generic", dtype, prec, None, 16 if loop else 32, loop, *_generic_launch(dtype, loop))


def _signature_types(cfg: AssignConfig) -> dict[str, str]:
    t = C.TRITON_TYPE[cfg.dtype]
    ptrs = {
        "x_ptr": t, "cb_ptr": t, "cbo_ptr": t, "sx_ptr": t, "codes_ptr": "i32", "dist_ptr": "fp32", "q_ptr": t,
        "err_ptr": "fp32", "counts_ptr": "fp32", "sums_ptr": "fp32", "bias_ptr": "fp32",
    }
    if cfg.kernel == "tc":
        ptrs.update({"flag_ptr": "i32", "nflag_ptr": "i32", "tile_ptr": "i32", "cbs_ptr": "bf16"})
    return ptrs


def _kernel(cfg: AssignConfig):
    return _assign_tc_kernel if cfg.kernel == "tc" else _assign_generic_kernel


def compile_spec(cfg: AssignConfig) -> tuple:
    """``(kernel, signature, constexprs, options)`` for ahead-of-time ``triton.compile`` of ``cfg``."""
    floats = ("gap_a", "gap_b") if cfg.kernel == "tc" else ("l2_weight",)
    return C.aot_spec(
        _kernel(cfg),
        pointers=_signature_types(cfg),
        floats=floats,
        constexprs=_constexprs(cfg, interpreted=False),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )


def _constexprs(cfg: AssignConfig, interpreted: bool) -> dict:
    """Constexpr arguments of ``cfg``; the interpreter-only workarounds are off for GPU compilation."""
    if cfg.kernel == "tc":
        return {
            "BLOCK_N": cfg.BLOCK_N,
            "KG": cfg.BLOCK_K,
            "NG": cfg.NG,
            "BLOCK_D": cfg.BLOCK_D,
            "SPLIT": cfg.precision == "exact",
            "L2": cfg.metric == "l2",
            "BLOCK_F": TC_BLOCK_F,
            "BIAS_MMA": cfg.bias_mma,
            "STREAM": cfg.stream,
            "EXACT_DOT": interpreted,
        }
    return {
        "BLOCK_N": cfg.BLOCK_N,
        "BLOCK_K": cfg.BLOCK_K,
        "BLOCK_D": cfg.BLOCK_D,
        "D_LOOP": cfg.D_LOOP,
        "PRECISION": "ieee" if cfg.precision == "native" else cfg.precision,
        "NATIVE": cfg.precision == "native",
        "EXACT_DOT": interpreted,
    }


# ---------------------------------------------------------------------------------------- launchers
def _grid(cfg: AssignConfig, N: int, M: int, device: torch.device) -> tuple[int, int]:
    """``(programs per subspace, row tiles per program)``: at most ``SMs × resident programs`` in all (rounded
    down: one more program per subspace than fits would start a second, mostly idle wave), at least M."""
    tiles = triton.cdiv(N, cfg.BLOCK_N)
    target = C.sm_count(device) * cfg.per_sm
    per_m = max(1, min(tiles, target // M))
    C.check_grid_dim(per_m, 2**31 - 1, "programs per subspace (grid axis 0)")
    tpp = triton.cdiv(tiles, per_m)
    return triton.cdiv(tiles, tpp), tpp


def _launch(x, codebooks, metric, precision, codebooks_out=None, stats_x=None, stats=0, _debug=None):
    """Run the picked kernel; ``codebooks_out`` not None → the fused epilogue (quantized, sq_err, and the
    statistics ``stats``: 1 counts, 2 counts and sums of ``stats_x``). ``_debug`` (tests only): a dict; with
    ``_debug["recheck"] = False`` every valid row keeps the tensor-core winner (nothing is flagged); the
    kernel's flagged-row count is stored in ``_debug["flagged"]`` and the config in ``_debug["config"]``."""
    N, M, Ds = x.shape
    K = codebooks.shape[1]
    C.check_grid_dim(M, 65535, "M (subspaces, grid axis 1)")
    if _TC_MAX_BLOCK_N * M * Ds >= 2**31:  # the tensor-core kernel's int32 offsets inside a row tile
        raise ValueError(f"equss.kernels: M·Ds = {M * Ds} is too large (at most {2**31 // _TC_MAX_BLOCK_N - 1})")
    fused = codebooks_out is not None
    dev = x.device
    cfg = pick_config(x.dtype, Ds, precision, fused, K=K, metric=metric, arch=C.device_arch(dev))
    codes = torch.empty(N, M, dtype=torch.int32, device=dev)
    min_dist = torch.empty(N, M, dtype=torch.float32, device=dev)
    if fused:
        q = torch.empty(N, M, Ds, dtype=codebooks_out.dtype, device=dev)
        err = torch.empty(N, M, dtype=torch.float32, device=dev)
        counts = torch.zeros(M, K, dtype=torch.float32, device=dev)
        sums = torch.zeros(M, K, Ds if stats == 2 else 0, dtype=torch.float32, device=dev)
    else:  # unused pointers: tensors of the right types so both uses share one compiled variant
        codebooks_out, q, err, counts, sums = codebooks, x, min_dist, min_dist, min_dist
    sx = stats_x if stats == 2 else x
    sums_arg = sums if stats == 2 else min_dist
    per_m, tpp = _grid(cfg, N, M, dev)
    grid = (per_m, M)
    interpreted = dev.type != "cuda"
    common = (x, codebooks, codebooks_out, sx, codes, min_dist, q, err, counts, sums_arg)
    if cfg.kernel == "tc":
        bias = torch.empty(M * per_m, 2 * cfg.NG * cfg.BLOCK_K, dtype=torch.float32, device=dev)
        flags = torch.empty(M * per_m * tpp * cfg.BLOCK_N, dtype=torch.int32, device=dev)
        nflag = torch.empty(M * per_m, dtype=torch.int32, device=dev)
        tile = torch.empty(M * per_m, 4 * cfg.BLOCK_N + 32, dtype=torch.int32, device=dev)
        cbs_shape = (M * per_m, 2, cfg.NG * cfg.BLOCK_K, cfg.BLOCK_D) if cfg.stream else (1,)
        cbs = torch.empty(cbs_shape, dtype=torch.bfloat16, device=dev)
        gap_a, gap_b = _gap_bound(cfg)
        keep_tc = 1 if (_debug or {}).get("recheck", True) is False else 0
        _assign_tc_kernel[grid](
            *common, bias, flags, nflag, tile, cbs,
            N, M, K, Ds, tpp, triton.cdiv(K, cfg.BLOCK_K), int(fused), stats, keep_tc, gap_a, gap_b,
            **_constexprs(cfg, interpreted), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if _debug is not None:
            _debug["flagged"] = int(nflag.sum())
    else:
        bias = torch.empty(M * per_m, triton.cdiv(K, cfg.BLOCK_K) * cfg.BLOCK_K, dtype=torch.float32, device=dev)
        _assign_generic_kernel[grid](
            *common, bias, N, M, K, Ds, tpp, int(fused), stats, 1.0 if metric == "l2" else 0.0,
            **_constexprs(cfg, interpreted), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if _debug is not None:
        _debug["config"] = cfg
        _debug.setdefault("flagged", 0)
    if not fused:
        return codes, min_dist, None, None, None, None
    return codes, min_dist, q, err, counts, sums


def pq_assign_triton(
    x: torch.Tensor, codebooks: torch.Tensor, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of ``equss::pq_assign`` (inputs validated and contiguous by :mod:`equss.ops`).

    Args:
        x: ``[N, M, Ds]`` float16/bfloat16/float32/float64.
        codebooks: ``[M, K, Ds]`` (promoted with ``x`` to a common dtype; float64 runs as float32, like
            the reference).
        metric: ``"l2"`` or ``"dot"``.

    Returns:
        ``codes [N, M]`` int32 and ``min_dist [N, M]`` float32. The fp32 precision comes from
        ``$EQUSS_TRITON_PRECISION`` (default ``exact``, see :mod:`equss.kernels._config`).
    """
    x, codebooks = _common_dtype(x, codebooks)
    codes, min_dist, *_ = _launch(x, codebooks, metric, C.resolve_precision(None))
    return codes, min_dist


def _common_dtype(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(x.dtype, codebooks.dtype)
    dtype = torch.float32 if dtype == torch.float64 else dtype
    return x.to(dtype).contiguous(), codebooks.to(dtype).contiguous()


def pq_assign_gather_triton(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    codebooks_out: torch.Tensor,
    metric: str,
    stats_x: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backend of ``equss::pq_assign_gather`` (semantics: ``pq_assign_gather_ref``).

    One launch: the program that chooses a row's code also writes ``quantized [N, M, Ds] =
    codebooks_out[m, codes]`` (bit-exact), ``sq_err [N, M]`` and adds the row to the statistics
    (``counts [M, K]``, and ``sums [M, K, Ds]`` of ``stats_x``) with fp32 atomics, so a training forward
    reads x from memory once (plus stats_x). ``x``, ``codebooks`` and ``codebooks_out`` share one dtype.
    ``stats_x`` of another dtype is cast to float32 when x is float32 (float64 → float32 is what the
    reference sums); for half-precision x the sums of such a ``stats_x`` come from the segment sum.
    """
    N, M, Ds = x.shape
    K = codebooks.shape[1]
    precision = C.resolve_precision(None)
    if x.dtype == torch.float64:
        # fp64 assigns in fp32 like the reference; the fp64 codewords are gathered bit-exactly.
        from equss.kernels.pq_gather import pq_gather_triton

        codes, min_dist = pq_assign_triton(x, codebooks, metric)
        q = pq_gather_triton(codes, codebooks_out)
        err = (x - q).square().sum(-1).float()
        return (codes, min_dist, q, err) + _segment_stats(x, codes, min_dist, K, stats_x)
    if stats_x is not None and stats_x.dtype != x.dtype and x.dtype == torch.float32:
        stats_x = stats_x.float().contiguous()
    if stats_x is None or stats_x.dtype == x.dtype:
        stats = 1 if stats_x is None else 2
        codes, min_dist, q, err, counts, sums = _launch(x, codebooks, metric, precision, codebooks_out, stats_x, stats)
        return codes, min_dist, q, err, counts, sums
    codes, min_dist, q, err, _, _ = _launch(x, codebooks, metric, precision, codebooks_out, None, 0)
    return (codes, min_dist, q, err) + _segment_stats(x, codes, min_dist, K, stats_x)


def _segment_stats(x, codes, min_dist, K, stats_x):
    """Counts and sums by the separate segment sum (float64 x, or stats_x of another dtype than half x)."""
    keep = ~torch.isnan(min_dist)  # the valid rows of x
    if stats_x is None:
        src, width = x, 0
    else:
        src, width = stats_x, x.shape[-1]
        keep = keep & torch.isfinite(stats_x.float().square().sum(-1))
    sums, counts = segment_sum_triton(src, torch.where(keep, codes, -1), K, with_counts=True)
    return counts, sums[..., :width]

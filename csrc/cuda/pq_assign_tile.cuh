// The register-blocked assignment kernel behind pq_assign and pq_assign_gather on CUDA (torch-free).
//
// For one subspace m the distance of row x to codeword k is one chain of fp32 FMAs
//     D[k] = bias[k] + sum_{d ascending} x[d] · W[d][k],
// with W = -2·c, bias = ||c||² (l2; ||x||² is added to the minimum afterwards) or W = -c, bias = 0 (dot):
// the formulation of the CPU kernel and of the "ext" error bound in tests/helpers.py. Scaling by -2 / -1
// is exact, so bit-identical codewords give bit-identical distances, and a strict `<` over increasing k
// keeps the lowest index (equss/ops/reference.py). Plain fp32 FMA, no tensor cores: exact ties and the
// lowest-index rule need every distance of one codeword computed the same way (see the note in
// pq_assign.cu).
//
// 1. pack_codebooks_kernel (once per call, M·K·Ds elements): codebooks of any float dtype -> fp32
//    W[m][k-tile][Dp][kBN] (Dp = Ds rounded up to kDStep, rows Ds..Dp zero) and bias[m][Kp]. ||c||² is
//    computed once per codeword, in fp32 from the fp32-rounded values; an invalid codeword (non-finite
//    ||c||²) and the padding codewords k >= K get W = 0 and bias = +inf, so they never win a strict `<`
//    (inf + finite = inf, inf + NaN = NaN).
// 2. assign_tile_kernel: a block owns kBM = 128 rows of one subspace (blockIdx.x = row_tile·M + m) and
//    walks all k-tiles of kBN = 128 codewords. Its 256 threads form a 16 × 16 grid; thread (tr, tc) keeps
//    an 8 × 8 block of accumulators (rows tr·4 + {0..3, 64..67}, codewords tc·4 + {0..3, 64..67}: each
//    quarter-warp reads 16 consecutive bytes per thread, no bank conflicts) and per d step loads 8 x and
//    8 W values with four LDS.128 for 64 FFMA. The d loop is rolled (8 steps per iteration) and
//    software-pipelined: the operands of step d + 1 load while step d computes, which bounds the live
//    registers at 64 accumulators + 2 × 16 operands (no spills under the 128-register budget of two
//    blocks per SM). The x tile is transposed into shared memory [d][row] (fp32, converted from any dtype
//    on load) and stays there for all k-tiles when Ds <= kBK; the W tile [d][codeword] streams through a
//    double buffer with cp.async (sm_80+), one stage = one k-tile × kBK dims.
//    After each k-tile a thread folds its 64 distances into 8 running minima (its codewords in increasing
//    order), kept in shared memory between k-tiles; at the end the 16 threads of a row (one half-warp)
//    combine their (value, index) pairs: smaller value, then lower index. A thread that never took a
//    value holds (+inf, 0), so a row with no finite distance gets code 0.
// Invalid rows (non-finite fp32 ||x||², summed from the same fp32 tile) get code 0 and min_dist NaN.
// With kFused, the epilogue also gathers quantized = codebooks_out[m, code] (bit copy), sq_err =
// Σ (x − quantized)² (fp32) and adds the statistics (counts, sums of stats_x) with global atomics (float4
// atomics on sm_90), so x is read from memory once (from the shared tile when Ds <= kBK, else again from
// L2).
#pragma once

#include "cuda/device_utils.cuh"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace equss::cuda::assign {

constexpr int kThreads = 256;
constexpr int kBM = 128;               // rows per block
constexpr int kBN = 128;               // codewords per k-tile
constexpr int kBK = 32;                // dims per pipeline stage
constexpr int kDStep = 8;              // Ds padded to a multiple of this
constexpr int kUnroll = 8;             // d steps per iteration of the rolled, software-pipelined d loop
constexpr int kXStride = kBM + 4;      // transposed x tile row: 16-byte aligned, conflict-free stores
constexpr int kXTile = kBK * kXStride;  // floats per x buffer
constexpr int kWTile = kBK * kBN;       // floats per W buffer

static_assert(kThreads == 256 && kBM == 128 && kBN == 128, "the 16 × 16 thread grid of 8 × 8 blocks");

__host__ __device__ inline int64_t padded_ds(int64_t Ds) { return (Ds + kDStep - 1) / kDStep * kDStep; }
inline int64_t num_k_tiles(int64_t K) { return (K + kBN - 1) / kBN; }
inline int64_t num_d_chunks(int64_t Ds) { return (padded_ds(Ds) + kBK - 1) / kBK; }

// Dynamic shared memory of assign_tile_kernel: x buffers (one when Ds fits one stage), W and bias buffers
// (two when pipelined), the running minima (8 values + 8 indices per thread), ||x||² and the codes of the
// block's rows. Pipelined, Ds <= 32: 66.5 KiB (83 KiB above), two blocks per SM on A100 and H100. Without
// the pipeline (GPUs whose opt-in limit is below that, e.g. 64 KiB on sm_75): 50 KiB.
inline size_t tile_smem_bytes(int64_t Ds, bool pipelined) {
  const int64_t x_buffers = num_d_chunks(Ds) > 1 && pipelined ? 2 : 1;
  const int64_t w_buffers = pipelined ? 2 : 1;
  return sizeof(float) *
         static_cast<size_t>(x_buffers * kXTile + w_buffers * (kWTile + kBN) + 16 * kThreads + 2 * kBM);
}

// ------------------------------------------------------------------------------------------- packing
// One block of kBN threads per (m, k-tile) (blockIdx.x = m·n_kt + kt): thread j packs codeword
// k = kt·kBN + j.
template <typename scalar_t>
__global__ void __launch_bounds__(kBN)
    pack_codebooks_kernel(const scalar_t* __restrict__ cb, float* __restrict__ w, float* __restrict__ bias,
                          int64_t K, int64_t Ds, int64_t Dp, int64_t n_kt, bool l2) {
  const int j = threadIdx.x;
  const int64_t tile = blockIdx.x;  // m·n_kt + kt
  const int64_t m = tile / n_kt;
  const int64_t k = (tile - m * n_kt) * kBN + j;
  float* wt = w + tile * Dp * kBN + j;
  const scalar_t* src = cb + (m * K + (k < K ? k : 0)) * Ds;
  float norm = 0.f;  // fp32, of the fp32-rounded values, like (cb.float() ** 2).sum(-1)
  if (k < K) {
#pragma unroll 8
    for (int64_t d = 0; d < Ds; ++d) {
      const float c = to_float(load_ro(src + d));
      norm = fmaf(c, c, norm);
    }
  }
  const bool valid = k < K && isfinite(norm);
  const float scale = l2 ? -2.f : -1.f;
#pragma unroll 8
  for (int64_t d = 0; d < Dp; ++d) {
    wt[d * kBN] = (valid && d < Ds) ? scale * to_float(load_ro(src + d)) : 0.f;
  }
  bias[tile * kBN + j] = valid ? (l2 ? norm : 0.f) : INFINITY;
}

// ------------------------------------------------------------------------------------------ epilogue
// What the fused op writes besides codes and min_dist (all null / unused for plain pq_assign).
struct FusedOut {
  AnyFloatPtr codebooks_out;  // [M, K, Ds]
  void* quantized;            // [N, M, Ds], dtype of codebooks_out
  float* sq_err;              // [N, M]
  float* counts;              // [M, K]
  AnyFloatPtr stats_x;        // [N, M, Ds] or data == nullptr
  float* sums;                // [M, K, Ds] (stats_x given)
  int group_shift;            // log2 of the lanes per row in the epilogue: row_group_shift(Ds)
};

// ------------------------------------------------------------------------------------------ the tile
// Rows [row0, row0 + kBM) × dims [d0, d0 + kBK) of subspace m -> X[d][row] (fp32, zeros outside).
// Lanes: 8 consecutive dims × 4 rows per warp access (coalesced 8-element row pieces; the transposed
// stores hit 32 distinct banks: (4·d + row) mod 32).
// kRowUnroll: rows loaded at once (all 4 in the prologue; 1 inside the k loop, where the 64 accumulators
// are live and 16 loads in flight would spill).
template <int kRowUnroll, typename scalar_t>
__device__ __forceinline__ void load_x_tile(float* __restrict__ X, const scalar_t* __restrict__ x, int64_t row0,
                                            int64_t N, int M, int m, int Ds, int d0, int tid) {
  const int dl = tid & 7;
  const int rl = tid >> 3;
#pragma unroll kRowUnroll
  for (int p = 0; p < kBM / 32; ++p) {
    const int r = rl + 32 * p;
    const int64_t n = row0 + r;
    const scalar_t* row = x + (n * M + m) * Ds + d0;
    const bool row_in = n < N;
#pragma unroll
    for (int q = 0; q < kBK / 8; ++q) {
      const int d = dl + 8 * q;
      const float v = (row_in && d0 + d < Ds) ? to_float(load_ro(row + d)) : 0.f;
      X[d * kXStride + r] = v;
    }
  }
}

// One stage of the packed W: `len` rows (a multiple of kDStep) of kBN floats from `src` -> Wsm[d][codeword],
// and the k-tile's bias when `bsrc` is given. 16-byte cp.async pieces, len / 8 per thread.
__device__ __forceinline__ void load_w_stage(float* __restrict__ Wsm, float* __restrict__ Bsm,
                                             const float* __restrict__ src, const float* __restrict__ bsrc, int len,
                                             int tid) {
  static_assert(kBN / 4 * kDStep % kThreads == 0, "whole pieces per thread");
  constexpr int kPiecesPerStep = kBN / 4 * kDStep / kThreads;
  const int pieces = len / kDStep * kPiecesPerStep;
  // Fixed trip count with a guard: one base address and immediate offsets (a runtime-bounded loop gets
  // unrolled with a remainder and costs the registers the main loop needs).
#pragma unroll
  for (int i = 0; i < kBK / kDStep * kPiecesPerStep; ++i) {
    if (i < pieces) cp_async_16(Wsm + 4 * (tid + i * kThreads), src + 4 * (tid + i * kThreads));
  }
  if (bsrc != nullptr && tid < kBN / 4) cp_async_16(Bsm + 4 * tid, bsrc + 4 * tid);
}

__device__ __forceinline__ void load_best(float (&v)[8], uint32_t (&k)[8], const float4* v4, const uint4* k4) {
  const float4 v0 = v4[0], v1 = v4[kThreads];
  const uint4 k0 = k4[0], k1 = k4[kThreads];
  v[0] = v0.x, v[1] = v0.y, v[2] = v0.z, v[3] = v0.w, v[4] = v1.x, v[5] = v1.y, v[6] = v1.z, v[7] = v1.w;
  k[0] = k0.x, k[1] = k0.y, k[2] = k0.z, k[3] = k0.w, k[4] = k1.x, k[5] = k1.y, k[6] = k1.z, k[7] = k1.w;
}

// blockIdx.x, read with a volatile move so that values derived from it (the subspace, the first row, the
// packed-W base) are recomputed where they are needed instead of being kept live across the main loop
// (where every register goes to the accumulators and operand fragments).
__device__ __forceinline__ uint32_t block_index() {
#if defined(__CUDA_ARCH__)
  uint32_t b;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(b));
  return b;
#else
  return blockIdx.x;
#endif
}

// Two blocks per SM for the pipelined layout (128 registers per thread); the single-buffer layout exists
// for GPUs with little shared memory, where one block per SM is all that fits anyway.
template <typename scalar_t, bool kFused, bool kPipelined>
__global__ void __launch_bounds__(kThreads, kPipelined ? 2 : 1)
    assign_tile_kernel(const scalar_t* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
                       int32_t* __restrict__ codes, float* __restrict__ min_dist, int64_t N, int M, int K, int Ds,
                       int n_kt, bool l2, FusedOut fused) {
  // M, K, Ds, n_kt < 2^31 (checked by the launcher); every global offset below is int64.
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);
  const int Dp = static_cast<int>(padded_ds(Ds));
  const int n_dc = (Dp + kBK - 1) / kBK;
  // kPipelined: stage s + 1 is loaded while stage s computes (double buffers); else every stage is loaded
  // after the previous one finished, into single buffers (a compile-time choice: the runtime branch alone
  // costs the registers that keep the main loop free of spills).
  constexpr bool pipelined = kPipelined;
  const bool x_double = pipelined && n_dc > 1;
  const int w_buffers = pipelined ? 2 : 1;
  float* xs = smem;
  float* ws = xs + (x_double ? 2 : 1) * kXTile;
  float* bs = ws + w_buffers * kWTile;
  float* best_s = bs + w_buffers * kBN;  // 16 per thread: running minima and their codeword indices
  float* xsq_s = best_s + 16 * kThreads;
  int32_t* code_s = reinterpret_cast<int32_t*>(xsq_s + kBM);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int tc = lane & 15;                     // codeword group: one half-warp spans all 16
  const int tr = (tid >> 5) * 2 + (lane >> 4);  // row group
  // blockIdx.x = row_tile·M + m: the M blocks of one row tile run together and read one contiguous
  // stretch of x. The packed W of subspace m is [n_kt][Dp][kBN]: stage (kt, dc) starts at
  // (kt·Dp + dc·kBK)·kBN.
#define EQUSS_BLOCK_M static_cast<int>(block_index() % static_cast<uint32_t>(M))
#define EQUSS_BLOCK_ROW0 (static_cast<int64_t>(block_index() / static_cast<uint32_t>(M)) * kBM)
#define EQUSS_W_M (w + static_cast<int64_t>(EQUSS_BLOCK_M) * n_kt * Dp * kBN)
#define EQUSS_B_M (bias + static_cast<int64_t>(EQUSS_BLOCK_M) * n_kt * kBN)

  // Prologue: x chunk 0 (synchronous, converted) and the first W stage (asynchronous).
  load_x_tile<kBM / 32>(xs, x, EQUSS_BLOCK_ROW0, N, M, EQUSS_BLOCK_M, Ds, 0, tid);
  load_w_stage(ws, bs, EQUSS_W_M, EQUSS_B_M, min(kBK, Dp), tid);
  cp_async_commit();
  if (tid < kBM) xsq_s[tid] = 0.f;

  // The running minima live in shared memory between k-tiles ([2][kThreads] float4 of values, then of
  // indices: conflict-free 16-byte accesses), so the 64 accumulators and the operand fragments have the
  // registers to themselves during the d loop.
  float4* best_v4 = reinterpret_cast<float4*>(best_s) + tid;
  uint4* best_k4 = reinterpret_cast<uint4*>(best_s + 8 * kThreads) + tid;
  best_v4[0] = best_v4[kThreads] = make_float4(INFINITY, INFINITY, INFINITY, INFINITY);
  best_k4[0] = best_k4[kThreads] = make_uint4(0, 0, 0, 0);
  float acc[8][8];

  const int n_stages = n_kt * n_dc;  // n_kt <= 2^24 (K < 2^31), n_dc small
  int kt = 0;
  int dc = 0;
  for (int s = 0; s < n_stages; ++s) {
    const int len = min(kBK, Dp - dc * kBK);
    if constexpr (pipelined) {
      if (s + 1 < n_stages) {
        // Stage s + 1 into the other buffers, last read in stage s - 1 (which ended with __syncthreads()).
        const int dc1 = dc + 1 == n_dc ? 0 : dc + 1;
        const int kt1 = dc1 == 0 ? kt + 1 : kt;
        load_w_stage(ws + ((s + 1) & 1) * kWTile, bs + (kt1 & 1) * kBN,
                     EQUSS_W_M + (static_cast<int64_t>(kt1) * Dp + dc1 * kBK) * kBN,
                     dc1 == 0 ? EQUSS_B_M + static_cast<int64_t>(kt1) * kBN : nullptr, min(kBK, Dp - dc1 * kBK), tid);
        cp_async_commit();
        if (n_dc > 1) {
          load_x_tile<1>(xs + ((s + 1) & 1) * kXTile, x, EQUSS_BLOCK_ROW0, N, M, EQUSS_BLOCK_M, Ds, dc1 * kBK, tid);
        }
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
    } else {
      if (s > 0) {  // stage s into the single buffers, free since stage s - 1 ended with __syncthreads()
        load_w_stage(ws, bs, EQUSS_W_M + (static_cast<int64_t>(kt) * Dp + dc * kBK) * kBN,
                     dc == 0 ? EQUSS_B_M + static_cast<int64_t>(kt) * kBN : nullptr, len, tid);
        cp_async_commit();
        if (n_dc > 1) load_x_tile<1>(xs, x, EQUSS_BLOCK_ROW0, N, M, EQUSS_BLOCK_M, Ds, dc * kBK, tid);
      }
      cp_async_wait<0>();
    }
    __syncthreads();

    const float* X = xs + (x_double ? (s & 1) * kXTile : 0);
    const float* W = ws + (pipelined ? (s & 1) * kWTile : 0);
    if (kt == 0 && tid < kBM) {
      float x_sq = xsq_s[tid];  // ||x||² of row tid, d ascending
      for (int d = 0; d < len; ++d) {
        const float v = X[d * kXStride + tid];
        x_sq = fmaf(v, v, x_sq);
      }
      xsq_s[tid] = x_sq;
    }
    if (dc == 0) {
      const float* B = bs + (pipelined ? (kt & 1) * kBN : 0);
      const float4 b0 = *reinterpret_cast<const float4*>(B + tc * 4);
      const float4 b1 = *reinterpret_cast<const float4*>(B + 64 + tc * 4);
      const float bj[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = bj[j];
      }
    }
    // Software-pipelined d loop: the operands of step d + 1 are loaded while step d computes, and they are
    // the loop's only carried values besides the accumulators (a rolled loop of kUnroll steps, so the
    // scheduler cannot hoist loads further ahead and the 64 accumulators + 2 × 16 operands fit the
    // 128-register budget of two blocks per SM).
    const float* xp = X + tr * 4;
    const float* wp = W + tc * 4;
    float4 a0 = *reinterpret_cast<const float4*>(xp);
    float4 a1 = *reinterpret_cast<const float4*>(xp + 64);
    float4 w0 = *reinterpret_cast<const float4*>(wp);
    float4 w1 = *reinterpret_cast<const float4*>(wp + 64);
#pragma unroll 1
    for (int d0 = 0; d0 < len; d0 += kUnroll) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        // Step len (after the last) reads the next row of the buffer, which is still inside the shared
        // allocation (every buffer is followed by another one or the bias / minima arrays) and unused.
        const int dn = d0 + u + 1;
        const float4 na0 = *reinterpret_cast<const float4*>(xp + dn * kXStride);
        const float4 na1 = *reinterpret_cast<const float4*>(xp + dn * kXStride + 64);
        const float4 nw0 = *reinterpret_cast<const float4*>(wp + dn * kBN);
        const float4 nw1 = *reinterpret_cast<const float4*>(wp + dn * kBN + 64);
        const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float b[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        a0 = na0, a1 = na1, w0 = nw0, w1 = nw1;
      }
    }
    if (dc == n_dc - 1) {
      float best[8];
      uint32_t best_k[8];
      load_best(best, best_k, best_v4, best_k4);
      // This thread's codewords of the tile in increasing order: tc·4 + {0..3}, then 64 + tc·4 + {0..3}.
      const uint32_t k_base = static_cast<uint32_t>(kt) * kBN + tc * 4;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t k = k_base + (j < 4 ? j : 60 + j);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (acc[i][j] < best[i]) {
            best[i] = acc[i][j];
            best_k[i] = k;
          }
        }
      }
      best_v4[0] = make_float4(best[0], best[1], best[2], best[3]);
      best_v4[kThreads] = make_float4(best[4], best[5], best[6], best[7]);
      best_k4[0] = make_uint4(best_k[0], best_k[1], best_k[2], best_k[3]);
      best_k4[kThreads] = make_uint4(best_k[4], best_k[5], best_k[6], best_k[7]);
    }
    __syncthreads();
    if (++dc == n_dc) {
      dc = 0;
      ++kt;
    }
  }

  const int m = EQUSS_BLOCK_M;
  const int64_t row0 = EQUSS_BLOCK_ROW0;
#undef EQUSS_BLOCK_M
#undef EQUSS_BLOCK_ROW0
#undef EQUSS_W_M
#undef EQUSS_B_M

  // The 16 threads of a row group (one half-warp) hold disjoint codeword sets: lexicographic minimum.
  float best[8];
  uint32_t best_k[8];
  load_best(best, best_k, best_v4, best_k4);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best[i], o);
      const uint32_t ok = __shfl_xor_sync(0xffffffffu, best_k[i], o);
      if (ov < best[i] || (ov == best[i] && ok < best_k[i])) {
        best[i] = ov;
        best_k[i] = ok;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (tc == i) {  // lane tc of each half-warp writes row i of its row group
      const int r = (i < 4 ? 0 : 60) + tr * 4 + i;
      const int64_t n = row0 + r;
      const float row_sq = xsq_s[r];
      const bool valid = isfinite(row_sq);  // an invalid row: code 0, min_dist NaN (reference.py)
      float out = best[i];
      if (l2) {
        out += row_sq;
        out = out < 0.f ? 0.f : out;  // the expanded form can round below 0
      }
      const int32_t code = valid ? static_cast<int32_t>(best_k[i]) : 0;
      if (n < N) {
        codes[n * M + m] = code;
        min_dist[n * M + m] = valid ? out : NAN;
      }
      if (kFused) code_s[r] = code;
    }
  }
  if constexpr (kFused) {
    __syncthreads();
    // Row groups of G lanes with kRowElems consecutive elements each (device_utils.cuh; 4 rows of Ds = 32
    // per warp); the loop bounds are uniform across the warp, so every lane reaches group_sum's shuffles.
    const int G = 1 << fused.group_shift;
    const int group = tid >> fused.group_shift;
    const int d_lane = (tid & (G - 1)) * kRowElems;
    const int chunk = kRowElems * G;
    const int rows_per_pass = kThreads >> fused.group_shift;
    const bool x_in_smem = n_dc == 1;
    const bool has_stats = fused.stats_x.data != nullptr;
    for (int rb = 0; rb < kBM; rb += rows_per_pass) {
      const int r = rb + group;
      const int64_t n = row0 + r;
      const bool active = r < kBM && n < N;
      const int rs = active ? r : 0;
      const int64_t k = code_s[rs];
      const bool x_valid = isfinite(xsq_s[rs]);
      const int64_t xrow = (n * M + m) * Ds;
      const int64_t qrow = (m * static_cast<int64_t>(K) + k) * Ds;
      float se = 0.f, ss = 0.f;
      if (active) {
        for (int c = d_lane; c < Ds; c += chunk) {
#pragma unroll
          for (int e = 0; e < kRowElems; ++e) {
            const int d = c + e;
            if (d < Ds) {
              const float xv = x_in_smem ? xs[d * kXStride + r] : to_float(load_ro(x + xrow + d));
              const float qv = fused.codebooks_out.copy_to(qrow + d, fused.quantized, xrow + d);
              const float diff = xv - qv;
              se = fmaf(diff, diff, se);
              if (has_stats) {
                const float sv = fused.stats_x.load_float(xrow + d);
                ss = fmaf(sv, sv, ss);
              }
            }
          }
        }
      }
      se = group_sum(se, G);
      ss = group_sum(ss, G);
      if (active) {
        if (d_lane == 0) fused.sq_err[n * M + m] = se;
        // Statistics over the valid rows of x (and of stats_x when given): reference.py.
        if (x_valid && (!has_stats || isfinite(ss))) {
          if (d_lane == 0) atomicAdd(fused.counts + m * static_cast<int64_t>(K) + k, 1.f);
          if (has_stats) {
            for (int c = d_lane; c < Ds; c += chunk) {
              float sv[kRowElems];
#pragma unroll
              for (int e = 0; e < kRowElems; ++e) sv[e] = c + e < Ds ? fused.stats_x.load_float(xrow + c + e) : 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
              if ((Ds & 3) == 0) {  // sums + qrow + c is 16-byte aligned: one vector atomic (RED.F32x4)
                atomicAdd(reinterpret_cast<float4*>(fused.sums + qrow + c), make_float4(sv[0], sv[1], sv[2], sv[3]));
                continue;
              }
#endif
#pragma unroll
              for (int e = 0; e < kRowElems; ++e) {
                if (c + e < Ds) atomicAdd(fused.sums + qrow + c + e, sv[e]);
              }
            }
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ launchers
// w: [M][n_kt][Dp][kBN], bias: [M][n_kt·kBN] (fp32 workspaces of the caller).
template <typename scalar_t>
void launch_pack(const scalar_t* cb, float* w, float* bias, int64_t M, int64_t K, int64_t Ds, bool l2,
                 cudaStream_t stream) {
  const int64_t n_kt = num_k_tiles(K);
  pack_codebooks_kernel<scalar_t>
      <<<static_cast<unsigned>(M * n_kt), kBN, 0, stream>>>(cb, w, bias, K, Ds, padded_ds(Ds), n_kt, l2);
}

// `smem_optin`: the device's opt-in shared-memory limit per block (cudaDevAttrMaxSharedMemoryPerBlockOptin);
// the pipelined layout is used when it fits.
template <typename scalar_t, bool kFused>
cudaError_t launch_assign(const scalar_t* x, const float* w, const float* bias, int32_t* codes, float* min_dist,
                          int64_t N, int64_t M, int64_t K, int64_t Ds, bool l2, const FusedOut& fused,
                          size_t smem_optin, cudaStream_t stream) {
  const bool pipelined = tile_smem_bytes(Ds, true) <= smem_optin;
  const size_t smem = tile_smem_bytes(Ds, pipelined);
  auto* kernel = pipelined ? &assign_tile_kernel<scalar_t, kFused, true> : &assign_tile_kernel<scalar_t, kFused, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = (N + kBM - 1) / kBM * M;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      x, w, bias, codes, min_dist, N, static_cast<int>(M), static_cast<int>(K), static_cast<int>(Ds),
      static_cast<int>(num_k_tiles(K)), l2, fused);
  return cudaGetLastError();
}

}  // namespace equss::cuda::assign

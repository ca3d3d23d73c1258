// Scatter-add of [N, M, Ds] rows into [M, K, Ds] by code, shared by pq_gather_backward and
// pq_cluster_stats on CUDA (torch-free).
//
// Launch: grid (M, row chunks), kThreads threads; block (m, c) owns rows [c·rows_per_block, ...) of
// subspace m (no per-element division: m is the block's, n the loop's). Inside a block a row is handled by
// a group of G lanes (G = power of two >= min(Ds, 32), lane d, d + G, ...), so the loads of one row are
// coalesced and a warp covers 32 / G rows.
//
// kPrivate: the block accumulates into a shared-memory copy of out[m] ([K][Ds] fp32, + K int counts),
// zeroed at the start and flushed with one global atomic per non-zero element at the end (vector
// float4 atomics on sm_90); used when K·Ds·4 + K·4 fits in 48 KiB. Otherwise, and for float64 gradients
// (fp64 accumulation), every element goes straight to a global atomic.
//
// A code outside [0, K) contributes nothing; with kSkipInvalid (the statistics) neither does a row whose
// fp32 squared norm is not finite (equss/ops/reference.py), tested in-kernel from the same loads. Sums
// are atomics, so their rounding depends on the order of arrival: not bit-reproducible, within N·eps of
// the exact sum (each term takes part in at most N additions, in any tree). Counts are exact below 2^24.
#pragma once

#include "cuda/device_utils.cuh"

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace equss::cuda::segsum {

constexpr int kThreads = 256;
constexpr size_t kMaxPrivateBytes = 48 * 1024;  // static shared-memory limit: no opt-in needed
constexpr int kHeld = 4;                          // elements per lane kept in registers

inline size_t private_bytes(int64_t K, int64_t Ds) {
  return static_cast<size_t>(K) * static_cast<size_t>(Ds) * sizeof(float) + static_cast<size_t>(K) * sizeof(int);
}
inline bool fits_private(int64_t K, int64_t Ds) { return private_bytes(K, Ds) <= kMaxPrivateBytes; }

// The value added: fp64 gradients stay fp64 (acc_t double), everything else is rounded to fp32 first,
// like x.float() in the reference.
template <typename acc_t, typename src_t>
__device__ __forceinline__ acc_t to_acc(src_t v) {
  if constexpr (std::is_same_v<acc_t, double> && std::is_same_v<src_t, double>) {
    return v;
  } else {
    return static_cast<acc_t>(to_float(v));
  }
}

template <typename src_t, typename acc_t, typename index_t, bool kSkipInvalid, bool kCount, bool kPrivate>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const src_t* __restrict__ src, const index_t* __restrict__ codes, acc_t* __restrict__ out,
                       float* __restrict__ counts, int64_t N, int M, int K, int Ds, int64_t rows_per_block,
                       int group_shift) {
  static_assert(!kPrivate || std::is_same_v<acc_t, float>, "shared-memory accumulators are fp32");
  extern __shared__ float4 smem_raw[];
  float* acc_s = reinterpret_cast<float*>(smem_raw);  // [K][Ds] (kPrivate)
  int* cnt_s = reinterpret_cast<int*>(acc_s + static_cast<int64_t>(K) * Ds);  // [K] (kPrivate && kCount)

  const int tid = threadIdx.x;
  const int m = blockIdx.x;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t n_end = n_begin + rows_per_block < N ? n_begin + rows_per_block : N;
  const int64_t KD = static_cast<int64_t>(K) * Ds;
  acc_t* out_m = out + m * KD;

  if constexpr (kPrivate) {
    for (int64_t e = tid; e < KD; e += kThreads) acc_s[e] = 0.f;
    if (kCount) {
      for (int k = tid; k < K; k += kThreads) cnt_s[k] = 0;
    }
    __syncthreads();
  }

  const int G = 1 << group_shift;
  const int group = tid >> group_shift;
  const int lg = tid & (G - 1);
  const int rows_per_pass = kThreads >> group_shift;
  // Uniform trip count over the block: every lane reaches the shuffles of group_sum.
  for (int64_t nb = n_begin; nb < n_end; nb += rows_per_pass) {
    const int64_t n = nb + group;
    const bool active = n < n_end;
    const int64_t k = active ? static_cast<int64_t>(codes[n * M + m]) : -1;
    const bool in_range = k >= 0 && k < K;
    const src_t* row = src + (n * M + m) * Ds;
    // The first kHeld elements of the lane (all of them when Ds <= kHeld·G, e.g. Ds <= 128) are loaded
    // once and kept in registers; any further ones are loaded again for the add (an L1 hit).
    acc_t v[kHeld];
#pragma unroll
    for (int j = 0; j < kHeld; ++j) {
      const int d = lg + j * G;
      v[j] = (in_range && d < Ds) ? to_acc<acc_t>(load_ro(row + d)) : acc_t(0);
    }
    bool keep = in_range;
    if constexpr (kSkipInvalid) {
      float sq = 0.f;
#pragma unroll
      for (int j = 0; j < kHeld; ++j) sq = fmaf(v[j], v[j], sq);
      if (in_range) {
        for (int d = lg + kHeld * G; d < Ds; d += G) {
          const float e = to_float(load_ro(row + d));
          sq = fmaf(e, e, sq);
        }
      }
      sq = group_sum(sq, G);
      keep = in_range && isfinite(sq);
    }
    if (keep) {
      acc_t* o = kPrivate ? reinterpret_cast<acc_t*>(acc_s) + k * Ds : out_m + k * Ds;
#pragma unroll
      for (int j = 0; j < kHeld; ++j) {
        const int d = lg + j * G;
        if (d < Ds) atomicAdd(o + d, v[j]);
      }
      for (int d = lg + kHeld * G; d < Ds; d += G) atomicAdd(o + d, to_acc<acc_t>(load_ro(row + d)));
      if (kCount && lg == 0) {
        if constexpr (kPrivate) {
          atomicAdd(cnt_s + k, 1);
        } else {
          atomicAdd(counts + static_cast<int64_t>(m) * K + k, 1.f);
        }
      }
    }
  }

  if constexpr (kPrivate) {
    __syncthreads();
    // Adding an exact zero changes nothing (the output starts at +0), so zeros are skipped; NaN is not.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if ((KD & 3) == 0) {  // out_m is then 16-byte aligned (the output is a fresh allocation)
      const float4* a4 = reinterpret_cast<const float4*>(acc_s);
      float4* o4 = reinterpret_cast<float4*>(out_m);
      for (int64_t e = tid; e < KD / 4; e += kThreads) {
        const float4 v = a4[e];
        if (v.x != 0.f || v.y != 0.f || v.z != 0.f || v.w != 0.f) atomicAdd(o4 + e, v);
      }
    } else
#endif
    {
      for (int64_t e = tid; e < KD; e += kThreads) {
        const float v = acc_s[e];
        if (v != 0.f) atomicAdd(out_m + e, v);
      }
    }
    if (kCount) {
      for (int k = tid; k < K; k += kThreads) {
        const int c = cnt_s[k];
        if (c != 0) atomicAdd(counts + static_cast<int64_t>(m) * K + k, static_cast<float>(c));
      }
    }
  }
}

// Grid and launch: `blocks_target` blocks in all (a few per SM), at least `min_rows` rows per block (the
// flush of a private copy costs K·Ds atomics, so a block should own several rows per codeword).
template <typename src_t, typename acc_t, typename index_t, bool kSkipInvalid, bool kCount>
void launch(const src_t* src, const index_t* codes, acc_t* out, float* counts, int64_t N, int64_t M, int64_t K,
            int64_t Ds, int64_t blocks_target, cudaStream_t stream) {
  const bool use_private = std::is_same_v<acc_t, float> && fits_private(K, Ds);
  const int64_t min_rows = use_private ? (4 * K > 256 ? 4 * K : 256) : 256;
  int64_t chunks = (blocks_target + M - 1) / M;
  const int64_t max_chunks = (N + min_rows - 1) / min_rows;
  chunks = chunks < max_chunks ? chunks : max_chunks;
  chunks = chunks < 1 ? 1 : (chunks > 65535 ? 65535 : chunks);
  const int64_t rows_per_block = (N + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(chunks));
  int shift = 0;
  while ((1 << shift) < row_group_width(Ds)) ++shift;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_private) {
      segment_sum_kernel<src_t, float, index_t, kSkipInvalid, kCount, true>
          <<<grid, kThreads, private_bytes(K, Ds), stream>>>(src, codes, out, counts, N, static_cast<int>(M),
                                                             static_cast<int>(K), static_cast<int>(Ds),
                                                             rows_per_block, shift);
      return;
    }
  }
  segment_sum_kernel<src_t, acc_t, index_t, kSkipInvalid, kCount, false>
      <<<grid, kThreads, 0, stream>>>(src, codes, out, counts, N, static_cast<int>(M), static_cast<int>(K),
                                      static_cast<int>(Ds), rows_per_block, shift);
}

}  // namespace equss::cuda::segsum

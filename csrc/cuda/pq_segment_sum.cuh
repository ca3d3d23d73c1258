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
// (fp64 accumulation), every element goes straight to a global atomic (float4 atomics on sm_90 when
// Ds % 4 == 0).
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

// Elements [d, d + kRowElems) of a row (zeros past Ds or when !ok); kVec4: one 16-byte load (fp32 rows with
// Ds % 4 == 0 and a 16-byte aligned base).
template <bool kVec4, typename acc_t, typename src_t>
__device__ __forceinline__ void load_elems(acc_t (&v)[kRowElems], const src_t* row, int d, int Ds, bool ok) {
  if constexpr (kVec4) {
    static_assert(std::is_same_v<src_t, float> && kRowElems == 4, "float4 rows");
    float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
    if (ok && d < Ds) q = __ldg(reinterpret_cast<const float4*>(row + d));
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
#pragma unroll
    for (int e = 0; e < kRowElems; ++e) v[e] = (ok && d + e < Ds) ? to_acc<acc_t>(load_ro(row + d + e)) : acc_t(0);
  }
}

// o[d + e] += v[e] for the elements inside the row. Into global fp32 memory on sm_90 with Ds % 4 == 0 (then
// o + d is 16-byte aligned: a fresh output, offsets in whole float4s): one vector atomic (RED.F32x4).
template <bool kGlobal, typename acc_t>
__device__ __forceinline__ void add_elems(acc_t* o, int d, int Ds, const acc_t (&v)[kRowElems]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kGlobal && std::is_same_v<acc_t, float> && kRowElems == 4) {
    if ((Ds & 3) == 0) {
      if (d < Ds) atomicAdd(reinterpret_cast<float4*>(o + d), make_float4(v[0], v[1], v[2], v[3]));
      return;
    }
  }
#endif
#pragma unroll
  for (int e = 0; e < kRowElems; ++e) {
    if (d + e < Ds) atomicAdd(o + d + e, v[e]);
  }
}

// At least 4 blocks per SM (<= 64 registers): with the thread count alone ptxas aims at 32 registers and
// spills in the half/bf16 variants.
template <typename src_t, typename acc_t, typename index_t, bool kSkipInvalid, bool kCount, bool kPrivate, bool kVec4>
__global__ void __launch_bounds__(kThreads, 4)
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

  // Row groups of G lanes, kRowElems consecutive elements per lane (device_utils.cuh): a warp covers
  // 32 / G rows, e.g. 4 rows of Ds = 32 (one float4 per lane).
  const int G = 1 << group_shift;
  const int group = tid >> group_shift;
  const int d0 = (tid & (G - 1)) * kRowElems;  // this lane's first element of every chunk
  const int chunk = kRowElems * G;
  const int rows_per_pass = kThreads >> group_shift;
  // Uniform trip count over the block: every lane reaches the shuffles of group_sum.
  for (int64_t nb = n_begin; nb < n_end; nb += rows_per_pass) {
    const int64_t n = nb + group;
    const bool active = n < n_end;
    const int64_t k = active ? static_cast<int64_t>(codes[n * M + m]) : -1;
    const bool in_range = k >= 0 && k < K;
    const src_t* row = src + (n * M + m) * Ds;
    // The first chunk (all of the row when Ds <= 4·32) is loaded once and kept in registers; further
    // chunks are loaded again for the add (L1 hits).
    acc_t v[kRowElems];
    load_elems<kVec4>(v, row, d0, Ds, in_range);
    bool keep = in_range;
    if constexpr (kSkipInvalid) {
      float sq = 0.f;
#pragma unroll
      for (int e = 0; e < kRowElems; ++e) sq = fmaf(v[e], v[e], sq);
      if (in_range) {
        for (int c = chunk; c < Ds; c += chunk) {
          acc_t u[kRowElems];
          load_elems<kVec4>(u, row, c + d0, Ds, true);
#pragma unroll
          for (int e = 0; e < kRowElems; ++e) sq = fmaf(u[e], u[e], sq);
        }
      }
      sq = group_sum(sq, G);
      keep = in_range && isfinite(sq);
    }
    if (keep) {
      acc_t* o = kPrivate ? reinterpret_cast<acc_t*>(acc_s) + k * Ds : out_m + k * Ds;
      add_elems<!kPrivate>(o, d0, Ds, v);
      for (int c = chunk; c < Ds; c += chunk) {
        acc_t u[kRowElems];
        load_elems<kVec4>(u, row, c + d0, Ds, true);
        add_elems<!kPrivate>(o, c + d0, Ds, u);
      }
      if (kCount && d0 == 0) {
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
  const int shift = row_group_shift(Ds);
  // float4 loads for fp32 rows of whole float4s at a 16-byte aligned base.
  const bool vec4 = std::is_same_v<src_t, float> && Ds % 4 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  auto go = [&](auto private_tag, auto vec_tag) {
    constexpr bool kP = decltype(private_tag)::value;
    constexpr bool kV = decltype(vec_tag)::value;
    segment_sum_kernel<src_t, acc_t, index_t, kSkipInvalid, kCount, kP, kV>
        <<<grid, kThreads, kP ? private_bytes(K, Ds) : 0, stream>>>(src, codes, out, counts, N, static_cast<int>(M),
                                                                   static_cast<int>(K), static_cast<int>(Ds),
                                                                   rows_per_block, shift);
  };
  using T = std::true_type;
  using F = std::false_type;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (use_private) {
      if constexpr (std::is_same_v<src_t, float>) {
        if (vec4) return go(T{}, T{});
      }
      return go(T{}, F{});
    }
  }
  if constexpr (std::is_same_v<src_t, float>) {
    if (vec4) return go(F{}, T{});
  }
  go(F{}, F{});
}

}  // namespace equss::cuda::segsum

// The row-copy kernel of pq_gather on CUDA (torch-free): out[n, m, :] = codebooks[m, codes[n, m], :].
//
// Grid (M, row chunks) of kThreads threads: block (m, c) walks rows n of subspace m (grid-stride in n), a
// group of L lanes per row (L = power of two >= min(units per row, 32)). A row is copied in units of vec_t
// (16, 8, 4 or 2 bytes: the widest that divides the row's bytes and both base addresses, chosen by the
// host), so the fp32 Ds = 32 row is 8 LDG.128 + 8 STG.128 by 8 lanes. No per-element division: m is the
// block's, n the loop's. A code outside [0, K) reads nothing and writes a zero row.
#pragma once

#include "cuda/device_utils.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace equss::cuda::gather {

constexpr int kThreads = 256;

template <typename index_t, typename vec_t>
__global__ void __launch_bounds__(kThreads)
    pq_gather_kernel(const index_t* __restrict__ codes, const vec_t* __restrict__ codebooks, vec_t* __restrict__ out,
                     int64_t N, int M, int64_t K, int row_vecs, int lane_shift) {
  const int tid = threadIdx.x;
  const int m = blockIdx.x;
  const int rl = tid >> lane_shift;
  const int lv = tid & ((1 << lane_shift) - 1);
  const int lanes = 1 << lane_shift;
  const int rows_per_block = kThreads >> lane_shift;
  const vec_t* cb_m = codebooks + static_cast<int64_t>(m) * K * row_vecs;
  for (int64_t n = static_cast<int64_t>(blockIdx.y) * rows_per_block + rl; n < N;
       n += static_cast<int64_t>(gridDim.y) * rows_per_block) {
    const int64_t i = n * M + m;
    const int64_t k = static_cast<int64_t>(codes[i]);
    const bool in_range = k >= 0 && k < K;
    const vec_t* src = cb_m + (in_range ? k : 0) * row_vecs;
    vec_t* dst = out + i * row_vecs;
    for (int v = lv; v < row_vecs; v += lanes) dst[v] = in_range ? src[v] : vec_t{};
  }
}

// codes [N, M], codebooks [M, K, row_vecs] and out [N, M, row_vecs] in units of vec_t; `sms` sizes the grid
// (about 8 blocks per SM, each thread then copies several rows).
template <typename index_t, typename vec_t>
void launch(const index_t* codes, const vec_t* codebooks, vec_t* out, int64_t N, int64_t M, int64_t K,
            int64_t row_vecs, int sms, cudaStream_t stream) {
  const int lanes = row_group_width(row_vecs);
  int shift = 0;
  while ((1 << shift) < lanes) ++shift;
  const int64_t rows_per_block = kThreads / lanes;
  int64_t chunks = (8 * static_cast<int64_t>(sms) + M - 1) / M;
  const int64_t need = (N + rows_per_block - 1) / rows_per_block;
  chunks = chunks < need ? chunks : need;
  chunks = chunks < 1 ? 1 : (chunks > 65535 ? 65535 : chunks);
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(chunks));
  pq_gather_kernel<index_t, vec_t><<<grid, kThreads, 0, stream>>>(codes, codebooks, out, N, static_cast<int>(M), K,
                                                                 static_cast<int>(row_vecs), shift);
}

}  // namespace equss::cuda::gather

// Scatter-add of [N, M, Ds] rows into [M, K, Ds] by code with atomics, shared by pq_gather_backward and
// pq_cluster_stats on CUDA. One element per thread (grid-stride, int64 indices); the thread with d == 0
// also counts the row when `counts` is given. Sums are fp32 (or fp64) atomics, so their rounding depends
// on the order of arrival: not bit-reproducible, within N·eps of the exact sum. Counts are exact below
// 2^24. A code outside [0, K) contributes nothing (equss/ops/reference.py); callers that must also skip
// invalid rows pass their codes as -1.
#pragma once

#include "cuda/launch.cuh"

#include <c10/macros/Macros.h>

namespace equss::cuda {

template <typename src_t, typename acc_t, typename index_t>
__global__ void segment_sum_by_code_kernel(const src_t* __restrict__ src, const index_t* __restrict__ codes,
                                           acc_t* __restrict__ out, float* __restrict__ counts, int64_t total,
                                           int64_t M, int64_t K, int64_t Ds) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t nm = i / Ds;
    const int64_t d = i - nm * Ds;
    const int64_t m = nm % M;
    const int64_t k = static_cast<int64_t>(codes[nm]);
    if (k < 0 || k >= K) continue;
    atomicAdd(out + (m * K + k) * Ds + d, static_cast<acc_t>(src[i]));
    if (counts != nullptr && d == 0) atomicAdd(counts + m * K + k, 1.f);
  }
}

}  // namespace equss::cuda

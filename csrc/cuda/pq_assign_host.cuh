// Host side shared by pq_assign and pq_assign_gather on CUDA: the size limits of the tile kernel and the
// packed fp32 codebooks it reads (pq_assign_tile.cuh).
#pragma once

#include "cuda/launch.cuh"
#include "cuda/pq_assign_tile.cuh"

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

namespace equss::cuda {

// The tile kernel takes M, K and Ds as int and runs ceil(N / 128)·M blocks on a 1-D grid.
inline void check_assign_sizes(const char* op, int64_t N, int64_t M, int64_t K, int64_t Ds) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(K <= kMax, op, ": K=", K, " does not fit int32 codes");
  TORCH_CHECK(M <= kMax && Ds <= kMax - assign::kDStep, op, ": M=", M, " or Ds=", Ds, " exceeds 2^31 - 1");
  TORCH_CHECK((N + assign::kBM - 1) / assign::kBM * M <= kMax, op, ": N=", N, " × M=", M,
              " needs more than 2^31 - 1 CUDA blocks of ", assign::kBM, " rows");
  TORCH_CHECK(assign::num_k_tiles(K) * assign::num_d_chunks(Ds) <= kMax, op, ": K=", K, " × Ds=", Ds,
              " needs more than 2^31 - 1 pipeline stages");
}

// codebooks [M, K, Ds] (any float dtype) -> w [M, n_kt, Dp, 128] and bias [M, n_kt·128] (fp32, on the current
// stream): W = -2c (l2) or -c (dot), bias = ||c||² (l2) or 0; invalid and padding codewords W = 0, bias = +inf.
struct PackedCodebooks {
  at::Tensor w;
  at::Tensor bias;
};
PackedCodebooks pack_codebooks(const at::Tensor& codebooks, bool l2, cudaStream_t stream);

}  // namespace equss::cuda

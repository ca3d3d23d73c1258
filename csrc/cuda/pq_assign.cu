// pq_assign on CUDA: fused distance + running argmin, the N×M×K distance tensor is never written.
//
// Grid (ceil(N / kRows), M): a block owns kRows rows of one subspace, one row per thread. Codewords are
// visited in tiles of kTileK; the fp32 codebook tile (converted from any input dtype) and the block's x
// tile live in shared memory, kTileD dims at a time. Every thread reads the same codebook element at
// once (a shared-memory broadcast) and its own x row from a padded tile (no bank conflicts), and keeps
// kTileK fp32 dot products in registers. Distances: l2 = ||c||² − 2·x·c (||c||² precomputed in fp32,
// ||x||² added to the minimum and clamped at 0), dot = −x·c. The running minimum uses a strict `<` from
// +inf with index 0, visiting k in increasing order: ties keep the lowest index and NaN never wins.
// Invalid codewords get a +inf bias, invalid rows code 0 and min_dist NaN (equss/ops/reference.py).
#include "checks.h"
#include "cuda/launch.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <limits>

namespace equss::cuda {
namespace {

constexpr int kRows = 128;  // threads per block = rows per block
constexpr int kTileK = 32;  // codewords per tile (accumulators per thread)
constexpr int kTileD = 32;  // dims per shared-memory tile

template <typename scalar_t, bool kL2>
__global__ void __launch_bounds__(kRows)
    pq_assign_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ codebooks,
                     const float* __restrict__ c_sq, int32_t* __restrict__ codes, float* __restrict__ min_dist,
                     int64_t N, int64_t M, int64_t K, int64_t Ds) {
  __shared__ float xs[kRows][kTileD + 1];  // +1: row r starts in bank r % 32
  __shared__ float cs[kTileK][kTileD];
  __shared__ float bias[kTileK];

  const int tid = threadIdx.x;
  const int64_t m = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t n = row0 + tid;
  const int64_t x_row_stride = M * Ds;
  const bool x_fits_one_tile = Ds <= kTileD;  // then the x tile is loaded once, not per codeword tile

  float best = INFINITY;
  int32_t best_k = 0;
  float x_sq = 0.f;

  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    float acc[kTileK];
#pragma unroll
    for (int j = 0; j < kTileK; ++j) acc[j] = 0.f;

    for (int64_t d0 = 0; d0 < Ds; d0 += kTileD) {
      const int64_t dn = Ds - d0 < kTileD ? Ds - d0 : kTileD;
      __syncthreads();  // the previous tiles are fully consumed before they are overwritten
      if (!x_fits_one_tile || k0 == 0) {
        // Consecutive threads read consecutive dims of one row: coalesced.
        for (int e = tid; e < kRows * kTileD; e += kRows) {
          const int r = e / kTileD, dd = e % kTileD;
          const int64_t nn = row0 + r;
          xs[r][dd] = (nn < N && dd < dn) ? static_cast<float>(x[nn * x_row_stride + m * Ds + d0 + dd]) : 0.f;
        }
      }
      for (int e = tid; e < kTileK * kTileD; e += kRows) {
        const int j = e / kTileD, dd = e % kTileD;
        const int64_t k = k0 + j;
        cs[j][dd] = (k < K && dd < dn) ? static_cast<float>(codebooks[(m * K + k) * Ds + d0 + dd]) : 0.f;
      }
      if (d0 == 0 && tid < kTileK) {
        // An invalid codeword (non-finite fp32 ||c||²) gets +inf and never wins (reference.py).
        const float cn = k0 + tid < K ? c_sq[m * K + k0 + tid] : INFINITY;
        bias[tid] = isfinite(cn) ? (kL2 ? cn : 0.f) : INFINITY;
      }
      __syncthreads();

      if (k0 == 0) {
        for (int dd = 0; dd < dn; ++dd) x_sq = fmaf(xs[tid][dd], xs[tid][dd], x_sq);
      }
      for (int dd = 0; dd < dn; ++dd) {
        const float xv = xs[tid][dd];
#pragma unroll
        for (int j = 0; j < kTileK; ++j) acc[j] = fmaf(xv, cs[j][dd], acc[j]);
      }
    }

#pragma unroll
    for (int j = 0; j < kTileK; ++j) {
      if (k0 + j < K) {
        const float dist = kL2 ? fmaf(-2.f, acc[j], bias[j]) : bias[j] - acc[j];
        if (dist < best) {
          best = dist;
          best_k = static_cast<int32_t>(k0 + j);
        }
      }
    }
  }

  if (n < N) {
    float out = best;
    if (kL2) {
      out += x_sq;
      out = out < 0.f ? 0.f : out;  // the expanded form can round below 0
    }
    const bool valid = isfinite(x_sq);  // an invalid row: code 0, min_dist NaN (reference.py)
    codes[n * M + m] = valid ? best_k : 0;
    min_dist[n * M + m] = valid ? out : NAN;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pq_assign(const at::Tensor& x, const at::Tensor& codebooks,
                                             c10::string_view metric) {
  constexpr const char* op = "pq_assign";
  check_x_codebooks(x, codebooks, op);
  check_cuda_tensors(op, {&x, &codebooks});
  const bool l2 = parse_metric(metric, op);
  const int64_t N = x.size(0), M = x.size(1), K = codebooks.size(1), Ds = x.size(2);
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(), op, ": K=", K, " does not fit int32 codes");
  TORCH_CHECK(M <= 65535, op, ": M=", M, " exceeds the CUDA grid's y limit (65535)");
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto codes = at::empty({N, M}, x.options().dtype(at::kInt));
  auto min_dist = at::empty({N, M}, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return {codes, min_dist};
  // ||c||² in fp32 of the fp32-rounded codewords, like (cb.float() ** 2).sum(-1) in the reference (also
  // for "dot": it marks invalid codewords); ATen runs it on the current stream.
  const at::Tensor c_sq = codebooks.to(at::kFloat).square().sum(-1).contiguous();
  const dim3 grid(static_cast<unsigned int>((N + kRows - 1) / kRows), static_cast<unsigned int>(M));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equss_pq_assign_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* cp = codebooks.const_data_ptr<scalar_t>();
    int32_t* codes_p = codes.mutable_data_ptr<int32_t>();
    float* dist_p = min_dist.mutable_data_ptr<float>();
    const float* cq = c_sq.const_data_ptr<float>();
    if (l2) {
      pq_assign_kernel<scalar_t, true><<<grid, kRows, 0, stream>>>(xp, cp, cq, codes_p, dist_p, N, M, K, Ds);
    } else {
      pq_assign_kernel<scalar_t, false><<<grid, kRows, 0, stream>>>(xp, cp, cq, codes_p, dist_p, N, M, K, Ds);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, min_dist};
}

}  // namespace equss::cuda

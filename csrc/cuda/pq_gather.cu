// pq_gather on CUDA: out[n, m, d] = codebooks[m, codes[n, m], d], one element per thread (grid-stride,
// int64 indices). A code outside [0, K) (only when the caller skipped the range check) is never
// dereferenced: the element is written as 0 (equss/ops/reference.py).
#include "checks.h"
#include "cuda/launch.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace equss::cuda {
namespace {

template <typename scalar_t, typename index_t>
__global__ void pq_gather_kernel(const index_t* __restrict__ codes, const scalar_t* __restrict__ codebooks,
                                 scalar_t* __restrict__ out, int64_t total, int64_t M, int64_t K, int64_t Ds) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t nm = i / Ds;
    const int64_t d = i - nm * Ds;
    const int64_t m = nm % M;
    const int64_t k = static_cast<int64_t>(codes[nm]);
    out[i] = (k >= 0 && k < K) ? codebooks[(m * K + k) * Ds + d] : scalar_t(0);
  }
}

}  // namespace

at::Tensor pq_gather(const at::Tensor& codes, const at::Tensor& codebooks) {
  constexpr const char* op = "pq_gather";
  check_float_tensor(codebooks, "codebooks", op, 3);
  check_codes(codes, op, -1, codebooks.size(0));
  check_cuda_tensors(op, {&codebooks, &codes});
  const c10::cuda::CUDAGuard device_guard(codebooks.device());
  const int64_t N = codes.size(0), M = codebooks.size(0), K = codebooks.size(1), Ds = codebooks.size(2);
  auto out = at::empty({N, M, Ds}, codebooks.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "equss_pq_gather_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebooks.scalar_type(), "equss_pq_gather_cuda", [&] {
      pq_gather_kernel<scalar_t, index_t><<<grid_stride_blocks(total), kThreads, 0, stream>>>(
          codes.const_data_ptr<index_t>(), codebooks.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          total, M, K, Ds);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace equss::cuda

// pq_cluster_stats on CUDA: counts [M, K] and sums [M, K, Ds] (fp32) of the rows assigned to each codeword,
// by fp32 atomics; see pq_segment_sum.cuh.
#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/pq_segment_sum.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace equss::cuda {

std::tuple<at::Tensor, at::Tensor> pq_cluster_stats(const at::Tensor& x, const at::Tensor& codes, int64_t K) {
  constexpr const char* op = "pq_cluster_stats";
  check_float_tensor(x, "x", op, 3);
  check_codes(codes, op, x.size(0), x.size(1));
  check_cuda_tensors(op, {&x, &codes});
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t M = x.size(1), Ds = x.size(2);
  auto counts = at::zeros({M, K}, x.options().dtype(at::kFloat));
  auto sums = at::zeros({M, K, Ds}, x.options().dtype(at::kFloat));
  const int64_t total = x.numel();
  if (total == 0) return {counts, sums};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Invalid rows (non-finite fp32 squared norm) enter no count or sum: their code becomes -1.
  const at::Tensor valid = at::isfinite(x.to(at::kFloat).square().sum(-1));
  const at::Tensor kept = at::where(valid, codes, at::full({}, -1, codes.options())).contiguous();
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "equss_pq_cluster_stats_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equss_pq_cluster_stats_cuda", [&] {
      // Each element is converted to fp32 before it is added, like x.float() in the reference.
      segment_sum_by_code_kernel<scalar_t, float, index_t><<<grid_stride_blocks(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), kept.const_data_ptr<index_t>(), sums.mutable_data_ptr<float>(),
          counts.mutable_data_ptr<float>(), total, M, K, Ds);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {counts, sums};
}

}  // namespace equss::cuda

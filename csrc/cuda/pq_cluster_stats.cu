// pq_cluster_stats on CUDA: counts [M, K] and sums [M, K, Ds] (fp32) of the rows assigned to each codeword.
// One kernel: each block accumulates its rows of one subspace in a shared-memory copy of counts[m] and
// sums[m] (global atomics when K·Ds does not fit) and skips invalid rows (non-finite fp32 ||x||², tested
// from the same loads) and codes outside [0, K) in-kernel. See pq_segment_sum.cuh.
#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/pq_segment_sum.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

namespace equss::cuda {

std::tuple<at::Tensor, at::Tensor> pq_cluster_stats(const at::Tensor& x, const at::Tensor& codes, int64_t K) {
  constexpr const char* op = "pq_cluster_stats";
  check_float_tensor(x, "x", op, 3);
  check_codes(codes, op, x.size(0), x.size(1));
  check_cuda_tensors(op, {&x, &codes});
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t N = x.size(0), M = x.size(1), Ds = x.size(2);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(M <= kMax && K <= kMax && Ds <= kMax, op, ": M=", M, ", K=", K, " and Ds=", Ds, " must be < 2^31");
  auto counts = at::zeros({M, K}, x.options().dtype(at::kFloat));
  auto sums = at::zeros({M, K, Ds}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {counts, sums};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = 8 * static_cast<int64_t>(num_sms());
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "equss_pq_cluster_stats_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equss_pq_cluster_stats_cuda", [&] {
      // Each element is converted to fp32 before it is added, like x.float() in the reference.
      segsum::launch<storage_t<scalar_t>, float, index_t, true, true>(
          storage_ptr<scalar_t>(x), codes.const_data_ptr<index_t>(), sums.mutable_data_ptr<float>(),
          counts.mutable_data_ptr<float>(), N, M, K, Ds, blocks, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {counts, sums};
}

}  // namespace equss::cuda

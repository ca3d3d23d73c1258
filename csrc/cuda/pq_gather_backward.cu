// pq_gather_backward on CUDA: grad_codebooks[m, k, :] = Σ grad_out[n, m, :] over rows with code k. fp32
// accumulation in a shared-memory copy of grad_codebooks[m] per block (global atomics when K·Ds does not
// fit), fp64 global atomics for float64 gradients; codes outside [0, K) add nothing. See pq_segment_sum.cuh.
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

at::Tensor pq_gather_backward(const at::Tensor& grad_out, const at::Tensor& codes, int64_t K) {
  constexpr const char* op = "pq_gather_backward";
  check_float_tensor(grad_out, "grad_out", op, 3);
  check_codes(codes, op, grad_out.size(0), grad_out.size(1));
  check_cuda_tensors(op, {&grad_out, &codes});
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const int64_t N = grad_out.size(0), M = grad_out.size(1), Ds = grad_out.size(2);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(M <= kMax && K <= kMax && Ds <= kMax, op, ": M=", M, ", K=", K, " and Ds=", Ds, " must be < 2^31");
  const auto acc_dtype = gather_backward_acc_dtype(grad_out.scalar_type());
  auto grad = at::zeros({M, K, Ds}, grad_out.options().dtype(acc_dtype));
  if (grad_out.numel() == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = 8 * static_cast<int64_t>(num_sms());
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "equss_pq_gather_backward_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "equss_pq_gather_backward_cuda",
                                    [&] {
                                      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
                                      segsum::launch<storage_t<scalar_t>, acc_t, index_t, false, false>(
                                          storage_ptr<scalar_t>(grad_out), codes.const_data_ptr<index_t>(),
                                          grad.mutable_data_ptr<acc_t>(), nullptr, N, M, K, Ds, blocks, stream);
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
  });
  return grad;
}

}  // namespace equss::cuda

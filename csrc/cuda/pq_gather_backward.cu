// pq_gather_backward on CUDA: grad_codebooks[m, k, :] = Σ grad_out[n, m, :] over rows with code k, by fp32
// atomics (fp64 atomics for float64 gradients); see pq_segment_sum.cuh.
#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/pq_segment_sum.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace equss::cuda {

at::Tensor pq_gather_backward(const at::Tensor& grad_out, const at::Tensor& codes, int64_t K) {
  constexpr const char* op = "pq_gather_backward";
  check_float_tensor(grad_out, "grad_out", op, 3);
  check_codes(codes, op, grad_out.size(0), grad_out.size(1));
  check_cuda_tensors(op, {&grad_out, &codes});
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const int64_t M = grad_out.size(1), Ds = grad_out.size(2);
  const auto acc_dtype = gather_backward_acc_dtype(grad_out.scalar_type());
  auto grad = at::zeros({M, K, Ds}, grad_out.options().dtype(acc_dtype));
  const int64_t total = grad_out.numel();
  if (total == 0) return grad;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "equss_pq_gather_backward_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "equss_pq_gather_backward_cuda",
                                    [&] {
                                      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
                                      segment_sum_by_code_kernel<scalar_t, acc_t, index_t>
                                          <<<grid_stride_blocks(total), kThreads, 0, stream>>>(
                                              grad_out.const_data_ptr<scalar_t>(), codes.const_data_ptr<index_t>(),
                                              grad.mutable_data_ptr<acc_t>(), nullptr, total, M, K, Ds);
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
  });
  return grad;
}

}  // namespace equss::cuda

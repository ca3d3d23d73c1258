// pq_gather_backward on CPU: grad_codebooks[m, k, :] = sum of grad_out[n, m, :] over rows n with code k.
// Accumulates in fp32 (fp64 for float64 gradients, so gradcheck is exact); deterministic, see pq_segment_sum.h.
#include "checks.h"
#include "ops.h"
#include "cpu/pq_segment_sum.h"

#include <ATen/Dispatch.h>

namespace equss::cpu {

at::Tensor pq_gather_backward(const at::Tensor& grad_out, const at::Tensor& codes, int64_t K) {
  constexpr const char* op = "pq_gather_backward";
  check_float_tensor(grad_out, "grad_out", op, 3);
  check_codes(codes, op, grad_out.size(0), grad_out.size(1));
  check_same_device(op, grad_out, "grad_out", codes, "codes");
  TORCH_CHECK(grad_out.device().is_cpu(), op, ": expected CPU tensors, got ", grad_out.device());
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  const int64_t N = grad_out.size(0), M = grad_out.size(1), Ds = grad_out.size(2);
  const auto acc_dtype = gather_backward_acc_dtype(grad_out.scalar_type());
  auto grad = at::zeros({M, K, Ds}, grad_out.options().dtype(acc_dtype));
  if (N == 0 || grad.numel() == 0) return grad;
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "equss_pq_gather_backward_cpu", [&] {
    const index_t* c = codes.const_data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "equss_pq_gather_backward_cpu",
                                    [&] {
                                      if (acc_dtype == at::kDouble) {
                                        segment_sum_by_code(grad_out.const_data_ptr<scalar_t>(), c, N, M, K, Ds,
                                                            grad.mutable_data_ptr<double>(), nullptr, false);
                                      } else {
                                        segment_sum_by_code(grad_out.const_data_ptr<scalar_t>(), c, N, M, K, Ds,
                                                            grad.mutable_data_ptr<float>(), nullptr, false);
                                      }
                                    });
  });
  return grad;
}

}  // namespace equss::cpu

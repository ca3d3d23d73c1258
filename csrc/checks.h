// Argument checks shared by the CPU and CUDA implementations of the equss_C ops.
//
// The public Python wrappers (equss/ops/pq.py) already validate and make inputs contiguous, so these
// are cheap structural checks: they turn a misuse of torch.ops.equss_C.* into a clear error instead of
// an out-of-bounds access. Every message names the op and the shapes/dtypes it received.
#pragma once

#include <ATen/ATen.h>

#include <string_view>

namespace equss {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float_tensor(const at::Tensor& t, const char* name, const char* op, int64_t dim) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type(), " (shape ", t.sizes(), ")");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
}

inline void check_fp32_buffer(const at::Tensor& t, const char* name, const char* op, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (strides ", t.strides(), ")");
}

// codes [N, M], int32 or int64, contiguous.
inline void check_codes(const at::Tensor& codes, const char* op, int64_t N, int64_t M) {
  TORCH_CHECK(codes.defined(), op, ": codes is undefined");
  TORCH_CHECK(codes.scalar_type() == at::kInt || codes.scalar_type() == at::kLong, op,
              ": codes must be int32 or int64, got ", codes.scalar_type(), " (shape ", codes.sizes(), ")");
  TORCH_CHECK(codes.dim() == 2, op, ": codes must be [N, M], got shape ", codes.sizes());
  TORCH_CHECK(N < 0 || codes.size(0) == N, op, ": codes has N=", codes.size(0), " rows, expected N=", N);
  TORCH_CHECK(M < 0 || codes.size(1) == M, op, ": codes has M=", codes.size(1), " subspaces, expected M=", M);
  TORCH_CHECK(codes.is_contiguous(), op, ": codes must be contiguous (strides ", codes.strides(), ")");
}

// x [N, M, Ds] and codebooks [M, K, Ds] of one float dtype.
inline void check_x_codebooks(const at::Tensor& x, const at::Tensor& codebooks, const char* op) {
  check_float_tensor(x, "x", op, 3);
  check_float_tensor(codebooks, "codebooks", op, 3);
  TORCH_CHECK(x.size(1) == codebooks.size(0) && x.size(2) == codebooks.size(2), op, ": x [N, M, Ds] = ",
              x.sizes(), " does not match codebooks [M, K, Ds] = ", codebooks.sizes());
  TORCH_CHECK(codebooks.size(1) >= 1 && codebooks.size(2) >= 1, op,
              ": codebooks must have K, Ds >= 1, got shape ", codebooks.sizes());
  TORCH_CHECK(x.scalar_type() == codebooks.scalar_type(), op, ": x (", x.scalar_type(), ") and codebooks (",
              codebooks.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(x.device() == codebooks.device(), op, ": x is on ", x.device(), " but codebooks on ",
              codebooks.device());
}

// Returns true for "l2", false for "dot"; anything else is an error.
inline bool parse_metric(std::string_view metric, const char* op) {
  if (metric == "l2") return true;
  if (metric == "dot") return false;
  TORCH_CHECK(false, op, ": metric must be \"l2\" or \"dot\", got \"", std::string(metric), "\"");
  return false;
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " is on ", a.device(), " but ", b_name, " on ",
              b.device());
}

// The accumulation dtype of pq_gather_backward: float64 for float64 gradients (exact gradcheck), else fp32.
inline at::ScalarType gather_backward_acc_dtype(at::ScalarType grad_dtype) {
  return grad_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace equss

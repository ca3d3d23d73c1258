// Declarations of the per-device implementations of the equss_C ops (schemas in registration.cpp).
//
// Shapes (glossary in docs/method.md): x [N, M, Ds], codebooks [M, K, Ds], codes [N, M] int32/int64.
// Semantics are those of equss/ops/reference.py: int32 codes, fp32 accumulation, ties to the lowest
// index, in-range codes and non-finite min_dist for NaN/inf rows.
#pragma once

#include <ATen/ATen.h>

#include <c10/util/string_view.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace equss {

#define EQUSS_DECLARE_OPS                                                                                   \
  std::tuple<at::Tensor, at::Tensor> pq_assign(const at::Tensor& x, const at::Tensor& codebooks,            \
                                               c10::string_view metric);                                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pq_assign_gather(      \
      const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& codebooks_out,                    \
      c10::string_view metric, const std::optional<at::Tensor>& stats_x);                                   \
  at::Tensor pq_gather(const at::Tensor& codes, const at::Tensor& codebooks);                               \
  at::Tensor pq_gather_backward(const at::Tensor& grad_out, const at::Tensor& codes, int64_t K);            \
  std::tuple<at::Tensor, at::Tensor> pq_cluster_stats(const at::Tensor& x, const at::Tensor& codes,         \
                                                      int64_t K);                                           \
  void pq_ema_apply_(const at::Tensor& counts, const at::Tensor& sums, at::Tensor& cluster_size,            \
                     at::Tensor& embed_sum, at::Tensor& codebooks, double decay, double eps);

namespace cpu {
EQUSS_DECLARE_OPS
}  // namespace cpu

#ifdef EQUSS_WITH_CUDA
namespace cuda {
EQUSS_DECLARE_OPS
}  // namespace cuda
#endif

#undef EQUSS_DECLARE_OPS

}  // namespace equss

// pq_assign_gather on CUDA: codes, min_dist, quantized = codebooks_out[m, code], sq_err = ||x - quantized||²
// and the step's statistics (counts, and per-codeword sums of stats_x) in one op.
//
// Composed from this library's CUDA assign, gather and segment-sum kernels (three passes over x); the
// statistics leave out invalid rows of x (min_dist NaN) and of stats_x, as equss/ops/reference.py says.
#include "checks.h"
#include "cuda/launch.cuh"
#include "ops.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

namespace equss::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pq_assign_gather(
    const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& codebooks_out, c10::string_view metric,
    const std::optional<at::Tensor>& stats_x) {
  constexpr const char* op = "pq_assign_gather";
  check_x_codebooks(x, codebooks, op);
  check_float_tensor(codebooks_out, "codebooks_out", op, 3);
  TORCH_CHECK(codebooks_out.sizes() == codebooks.sizes(), op, ": codebooks_out ", codebooks_out.sizes(),
              " must match codebooks ", codebooks.sizes());
  check_cuda_tensors(op, {&x, &codebooks, &codebooks_out});
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t K = codebooks.size(1);
  auto [codes, min_dist] = pq_assign(x, codebooks, metric);
  at::Tensor quantized = pq_gather(codes, codebooks_out);
  at::Tensor sq_err = (x.to(at::kFloat) - quantized.to(at::kFloat)).square().sum(-1);
  // Rows the assignment found invalid (min_dist NaN) get code -1, which matches no codeword.
  const at::Tensor kept = at::where(at::isnan(min_dist), at::full({}, -1, codes.options()), codes).contiguous();
  if (stats_x.has_value()) {
    const at::Tensor& s = *stats_x;
    check_float_tensor(s, "stats_x", op, 3);
    TORCH_CHECK(s.sizes() == x.sizes(), op, ": stats_x ", s.sizes(), " must have the shape of x ", x.sizes());
    auto [counts, sums] = pq_cluster_stats(s, kept, K);
    return {codes, min_dist, quantized, sq_err, counts, sums};
  }
  auto [counts, sums] = pq_cluster_stats(x, kept, K);
  return {codes, min_dist, quantized, sq_err, counts, sums.narrow(2, 0, 0)};
}

}  // namespace equss::cuda

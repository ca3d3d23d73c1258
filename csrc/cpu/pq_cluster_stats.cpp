// pq_cluster_stats on CPU: per-codeword counts [M, K] and sums [M, K, Ds] (fp32) of the rows assigned to
// each codeword. Deterministic (see pq_segment_sum.h); x of any float dtype is converted to fp32 per element,
// like x.float() in the reference. Invalid rows and out-of-range codes enter neither (reference.py).
#include "checks.h"
#include "ops.h"
#include "cpu/pq_segment_sum.h"

#include <ATen/Dispatch.h>

namespace equss::cpu {

std::tuple<at::Tensor, at::Tensor> pq_cluster_stats(const at::Tensor& x, const at::Tensor& codes, int64_t K) {
  constexpr const char* op = "pq_cluster_stats";
  check_float_tensor(x, "x", op, 3);
  check_codes(codes, op, x.size(0), x.size(1));
  check_same_device(op, x, "x", codes, "codes");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors, got ", x.device());
  TORCH_CHECK(K >= 1, op, ": K must be >= 1, got ", K);
  const int64_t N = x.size(0), M = x.size(1), Ds = x.size(2);
  auto counts = at::zeros({M, K}, x.options().dtype(at::kFloat));
  auto sums = at::zeros({M, K, Ds}, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return {counts, sums};
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "equss_pq_cluster_stats_cpu", [&] {
    const index_t* c = codes.const_data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equss_pq_cluster_stats_cpu", [&] {
      // Each element is converted to fp32 before it is added (fp64 x rounds like x.float() does).
      segment_sum_by_code(x.const_data_ptr<scalar_t>(), c, N, M, K, Ds, sums.mutable_data_ptr<float>(),
                          counts.mutable_data_ptr<float>(), /*skip_invalid=*/true);
    });
  });
  return {counts, sums};
}

}  // namespace equss::cpu

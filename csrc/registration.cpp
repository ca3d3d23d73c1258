// The equss_C op library: schemas of every op (one place) and the per-device implementations.
//
// Loaded from Python with torch.ops.load_library(equss/_C.so) by equss/backends.py, which calls these ops
// from the bodies of the public equss:: custom ops (those carry the fake kernels and autograd), so only
// plain CPU/CUDA kernels are registered here. Shapes: x [N, M, Ds], codebooks [M, K, Ds], codes [N, M].
#include "ops.h"

#include <torch/library.h>

namespace {

bool has_cuda() {
#ifdef EQUSS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(equss_C, m) {
  // No tensor arguments, so it is registered for every dispatch key (catch-all).
  m.def("has_cuda() -> bool", &has_cuda);
  m.def("pq_assign(Tensor x, Tensor codebooks, str metric) -> (Tensor codes, Tensor min_dist)");
  m.def(
      "pq_assign_gather(Tensor x, Tensor codebooks, Tensor codebooks_out, str metric, Tensor? stats_x) -> "
      "(Tensor codes, Tensor min_dist, Tensor quantized, Tensor sq_err, Tensor counts, Tensor sums)");
  m.def("pq_gather(Tensor codes, Tensor codebooks) -> Tensor");
  m.def("pq_gather_backward(Tensor grad_out, Tensor codes, int K) -> Tensor");
  m.def("pq_cluster_stats(Tensor x, Tensor codes, int K) -> (Tensor counts, Tensor sums)");
  m.def(
      "pq_ema_apply_(Tensor counts, Tensor sums, Tensor(a!) cluster_size, Tensor(b!) embed_sum, "
      "Tensor(c!) codebooks, float decay, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(equss_C, CPU, m) {
  m.impl("pq_assign", &equss::cpu::pq_assign);
  m.impl("pq_assign_gather", &equss::cpu::pq_assign_gather);
  m.impl("pq_gather", &equss::cpu::pq_gather);
  m.impl("pq_gather_backward", &equss::cpu::pq_gather_backward);
  m.impl("pq_cluster_stats", &equss::cpu::pq_cluster_stats);
  m.impl("pq_ema_apply_", &equss::cpu::pq_ema_apply_);
}

#ifdef EQUSS_WITH_CUDA
TORCH_LIBRARY_IMPL(equss_C, CUDA, m) {
  m.impl("pq_assign", &equss::cuda::pq_assign);
  m.impl("pq_assign_gather", &equss::cuda::pq_assign_gather);
  m.impl("pq_gather", &equss::cuda::pq_gather);
  m.impl("pq_gather_backward", &equss::cuda::pq_gather_backward);
  m.impl("pq_cluster_stats", &equss::cuda::pq_cluster_stats);
  m.impl("pq_ema_apply_", &equss::cuda::pq_ema_apply_);
}
#endif

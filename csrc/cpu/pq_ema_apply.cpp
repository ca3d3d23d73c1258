// pq_ema_apply_ on CPU: EMA of the step statistics, Laplace smoothing and codebook renormalisation, in
// place, fused into one pass per subspace (parallel over subspaces). Mirrors pq_ema_apply_ref_:
//   cluster_size ← decay·cluster_size + (1 − decay)·counts
//   embed_sum    ← decay·embed_sum    + (1 − decay)·sums
//   smoothed_k   = (cluster_size_k + eps) / (n_tot + K·eps) · n_tot,   n_tot = Σ_k cluster_size_k
//   codebooks    ← embed_sum / smoothed   (only where n_tot > 0: a never-used subspace keeps its codebook)
// The scalars are rounded to fp32 the way torch rounds Python scalars, and `a + alpha·b` is one fma like
// torch's vectorised add_(…, alpha=…), so the buffers match the reference up to the order of the n_tot sum.
#include "checks.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace equss::cpu {

void pq_ema_apply_(const at::Tensor& counts, const at::Tensor& sums, at::Tensor& cluster_size,
                   at::Tensor& embed_sum, at::Tensor& codebooks, double decay, double eps) {
  constexpr const char* op = "pq_ema_apply_";
  check_float_tensor(codebooks, "codebooks", op, 3);
  TORCH_CHECK(codebooks.device().is_cpu(), op, ": expected CPU tensors, got ", codebooks.device());
  const int64_t M = codebooks.size(0), K = codebooks.size(1), Ds = codebooks.size(2);
  check_fp32_buffer(counts, "counts", op, {M, K});
  check_fp32_buffer(sums, "sums", op, {M, K, Ds});
  check_fp32_buffer(cluster_size, "cluster_size", op, {M, K});
  check_fp32_buffer(embed_sum, "embed_sum", op, {M, K, Ds});
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&counts, &sums, &cluster_size, &embed_sum}) {
    check_same_device(op, *t, "a statistics tensor", codebooks, "codebooks");
  }
  if (codebooks.numel() == 0) return;
  const float dec = static_cast<float>(decay);
  const float one_minus_dec = static_cast<float>(1.0 - decay);
  const float eps_f = static_cast<float>(eps);
  const float k_eps = static_cast<float>(static_cast<double>(K) * eps);
  const float* cnt = counts.const_data_ptr<float>();
  const float* sm = sums.const_data_ptr<float>();
  float* cs = cluster_size.mutable_data_ptr<float>();
  float* es = embed_sum.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebooks.scalar_type(), "equss_pq_ema_apply_cpu", [&] {
    scalar_t* cb = codebooks.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        float* cs_m = cs + m * K;
        float n_tot = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          cs_m[k] = std::fma(one_minus_dec, cnt[m * K + k], cs_m[k] * dec);
          n_tot += cs_m[k];
        }
        const bool renormalise = n_tot > 0.f;  // false for 0 and NaN, like torch.where(n_tot > 0, ...)
        const float denom = n_tot + k_eps;
        for (int64_t k = 0; k < K; ++k) {
          const float smoothed = (cs_m[k] + eps_f) / denom * n_tot;
          const int64_t base = (m * K + k) * Ds;
          for (int64_t d = 0; d < Ds; ++d) {
            const float e = std::fma(one_minus_dec, sm[base + d], es[base + d] * dec);
            es[base + d] = e;
            if (renormalise) cb[base + d] = static_cast<scalar_t>(e / smoothed);
          }
        }
      }
    });
  });
}

}  // namespace equss::cpu

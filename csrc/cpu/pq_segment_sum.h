// Deterministic scatter-add of [N, M, Ds] rows into [M, K, Ds] by code, shared by pq_gather_backward
// and pq_cluster_stats on CPU.
//
// Parallelism without atomics or per-thread copies: the work items are (subspace m, slice of Ds) pairs;
// each output element out[m, k, d] is owned by exactly one item, which adds its N contributions in
// increasing n. The result is therefore bit-identical for any thread count (and equals a sequential
// index_add_). When M alone cannot feed every thread, Ds is split into slices as well.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace equss::cpu {

// out[m, codes[n, m], d] += acc_t(src[n, m, d]); counts[m, k] (optional, float32) = #rows with code k.
// Codes outside [0, K) contribute nothing; with skip_invalid, neither do rows whose fp32 squared norm is
// not finite (the statistics' contract in equss/ops/reference.py; the gradient scatter keeps them).
template <typename code_t, typename src_t, typename acc_t>
void segment_sum_by_code(const src_t* src, const code_t* codes, int64_t N, int64_t M, int64_t K, int64_t Ds,
                         acc_t* out, float* counts, bool skip_invalid) {
  const int64_t threads = at::get_num_threads();
  const int64_t slices = M >= threads ? 1 : std::min<int64_t>(Ds, (threads + M - 1) / M);
  const int64_t slice_len = (Ds + slices - 1) / slices;
  at::parallel_for(0, M * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> hist;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / slices;
      const int64_t d0 = (item % slices) * slice_len;
      const int64_t d1 = std::min(Ds, d0 + slice_len);
      const bool count_here = counts != nullptr && d0 == 0;
      if (count_here) hist.assign(static_cast<size_t>(K), 0);
      acc_t* out_m = out + m * K * Ds;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t k = static_cast<int64_t>(codes[n * M + m]);
        if (k < 0 || k >= K) continue;
        const src_t* s = src + (n * M + m) * Ds;
        if (skip_invalid) {
          float sq = 0.f;
          for (int64_t d = 0; d < Ds; ++d) sq += static_cast<float>(s[d]) * static_cast<float>(s[d]);
          if (!std::isfinite(sq)) continue;
        }
        acc_t* o = out_m + k * Ds;
        for (int64_t d = d0; d < d1; ++d) o[d] += static_cast<acc_t>(s[d]);
        if (count_here) ++hist[static_cast<size_t>(k)];
      }
      if (count_here) {
        // Integer counts converted once: exact below 2^24, like bincount(...).float() in the reference.
        for (int64_t k = 0; k < K; ++k) counts[m * K + k] = static_cast<float>(hist[static_cast<size_t>(k)]);
      }
    }
  });
}

}  // namespace equss::cpu

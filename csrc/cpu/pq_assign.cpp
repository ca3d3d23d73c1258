// pq_assign on CPU: fused distance + argmin (the kernel and its layouts: pq_assign_kernel.h).
//
// Work items are chunks of rows with all their subspaces (chunk_rows_for: the chunk's fp32 copy stays in
// L2); the chunk x[n0:n1] is contiguous, so it is read once, front to back, converted to fp32 and
// transposed into 24-row tiles. Threads claim chunks dynamically (rows never interact, so the result is
// bit-identical for any thread count). fp16/bf16/fp64 inputs are converted to fp32 per element, like
// x.float() in the reference.
#include "checks.h"
#include "ops.h"
#include "cpu/pq_assign_impl.h"

#include <ATen/Dispatch.h>

#include <limits>
#include <vector>

namespace equss::cpu {
namespace {

template <typename scalar_t>
void assign_impl(const scalar_t* x, const scalar_t* cb, int64_t N, int64_t M, int64_t K, int64_t Ds, bool l2,
                 assign::Kernel kernel, int32_t* codes, float* min_dist) {
  assign::PackedCodebooks packed;
  assign::pack_codebooks(cb, M, K, Ds, l2, packed);
  const int64_t chunk_rows = assign::chunk_rows_for(M, Ds);
  const int64_t n_chunks = (N + chunk_rows - 1) / chunk_rows;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n_chunks);
  std::vector<assign::Workspace> ws(static_cast<size_t>(threads));
  assign::for_each_item(n_chunks, threads, [&](int64_t chunk, int64_t worker) {
    assign::Workspace& w = ws[static_cast<size_t>(worker)];
    if (w.best_k.empty()) w.reserve(chunk_rows, M, Ds, K, !std::is_same_v<scalar_t, float>);
    const int64_t n0 = chunk * chunk_rows;
    const int64_t rows = std::min(chunk_rows, N - n0);
    const int64_t rows_padded = (rows + assign::kTileRows - 1) / assign::kTileRows * assign::kTileRows;
    assign::load_chunk(x, M, Ds, n0, rows, 0, M, kernel, w);
    assign::assign_packed(packed, 0, M, rows, kernel, w);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t m = 0; m < M; ++m) {
        const int64_t out = (n0 + r) * M + m;
        assign::finish_row(w, m, rows_padded, r, l2, codes[out], min_dist[out]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> pq_assign(const at::Tensor& x, const at::Tensor& codebooks,
                                             c10::string_view metric) {
  constexpr const char* op = "pq_assign";
  check_x_codebooks(x, codebooks, op);
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors, got ", x.device());
  const bool l2 = parse_metric(metric, op);
  const int64_t N = x.size(0), M = x.size(1), K = codebooks.size(1), Ds = x.size(2);
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max() / 2, op, ": K=", K, " does not fit int32 codes");
  auto codes = at::empty({N, M}, x.options().dtype(at::kInt));
  auto min_dist = at::empty({N, M}, x.options().dtype(at::kFloat));
  const assign::Kernel kernel = assign::select_kernel(op);
  if (N == 0 || M == 0) return {codes, min_dist};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equss_pq_assign_cpu", [&] {
    assign_impl<scalar_t>(x.const_data_ptr<scalar_t>(), codebooks.const_data_ptr<scalar_t>(), N, M, K, Ds, l2,
                          kernel, codes.mutable_data_ptr<int32_t>(), min_dist.mutable_data_ptr<float>());
  });
  return {codes, min_dist};
}

}  // namespace equss::cpu

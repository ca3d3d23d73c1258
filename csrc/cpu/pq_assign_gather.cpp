// pq_assign_gather on CPU, one pass: codes, min_dist, quantized = codebooks_out[m, code],
// sq_err = ||x - quantized||² and the step's statistics (counts, and per-codeword sums of stats_x).
//
// Per chunk of rows (and a group of subspaces): convert + pack the rows (pq_assign_impl.h), assign them
// (the kernel of pq_assign, so codes and min_dist are bit-identical to pq_assign's), then, while the
// chunk is hot in cache, copy each winning codeword of codebooks_out into quantized, compute sq_err from
// the same fp32 rows and add the row to its codeword's count and sum. The statistics leave out invalid
// rows of x (min_dist NaN) and of stats_x (non-finite fp32 squared norm), as equss/ops/reference.py says.
//
// Determinism: work items are groups of subspaces and each item walks all rows in increasing order, so
// every sums[m, k, d] is the fp32 sum of its terms in row order (exactly what pq_cluster_stats, a
// sequential index_add_, computes), whichever thread runs the item. When there are fewer subspaces than
// threads, the op runs rows-parallel for everything but the statistics and then sums per (subspace, Ds
// slice), again in row order: bit-identical results for any thread count.
#include "checks.h"
#include "ops.h"
#include "cpu/pq_assign_impl.h"

#include <ATen/Dispatch.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace equss::cpu {
namespace {

// Per-row helpers, portable and AVX2: Σ_d (a[d] - b[d])² and Σ_d v[d]² in fp32 (any summation order is
// within the contract's bounds), and acc[d] += v[d] (elementwise, so both versions give the same bits).
struct RowOpsPortable {
  static float sq_diff(const float* a, const float* b, int64_t Ds) {
    float part[8] = {};
    int64_t d = 0;
    for (; d + 8 <= Ds; d += 8) {
      for (int j = 0; j < 8; ++j) {
        const float t = a[d + j] - b[d + j];
        part[j] += t * t;
      }
    }
    float s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (; d < Ds; ++d) s += (a[d] - b[d]) * (a[d] - b[d]);
    return s;
  }
  static float sq_norm(const float* v, int64_t Ds) {
    float part[8] = {};
    int64_t d = 0;
    for (; d + 8 <= Ds; d += 8) {
      for (int j = 0; j < 8; ++j) part[j] += v[d + j] * v[d + j];
    }
    float s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (; d < Ds; ++d) s += v[d] * v[d];
    return s;
  }
  static void add_row(float* acc, const float* v, int64_t Ds) {
    for (int64_t d = 0; d < Ds; ++d) acc[d] += v[d];
  }
};

#ifdef EQUSS_X86
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct RowOpsAvx2 {
  __attribute__((target("avx2,fma"))) static float sq_diff(const float* a, const float* b, int64_t Ds) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= Ds; d += 16) {
      const __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d));
      const __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8));
      s0 = _mm256_fmadd_ps(t0, t0, s0);
      s1 = _mm256_fmadd_ps(t1, t1, s1);
    }
    for (; d + 8 <= Ds; d += 8) {
      const __m256 t = _mm256_sub_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d));
      s0 = _mm256_fmadd_ps(t, t, s0);
    }
    float s = hsum(_mm256_add_ps(s0, s1));
    for (; d < Ds; ++d) s += (a[d] - b[d]) * (a[d] - b[d]);
    return s;
  }
  __attribute__((target("avx2,fma"))) static float sq_norm(const float* v, int64_t Ds) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= Ds; d += 16) {
      const __m256 t0 = _mm256_loadu_ps(v + d), t1 = _mm256_loadu_ps(v + d + 8);
      s0 = _mm256_fmadd_ps(t0, t0, s0);
      s1 = _mm256_fmadd_ps(t1, t1, s1);
    }
    for (; d + 8 <= Ds; d += 8) {
      const __m256 t = _mm256_loadu_ps(v + d);
      s0 = _mm256_fmadd_ps(t, t, s0);
    }
    float s = hsum(_mm256_add_ps(s0, s1));
    for (; d < Ds; ++d) s += v[d] * v[d];
    return s;
  }
  __attribute__((target("avx2,fma"))) static void add_row(float* acc, const float* v, int64_t Ds) {
    int64_t d = 0;
    for (; d + 8 <= Ds; d += 8) _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), _mm256_loadu_ps(v + d)));
    for (; d < Ds; ++d) acc[d] += v[d];
  }
};
#endif

// One row (Ds elements at element offset `offset`) of a float tensor of any dtype as fp32: the row itself
// for fp32, else converted into buf.
using RowToF32 = const float* (*)(const void* base, int64_t offset, int64_t Ds, float* buf);

template <typename T>
const float* row_to_f32(const void* base, int64_t offset, int64_t Ds, float* buf) {
  const T* p = static_cast<const T*>(base) + offset;
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    for (int64_t d = 0; d < Ds; ++d) buf[d] = static_cast<float>(p[d]);
    return buf;
  }
}

RowToF32 row_converter(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return &row_to_f32<float>;
    case at::kDouble: return &row_to_f32<double>;
    case at::kHalf: return &row_to_f32<at::Half>;
    case at::kBFloat16: return &row_to_f32<at::BFloat16>;
    default: TORCH_CHECK(false, "pq_assign_gather: unsupported dtype ", t);
  }
  return nullptr;
}

struct Outputs {
  int32_t* codes;
  float* min_dist;
  char* quantized;  // [N, M, Ds] in the dtype of codebooks_out
  float* sq_err;
  float* counts;  // [M, K]
  float* sums;    // [M, K, Ds] or nullptr without stats_x
};

struct Inputs {
  const char* cb_out;      // codebooks_out bytes
  size_t row_bytes;        // Ds · element size of codebooks_out
  const float* cb_out_f32; // codebooks_out as fp32 (sq_err)
  const void* stats;       // stats_x or nullptr
  RowToF32 stats_row;
};

// Per-thread state of the fused op.
struct Worker {
  assign::Workspace ws;
  std::vector<float> row_buf;
  std::vector<int64_t> hist;  // [S][K] of the current item
};

template <typename scalar_t>
void fused_impl(const scalar_t* x, const scalar_t* cb, const Inputs& in, int64_t N, int64_t M, int64_t K,
                int64_t Ds, bool l2, assign::Kernel kernel, const Outputs& out) {
  assign::PackedCodebooks packed;
  assign::pack_codebooks(cb, M, K, Ds, l2, packed);
  const int64_t threads_wanted = at::get_num_threads();
  const bool by_subspace = M >= threads_wanted;
  // Subspace groups: about two per thread (dynamic balance), each a contiguous piece of every row.
  const int64_t group = by_subspace ? std::max<int64_t>(1, M / (2 * threads_wanted)) : M;
  const int64_t n_groups = (M + group - 1) / group;
  const int64_t chunk_rows = assign::chunk_rows_for(group, Ds);
  const int64_t n_chunks = (N + chunk_rows - 1) / chunk_rows;
  const bool with_stats = in.stats != nullptr;
  // keep[n, m]: the row enters the statistics (only materialised on the rows-parallel path).
  std::vector<uint8_t> keep(by_subspace ? 0 : static_cast<size_t>(N * M));

  // Assigns rows [n0, n0 + rows) × subspaces [m0, m0 + S) and writes everything but the sums; the
  // statistics of each row go to `stat(s, row, code, stats_row)` when it is kept.
  auto process_chunk = [&](auto ops, Worker& wk, int64_t n0, int64_t rows, int64_t m0, int64_t S, auto&& stat) {
    using Ops = decltype(ops);
    assign::Workspace& ws = wk.ws;
    const int64_t rows_padded = (rows + assign::kTileRows - 1) / assign::kTileRows * assign::kTileRows;
    const auto [xf, stride] = assign::load_chunk(x, M, Ds, n0, rows, m0, S, kernel, ws);
    assign::assign_packed(packed, m0, S, rows, kernel, ws);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t m = m0 + s;
        const int64_t o = (n0 + r) * M + m;
        int32_t code;
        float md;
        assign::finish_row(ws, s, rows_padded, r, l2, code, md);
        out.codes[o] = code;
        out.min_dist[o] = md;
        const int64_t c = m * K + code;
        std::memcpy(out.quantized + o * in.row_bytes, in.cb_out + c * in.row_bytes, in.row_bytes);
        out.sq_err[o] = Ops::sq_diff(xf + r * stride + s * Ds, in.cb_out_f32 + c * Ds, Ds);
        if (std::isnan(md)) continue;  // an invalid row of x: in no count or sum
        const float* srow = nullptr;
        if (with_stats) {
          srow = in.stats_row(in.stats, o * Ds, Ds, wk.row_buf.data());
          if (!std::isfinite(Ops::sq_norm(srow, Ds))) continue;  // an invalid row of stats_x
        }
        stat(s, o, code, srow);
      }
    }
  };

  const int64_t threads = std::max<int64_t>(1, std::min(threads_wanted, by_subspace ? n_groups : n_chunks));
  std::vector<Worker> workers(static_cast<size_t>(threads));
  auto ready = [&](int64_t worker) -> Worker& {
    Worker& wk = workers[static_cast<size_t>(worker)];
    if (wk.ws.best_k.empty()) {
      wk.ws.reserve(chunk_rows, group, Ds, K, !std::is_same_v<scalar_t, float>);
      wk.row_buf.resize(static_cast<size_t>(Ds));
    }
    return wk;
  };

  // The passes, with the per-row helpers of the kernel's instruction set.
  auto run = [&](auto ops) {
    using Ops = decltype(ops);
    if (by_subspace) {
      assign::for_each_item(n_groups, threads, [&](int64_t item, int64_t worker) {
        Worker& wk = ready(worker);
        const int64_t m0 = item * group;
        const int64_t S = std::min(group, M - m0);
        wk.hist.assign(static_cast<size_t>(S * K), 0);
        for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
          const int64_t n0 = chunk * chunk_rows;
          process_chunk(ops, wk, n0, std::min(chunk_rows, N - n0), m0, S,
                        [&](int64_t s, int64_t, int32_t code, const float* srow) {
                          ++wk.hist[static_cast<size_t>(s * K + code)];
                          if (srow != nullptr) Ops::add_row(out.sums + ((m0 + s) * K + code) * Ds, srow, Ds);
                        });
        }
        // Integer counts converted once: exact below 2^24, like bincount(...).float() in the reference.
        for (int64_t i = 0; i < S * K; ++i) out.counts[m0 * K + i] = static_cast<float>(wk.hist[static_cast<size_t>(i)]);
      });
      return;
    }

    // Fewer subspaces than threads: rows-parallel pass, then the statistics per (subspace, Ds slice).
    assign::for_each_item(n_chunks, threads, [&](int64_t chunk, int64_t worker) {
      Worker& wk = ready(worker);
      const int64_t n0 = chunk * chunk_rows;
      const int64_t rows = std::min(chunk_rows, N - n0);
      process_chunk(ops, wk, n0, rows, 0, M, [&](int64_t, int64_t o, int32_t, const float*) { keep[o] = 1; });
    });
    const int64_t slices = with_stats ? std::min<int64_t>(Ds, (threads_wanted + M - 1) / M) : 1;
    const int64_t slice_len = (Ds + slices - 1) / slices;
    at::parallel_for(0, M * slices, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> hist;
      std::vector<float> buf(static_cast<size_t>(Ds));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t m = item / slices;
        const int64_t d0 = (item % slices) * slice_len;
        const int64_t d1 = std::min(Ds, d0 + slice_len);
        const bool count_here = d0 == 0;
        if (count_here) hist.assign(static_cast<size_t>(K), 0);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = n * M + m;
          if (!keep[o]) continue;
          const int32_t code = out.codes[o];
          if (count_here) ++hist[static_cast<size_t>(code)];
          if (!with_stats || d0 >= d1) continue;
          const float* srow = in.stats_row(in.stats, o * Ds, Ds, buf.data());
          float* acc = out.sums + (m * K + code) * Ds;
          for (int64_t d = d0; d < d1; ++d) acc[d] += srow[d];
        }
        if (count_here) {
          for (int64_t k = 0; k < K; ++k) out.counts[m * K + k] = static_cast<float>(hist[static_cast<size_t>(k)]);
        }
      }
    });
  };
#ifdef EQUSS_X86
  if (kernel == assign::Kernel::kAvx2) {
    run(RowOpsAvx2{});
    return;
  }
#endif
  run(RowOpsPortable{});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pq_assign_gather(
    const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& codebooks_out, c10::string_view metric,
    const std::optional<at::Tensor>& stats_x) {
  constexpr const char* op = "pq_assign_gather";
  check_x_codebooks(x, codebooks, op);
  check_float_tensor(codebooks_out, "codebooks_out", op, 3);
  TORCH_CHECK(codebooks_out.sizes() == codebooks.sizes(), op, ": codebooks_out ", codebooks_out.sizes(),
              " must match codebooks ", codebooks.sizes());
  TORCH_CHECK(x.device().is_cpu() && codebooks_out.device().is_cpu(), op, ": expected CPU tensors");
  const bool l2 = parse_metric(metric, op);
  if (stats_x.has_value()) {
    const at::Tensor& s = *stats_x;
    check_float_tensor(s, "stats_x", op, 3);
    TORCH_CHECK(s.sizes() == x.sizes(), op, ": stats_x ", s.sizes(), " must have the shape of x ", x.sizes());
    TORCH_CHECK(s.device().is_cpu(), op, ": expected CPU tensors");
  }
  const int64_t N = x.size(0), M = x.size(1), K = codebooks.size(1), Ds = x.size(2);
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max() / 2, op, ": K=", K, " does not fit int32 codes");
  auto codes = at::empty({N, M}, x.options().dtype(at::kInt));
  auto min_dist = at::empty({N, M}, x.options().dtype(at::kFloat));
  auto quantized = at::empty({N, M, Ds}, codebooks_out.options());
  auto sq_err = at::empty({N, M}, x.options().dtype(at::kFloat));
  auto counts = at::zeros({M, K}, x.options().dtype(at::kFloat));
  auto sums = at::zeros({M, K, stats_x.has_value() ? Ds : 0}, x.options().dtype(at::kFloat));
  const assign::Kernel kernel = assign::select_kernel(op);
  if (N == 0 || M == 0) return {codes, min_dist, quantized, sq_err, counts, sums};

  const at::Tensor cb_out_f32 = codebooks_out.to(at::kFloat).contiguous();
  Inputs in{static_cast<const char*>(codebooks_out.const_data_ptr()),
            static_cast<size_t>(Ds) * codebooks_out.element_size(), cb_out_f32.const_data_ptr<float>(),
            stats_x.has_value() ? stats_x->const_data_ptr() : nullptr,
            stats_x.has_value() ? row_converter(stats_x->scalar_type()) : nullptr};
  Outputs out{codes.mutable_data_ptr<int32_t>(), min_dist.mutable_data_ptr<float>(),
              static_cast<char*>(quantized.mutable_data_ptr()), sq_err.mutable_data_ptr<float>(),
              counts.mutable_data_ptr<float>(), stats_x.has_value() ? sums.mutable_data_ptr<float>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equss_pq_assign_gather_cpu", [&] {
    fused_impl<scalar_t>(x.const_data_ptr<scalar_t>(), codebooks.const_data_ptr<scalar_t>(), in, N, M, K, Ds, l2,
                         kernel, out);
  });
  return {codes, min_dist, quantized, sq_err, counts, sums};
}

}  // namespace equss::cpu

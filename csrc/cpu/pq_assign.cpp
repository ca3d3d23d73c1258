// pq_assign on CPU: fused distance + argmin, the N×M×K distance tensor is never materialised.
//
// For one subspace m the distance of row x to codeword k is written as
//     dist[k] = bias[k] + sum_d x[d] · W[d][k]
// with W = -2·c (l2: bias = ||c||², ||x||² is added to the minimum afterwards) or W = -c (dot: bias = 0).
// Scaling by -2 / -1 is exact, so each dist[k] is one chain of FMAs per codeword: bit-identical
// codewords give bit-identical distances and the strict `<` running minimum keeps the lowest index.
//
// Layout and blocking (AVX2 path):
//   * Codebooks are packed once per call into 16-codeword tiles W[m][tile][Ds][16] (fp32, converted
//     from any input dtype) plus bias[m][Kp] (Kp = K rounded up to 16). Padded codewords get W = 0 and
//     bias = +inf, so they can never win a strict `<` (inf + finite = inf, inf + NaN = NaN).
//   * Work items are chunks of rows with all their subspaces (at most kChunkBytes of fp32). The chunk
//     x[n0:n1] is contiguous, so it is read once, front to back (a per-subspace walk would touch one
//     128-byte piece per 4 KiB page and defeat the prefetchers), converted to fp32 and packed into
//     6-row tiles X[m][row tile][Ds][6] in an L2-resident buffer: the micro-kernel's 6 broadcasts per d
//     then come from one pointer at fixed offsets. The packed codebooks (1 MiB at M=32, K=256) stay in L3.
//   * Codewords are processed in K-blocks of whole tiles whose packed weights fit in kBlockBytes (L1);
//     for each K-block every 6-row tile of the chunk runs over the block's codeword tiles.
//   * The micro-kernel keeps 6 rows × 16 codewords = 12 ymm accumulators, 2 ymm codebook rows and one
//     broadcast of x (15 of 16 registers) and issues 12 FMAs per 2 loads + 6 broadcasts.
//   * The running minimum is lane-wise (8 lanes; lane j sees codewords j, j+8, j+16, ... in increasing
//     order, strict `<` keeps the first) and stored per row between codeword tiles (L1); a final
//     horizontal reduction picks the smallest value and, among equal values, the lowest index.
// Non-finite contract (equss/ops/reference.py): an invalid codeword (non-finite fp32 ||c||²) is packed
// with W = 0 and bias = +inf, so it never wins; an invalid row (non-finite ||x||²) is written as code 0,
// min_dist NaN; NaN distances never compare `<`.
//
// The portable path (non-x86, CPUs without AVX2/FMA, or EQUSS_CPU_KERNEL=scalar) uses the same packed
// layouts with plain loops the compiler auto-vectorises; it has the same tie and NaN behaviour.
#include "checks.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EQUSS_X86 1
#endif

namespace equss::cpu {
namespace {

constexpr int64_t kTileK = 16;              // codewords per micro-tile (two 8-lane vectors)
constexpr int64_t kTileRows = 6;            // rows per micro-tile (6 × 2 accumulators)
constexpr int64_t kMaxChunkRows = 192;      // rows per work item at most
constexpr int64_t kChunkBytes = 192 * 1024;  // fp32 copy of a chunk (all subspaces): well within L2
constexpr int64_t kBlockBytes = 16 * 1024;  // packed weights per K-block: half of a 32 KiB L1d
constexpr int kLanes = 8;

static_assert(kMaxChunkRows % kTileRows == 0, "chunks hold whole row tiles");

enum class Kernel { kScalar, kAvx2 };

bool cpu_has_avx2_fma() {
#ifdef EQUSS_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// EQUSS_CPU_KERNEL=auto|avx2|scalar, read on every call so tests can compare both paths in one process.
Kernel select_kernel() {
  const char* env = std::getenv("EQUSS_CPU_KERNEL");
  const std::string choice = env ? env : "auto";
  if (choice == "scalar") return Kernel::kScalar;
  if (choice == "avx2") {
    TORCH_CHECK(cpu_has_avx2_fma(), "pq_assign: EQUSS_CPU_KERNEL=avx2 but this CPU lacks AVX2/FMA");
    return Kernel::kAvx2;
  }
  TORCH_CHECK(choice == "auto" || choice.empty(), "pq_assign: EQUSS_CPU_KERNEL must be auto, avx2 or scalar, got '",
              choice, "'");
  return cpu_has_avx2_fma() ? Kernel::kAvx2 : Kernel::kScalar;
}

// Packed codebooks of all subspaces, see the file comment.
struct PackedCodebooks {
  std::vector<float> weights;  // [M][Kp/16][Ds][16]
  std::vector<float> bias;     // [M][Kp]
  int64_t Kp = 0;
};

template <typename scalar_t>
PackedCodebooks pack_codebooks(const scalar_t* cb, int64_t M, int64_t K, int64_t Ds, bool l2) {
  PackedCodebooks p;
  p.Kp = (K + kTileK - 1) / kTileK * kTileK;
  p.weights.assign(static_cast<size_t>(M * p.Kp * Ds), 0.f);
  p.bias.assign(static_cast<size_t>(M * p.Kp), std::numeric_limits<float>::infinity());
  const float scale = l2 ? -2.f : -1.f;
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> c(static_cast<size_t>(Ds));
    for (int64_t m = m0; m < m1; ++m) {
      float* w = p.weights.data() + m * p.Kp * Ds;
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* src = cb + (m * K + k) * Ds;
        float norm = 0.f;  // fp32, like the reference's (cb.float() ** 2).sum(-1)
        for (int64_t d = 0; d < Ds; ++d) {
          c[d] = static_cast<float>(src[d]);
          norm += c[d] * c[d];
        }
        // An invalid codeword (non-finite fp32 norm) keeps W = 0 and bias = +inf: it never wins.
        if (!std::isfinite(norm)) continue;
        float* tile = w + (k / kTileK) * Ds * kTileK + (k % kTileK);
        for (int64_t d = 0; d < Ds; ++d) tile[d * kTileK] = scale * c[d];
        p.bias[m * p.Kp + k] = l2 ? norm : 0.f;
      }
    }
  });
  return p;
}

// ||x||² of one fp32 row with 8 interleaved partial sums (vectorisable without reassociating one chain).
float squared_norm(const float* v, int64_t Ds) {
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= Ds; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] += v[d + j] * v[d + j];
  }
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += part[j];
  for (; d < Ds; ++d) s += v[d] * v[d];
  return s;
}

// Rows [n0, n0 + rows) of x as fp32 row tiles X[m][tile][Ds][6] (rows padded with zeros to a multiple of
// 6; padded rows are computed and dropped) and their squared norms x_sq[m][row].
template <typename scalar_t>
void pack_chunk(const scalar_t* x, int64_t n0, int64_t rows, int64_t rows_padded, int64_t M, int64_t Ds,
                float* tiles, float* x_sq, float* row_buf) {
  const int64_t per_subspace = rows_padded * Ds;
  if (rows < rows_padded) {
    for (int64_t m = 0; m < M; ++m) {
      float* last = tiles + m * per_subspace + (rows_padded - kTileRows) * Ds;
      std::fill(last, last + kTileRows * Ds, 0.f);
    }
  }
  const scalar_t* src = x + n0 * M * Ds;
  for (int64_t r = 0; r < rows; ++r) {
    float* row_tile = tiles + (r / kTileRows) * kTileRows * Ds + (r % kTileRows);
    for (int64_t m = 0; m < M; ++m, src += Ds) {
      for (int64_t d = 0; d < Ds; ++d) row_buf[d] = static_cast<float>(src[d]);
      float* out = row_tile + m * per_subspace;
      for (int64_t d = 0; d < Ds; ++d) out[d * kTileRows] = row_buf[d];
      x_sq[m * rows_padded + r] = squared_norm(row_buf, Ds);
    }
  }
}

// ------------------------------------------------------------------------------------------ portable
// One 6-row tile at a time over all codeword tiles; the j-loops over 16 codewords auto-vectorise.
void assign_tiles_scalar(const float* X, int64_t n_row_tiles, int64_t Ds, const float* W, const float* bias,
                         int64_t Kp, float* best_val, int32_t* best_idx) {
  for (int64_t t = 0; t < n_row_tiles; ++t) {
    const float* xt = X + t * kTileRows * Ds;
    for (int64_t r = 0; r < kTileRows; ++r) {
      float best = std::numeric_limits<float>::infinity();
      int32_t idx = 0;
      for (int64_t k0 = 0; k0 < Kp; k0 += kTileK) {
        float acc[kTileK];
        for (int64_t j = 0; j < kTileK; ++j) acc[j] = bias[k0 + j];
        const float* w = W + k0 * Ds;
        for (int64_t d = 0; d < Ds; ++d, w += kTileK) {
          const float xv = xt[d * kTileRows + r];
          for (int64_t j = 0; j < kTileK; ++j) acc[j] += xv * w[j];
        }
        for (int64_t j = 0; j < kTileK; ++j) {
          if (acc[j] < best) {
            best = acc[j];
            idx = static_cast<int32_t>(k0 + j);
          }
        }
      }
      best_val[t * kTileRows + r] = best;
      best_idx[t * kTileRows + r] = idx;
    }
  }
}

// --------------------------------------------------------------------------------------- AVX2 + FMA
#ifdef EQUSS_X86
// One 6-row tile xt [Ds][6] × the codeword tiles [c0, c1). The lane-wise running minimum of the 6 rows
// lives in lane_val/lane_idx ([6][8]) and is loaded/stored once per codeword tile (L1 hits), which
// leaves all 16 registers to the accumulators, the two codebook rows and the broadcast.
__attribute__((target("avx2,fma"))) void micro_tile_avx2(const float* xt, int64_t Ds, const float* W,
                                                         const float* bias, int64_t c0, int64_t c1,
                                                         float* lane_val, int32_t* lane_idx) {
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k0 = c * kTileK;
    __m256 acc0[kTileRows], acc1[kTileRows];
    const __m256 b0 = _mm256_loadu_ps(bias + k0);
    const __m256 b1 = _mm256_loadu_ps(bias + k0 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kTileRows; ++r) {
      acc0[r] = b0;
      acc1[r] = b1;
    }
    const float* w = W + k0 * Ds;
    const float* xv_ptr = xt;
#pragma GCC unroll 2
    for (int64_t d = 0; d < Ds; ++d, w += kTileK, xv_ptr += kTileRows) {
      const __m256 w0 = _mm256_loadu_ps(w);
      const __m256 w1 = _mm256_loadu_ps(w + 8);
#pragma GCC unroll 6
      for (int r = 0; r < kTileRows; ++r) {
        const __m256 xv = _mm256_broadcast_ss(xv_ptr + r);
        acc0[r] = _mm256_fmadd_ps(xv, w0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(xv, w1, acc1[r]);
      }
    }
    const __m256i i0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(k0)), lane_ids);
    const __m256i i1 = _mm256_add_epi32(i0, _mm256_set1_epi32(8));
#pragma GCC unroll 6
    for (int r = 0; r < kTileRows; ++r) {
      // Codewords k0..k0+7 before k0+8..k0+15: each lane sees its indices in increasing order, and a
      // strict `<` (false for NaN) keeps the first of equal values.
      float* lv = lane_val + r * kLanes;
      int32_t* li = lane_idx + r * kLanes;
      __m256 val = _mm256_loadu_ps(lv);
      __m256 idx = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(li)));
      __m256 lt = _mm256_cmp_ps(acc0[r], val, _CMP_LT_OQ);
      val = _mm256_blendv_ps(val, acc0[r], lt);
      idx = _mm256_blendv_ps(idx, _mm256_castsi256_ps(i0), lt);
      lt = _mm256_cmp_ps(acc1[r], val, _CMP_LT_OQ);
      val = _mm256_blendv_ps(val, acc1[r], lt);
      idx = _mm256_blendv_ps(idx, _mm256_castsi256_ps(i1), lt);
      _mm256_storeu_ps(lv, val);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(li), _mm256_castps_si256(idx));
    }
  }
}

__attribute__((target("avx2,fma"))) void assign_tiles_avx2(const float* X, int64_t n_row_tiles, int64_t Ds,
                                                           const float* W, const float* bias, int64_t Kp,
                                                           float* lane_val, int32_t* lane_idx, float* best_val,
                                                           int32_t* best_idx) {
  const int64_t rows = n_row_tiles * kTileRows;
  const int64_t n_code_tiles = Kp / kTileK;
  const int64_t tiles_per_block = std::max<int64_t>(1, kBlockBytes / (Ds * kTileK * int64_t(sizeof(float))));
  std::fill(lane_val, lane_val + rows * kLanes, std::numeric_limits<float>::infinity());
  std::fill(lane_idx, lane_idx + rows * kLanes, 0);
  for (int64_t c0 = 0; c0 < n_code_tiles; c0 += tiles_per_block) {
    const int64_t c1 = std::min(n_code_tiles, c0 + tiles_per_block);
    for (int64_t t = 0; t < n_row_tiles; ++t) {
      micro_tile_avx2(X + t * kTileRows * Ds, Ds, W, bias, c0, c1, lane_val + t * kTileRows * kLanes,
                      lane_idx + t * kTileRows * kLanes);
    }
  }
  // Lanes never updated hold (+inf, 0); an updated lane holds a value < +inf, so 0 can only win when
  // every distance was +inf or NaN, and 0 is always a valid code.
  for (int64_t r = 0; r < rows; ++r) {
    const float* lv = lane_val + r * kLanes;
    const int32_t* li = lane_idx + r * kLanes;
    float best = lv[0];
    int32_t idx = li[0];
    for (int j = 1; j < kLanes; ++j) {
      if (lv[j] < best || (lv[j] == best && li[j] < idx)) {
        best = lv[j];
        idx = li[j];
      }
    }
    best_val[r] = best;
    best_idx[r] = idx;
  }
}
#endif  // EQUSS_X86

template <typename scalar_t>
void assign_impl(const scalar_t* x, const scalar_t* cb, int64_t N, int64_t M, int64_t K, int64_t Ds, bool l2,
                 Kernel kernel, int32_t* codes, float* min_dist) {
  const PackedCodebooks packed = pack_codebooks(cb, M, K, Ds, l2);
  const int64_t fit = kChunkBytes / (M * Ds * int64_t(sizeof(float))) / kTileRows * kTileRows;
  const int64_t chunk_rows = std::clamp<int64_t>(fit, kTileRows, kMaxChunkRows);
  const int64_t n_chunks = (N + chunk_rows - 1) / chunk_rows;
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tiles(static_cast<size_t>(M * chunk_rows * Ds));
    std::vector<float> x_sq(static_cast<size_t>(M * chunk_rows));
    std::vector<float> row_buf(static_cast<size_t>(Ds));
    std::vector<float> lane_val(static_cast<size_t>(chunk_rows * kLanes));
    std::vector<int32_t> lane_idx(static_cast<size_t>(chunk_rows * kLanes));
    std::vector<float> best_val(static_cast<size_t>(chunk_rows));
    std::vector<int32_t> best_idx(static_cast<size_t>(chunk_rows));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t n0 = chunk * chunk_rows;
      const int64_t rows = std::min(chunk_rows, N - n0);
      const int64_t n_row_tiles = (rows + kTileRows - 1) / kTileRows;
      const int64_t rows_padded = n_row_tiles * kTileRows;
      pack_chunk(x, n0, rows, rows_padded, M, Ds, tiles.data(), x_sq.data(), row_buf.data());
      for (int64_t m = 0; m < M; ++m) {
        const float* X = tiles.data() + m * rows_padded * Ds;
        const float* W = packed.weights.data() + m * packed.Kp * Ds;
        const float* bias = packed.bias.data() + m * packed.Kp;
#ifdef EQUSS_X86
        if (kernel == Kernel::kAvx2) {
          assign_tiles_avx2(X, n_row_tiles, Ds, W, bias, packed.Kp, lane_val.data(), lane_idx.data(),
                            best_val.data(), best_idx.data());
        } else
#endif
        {
          assign_tiles_scalar(X, n_row_tiles, Ds, W, bias, packed.Kp, best_val.data(), best_idx.data());
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float row_sq = x_sq[m * rows_padded + r];
          const int64_t out = (n0 + r) * M + m;
          if (!std::isfinite(row_sq)) {  // an invalid row: code 0, min_dist NaN (reference.py)
            codes[out] = 0;
            min_dist[out] = std::numeric_limits<float>::quiet_NaN();
            continue;
          }
          float dist = best_val[r];
          if (l2) {
            dist += row_sq;
            dist = dist < 0.f ? 0.f : dist;  // the expanded form can round below 0
          }
          codes[out] = best_idx[r];
          min_dist[out] = dist;
        }
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
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(), op, ": K=", K, " does not fit int32 codes");
  auto codes = at::empty({N, M}, x.options().dtype(at::kInt));
  auto min_dist = at::empty({N, M}, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return {codes, min_dist};
  const Kernel kernel = select_kernel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equss_pq_assign_cpu", [&] {
    assign_impl<scalar_t>(x.const_data_ptr<scalar_t>(), codebooks.const_data_ptr<scalar_t>(), N, M, K, Ds, l2,
                          kernel, codes.mutable_data_ptr<int32_t>(), min_dist.mutable_data_ptr<float>());
  });
  return {codes, min_dist};
}

}  // namespace equss::cpu

// The CPU assignment kernel shared by pq_assign and pq_assign_gather: fused distance + argmin over one
// chunk of rows, the N×M×K distance tensor is never materialised. Torch-free (std + intrinsics only), so a
// standalone harness can time it; the ops add the threading (ATen) and the dtype dispatch.
//
// For one subspace m the distance of row x to codeword k is written as
//     dist[k] = bias[k] + sum_d x[d] · W[k][d]
// with W = -2·c (l2: bias = ||c||², ||x||² is added to the minimum afterwards) or W = -c (dot: bias = 0).
// Scaling by -2 / -1 is exact, so each dist[k] is one chain of FMAs (in increasing d, starting from
// bias[k]) whatever the lane, tile or block the codeword falls in: bit-identical codewords give
// bit-identical distances, and every row's result is independent of the rows it shares a tile with.
//
// Layout (rows in lanes):
//   * Codebooks are packed once per call into tiles of kTileK = 4 codewords, W[m][tile][Ds][4] (fp32) and
//     bias[m][tile·4]. Padded codewords get W = 0 and bias = +inf, so they can never win a strict `<`
//     (inf + finite = inf, inf + NaN = NaN).
//   * A chunk of rows is converted to fp32 and transposed into row tiles X[m][row tile][Ds][24]: lane r of
//     the 8-lane vector at (d, v) is x[row 8v + r][m][d]. The transposition reads x front to back (the
//     chunk's rows are contiguous), 4×4 blocks at a time. ||x||² of 8 rows is one FMA chain on the same
//     vectors.
//   * The micro-kernel keeps 24 rows × 4 codewords = 12 ymm accumulators, the 3 row vectors of x at one d
//     and one broadcast codebook value (16 registers): 12 FMAs per 3 loads + 4 broadcasts.
//   * Epilogue per tile and row vector: the running minimum (8 rows) is folded with the 4 accumulators by a
//     vminps chain (src2 = the running value, so a NaN distance is skipped), one compare tells which rows
//     improved and one blend records the tile; the 4 accumulators are stored to an L1 buffer. After each
//     K-block of tiles, each row whose best tile lies in the block finds the first codeword of that tile
//     whose stored distance equals its minimum bit for bit: 2 FP ops + 1 blend per 32 distances instead
//     of a compare and two blends per 8. (The minps chain keeps the first of equal values, so the first
//     bitwise match is the lowest index among the equal ones; strict `<` across tiles keeps the earlier.)
// Non-finite contract (equss/ops/reference.py): an invalid codeword (non-finite fp32 ||c||²) is packed
// with W = 0 and bias = +inf, so it never wins; an invalid row (non-finite ||x||²) is written as code 0,
// min_dist NaN; NaN distances never win; a row whose distances are all +inf/NaN gets code 0.
//
// The portable kernel (non-x86, CPUs without AVX2/FMA, or EQUSS_CPU_KERNEL=scalar) uses the same packed
// layouts with plain loops the compiler auto-vectorises; it has the same tie and NaN behaviour.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EQUSS_X86 1
#endif

namespace equss::cpu::assign {

constexpr int64_t kTileK = 4;     // codewords per micro-tile
constexpr int64_t kVecs = 3;      // 8-row vectors per micro-tile
constexpr int64_t kLanes = 8;
constexpr int64_t kTileRows = kVecs * kLanes;  // 24 rows per micro-tile
constexpr int64_t kBlockBytes = 48 * 1024;  // stored distances of one row tile per K-block (L1/L2)

enum class Kernel { kScalar, kAvx2 };

inline bool cpu_has_avx2_fma() {
#ifdef EQUSS_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------------------ codebooks
// Packed codebooks of all subspaces, see the file comment.
struct PackedCodebooks {
  std::vector<float> weights;  // [M][tiles][Ds][kTileK]
  std::vector<float> bias;     // [M][tiles·kTileK]
  int64_t M = 0, K = 0, Ds = 0, tiles = 0;
  bool l2 = true;
  const float* w(int64_t m) const { return weights.data() + m * tiles * Ds * kTileK; }
  const float* b(int64_t m) const { return bias.data() + m * tiles * kTileK; }
};

// Packs subspaces [m0, m1) (the others stay zero / +inf); `convert(src, dst, Ds)` turns one codeword into
// fp32. Called once per op, optionally in parallel over m.
template <typename scalar_t>
void pack_codebooks_range(const scalar_t* cb, int64_t m0, int64_t m1, PackedCodebooks& p) {
  const int64_t K = p.K, Ds = p.Ds;
  const float scale = p.l2 ? -2.f : -1.f;
  std::vector<float> c(static_cast<size_t>(Ds));
  for (int64_t m = m0; m < m1; ++m) {
    float* w = p.weights.data() + m * p.tiles * Ds * kTileK;
    float* bias = p.bias.data() + m * p.tiles * kTileK;
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
      bias[k] = p.l2 ? norm : 0.f;
    }
  }
}

inline void init_packed_codebooks(int64_t M, int64_t K, int64_t Ds, bool l2, PackedCodebooks& p) {
  p.M = M;
  p.K = K;
  p.Ds = Ds;
  p.l2 = l2;
  p.tiles = (K + kTileK - 1) / kTileK;
  p.weights.assign(static_cast<size_t>(M * p.tiles * Ds * kTileK), 0.f);
  p.bias.assign(static_cast<size_t>(M * p.tiles * kTileK), std::numeric_limits<float>::infinity());
}

// ------------------------------------------------------------------------------------------- workspace
// Per-thread buffers for chunks of at most `max_rows` rows and `max_subspaces` subspaces.
struct Workspace {
  std::vector<float> xt;        // [m][row tile][Ds][24]
  std::vector<float> x_sq;      // [m][rows_padded]
  std::vector<float> conv;      // fp32 copy of a chunk for non-fp32 inputs [rows][subspaces][Ds]
  std::vector<float> dist;      // [tiles per block][kTileK][24]
  std::vector<float> run;       // [24] running minimum of one row tile
  std::vector<int32_t> tile;    // [24] tile of the running minimum
  std::vector<int32_t> best_k;  // [rows_padded] per subspace
  std::vector<float> best_v;    // [m][rows_padded] the winning distance (before ||x||²)
  std::vector<int32_t> codes;   // [m][rows_padded]
  int64_t tiles_per_block = 1;

  void reserve(int64_t max_rows, int64_t max_subspaces, int64_t Ds, int64_t K, bool need_conv) {
    const int64_t rows_padded = (max_rows + kTileRows - 1) / kTileRows * kTileRows;
    const int64_t tiles = (K + kTileK - 1) / kTileK;
    // Blocks of at most kBlockBytes of stored distances, all of about the same size.
    const int64_t max_tiles = std::max<int64_t>(1, kBlockBytes / (kTileK * kTileRows * int64_t(sizeof(float))));
    const int64_t n_blocks = (tiles + max_tiles - 1) / max_tiles;
    tiles_per_block = (tiles + n_blocks - 1) / n_blocks;
    xt.resize(static_cast<size_t>(max_subspaces * rows_padded * Ds));
    x_sq.resize(static_cast<size_t>(max_subspaces * rows_padded));
    if (need_conv) conv.resize(static_cast<size_t>(max_rows * max_subspaces * Ds));
    dist.resize(static_cast<size_t>(tiles_per_block * kTileK * kTileRows));
    run.resize(kTileRows);
    tile.resize(kTileRows);
    best_k.resize(static_cast<size_t>(rows_padded));
    best_v.resize(static_cast<size_t>(max_subspaces * rows_padded));
    codes.resize(static_cast<size_t>(max_subspaces * rows_padded));
  }
};

// ------------------------------------------------------------------------------------------- packing
// Rows [0, rows) of `src` (fp32, row r of subspace s at src + r·row_stride + s·Ds) for subspaces
// s ∈ [0, S): X[s][tile][Ds][24] and ||x||² per (s, row). Padded rows (up to a multiple of 24) are zero.
inline void pack_rows_scalar(const float* src, int64_t row_stride, int64_t rows, int64_t S, int64_t Ds,
                             Workspace& ws) {
  const int64_t n_tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t rows_padded = n_tiles * kTileRows;
  for (int64_t s = 0; s < S; ++s) {
    float* X = ws.xt.data() + s * rows_padded * Ds;
    float* x_sq = ws.x_sq.data() + s * rows_padded;
    for (int64_t t = 0; t < n_tiles; ++t) {
      float* xt = X + t * Ds * kTileRows;
      float sq[kTileRows] = {};
      for (int64_t r = 0; r < kTileRows; ++r) {
        const int64_t row = t * kTileRows + r;
        if (row >= rows) {
          for (int64_t d = 0; d < Ds; ++d) xt[d * kTileRows + r] = 0.f;
          continue;
        }
        const float* v = src + row * row_stride + s * Ds;
        for (int64_t d = 0; d < Ds; ++d) xt[d * kTileRows + r] = v[d];
      }
      // ||x||² in increasing d per row (vectorises over the 24 rows).
      for (int64_t d = 0; d < Ds; ++d) {
        for (int64_t r = 0; r < kTileRows; ++r) sq[r] += xt[d * kTileRows + r] * xt[d * kTileRows + r];
      }
      for (int64_t r = 0; r < kTileRows; ++r) x_sq[t * kTileRows + r] = sq[r];
    }
  }
}

#ifdef EQUSS_X86
// The AVX2 version: per 8 rows × 4 d, 4 vectors [row i, d0..3 | row i+4, d0..3] (two 128-bit loads each)
// transposed in-lane into 4 vectors [rows 0..7 at d]; ||x||² accumulates with FMAs in increasing d.
__attribute__((target("avx2,fma"))) inline void pack_rows_avx2(const float* src, int64_t row_stride,
                                                               int64_t rows, int64_t S, int64_t Ds,
                                                               Workspace& ws) {
  const int64_t n_tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t rows_padded = n_tiles * kTileRows;
  const int64_t d4 = Ds / 4 * 4;
  alignas(32) float zeros[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t t = 0; t < n_tiles; ++t) {
    for (int64_t v = 0; v < kVecs; ++v) {
      const int64_t r0 = t * kTileRows + v * kLanes;
      const float* row_ptr[kLanes];
      int64_t row_ok[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        row_ok[i] = r0 + i < rows;
        row_ptr[i] = row_ok[i] ? src + (r0 + i) * row_stride : nullptr;
      }
      for (int64_t s = 0; s < S; ++s) {
        float* xt = ws.xt.data() + s * rows_padded * Ds + t * Ds * kTileRows + v * kLanes;
        __m256 sq = _mm256_setzero_ps();
        const float* p[kLanes];
        for (int64_t i = 0; i < kLanes; ++i) p[i] = row_ok[i] ? row_ptr[i] + s * Ds : zeros;
        const int64_t step[kLanes] = {row_ok[0] * 4, row_ok[1] * 4, row_ok[2] * 4, row_ok[3] * 4,
                                      row_ok[4] * 4, row_ok[5] * 4, row_ok[6] * 4, row_ok[7] * 4};
        int64_t d = 0;
        for (; d < d4; d += 4) {
          __m256 a0 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p[0])), _mm_loadu_ps(p[4]), 1);
          __m256 a1 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p[1])), _mm_loadu_ps(p[5]), 1);
          __m256 a2 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p[2])), _mm_loadu_ps(p[6]), 1);
          __m256 a3 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p[3])), _mm_loadu_ps(p[7]), 1);
          for (int64_t i = 0; i < kLanes; ++i) p[i] += step[i];
          const __m256 t0 = _mm256_unpacklo_ps(a0, a1);  // r0d0 r1d0 r0d1 r1d1
          const __m256 t1 = _mm256_unpackhi_ps(a0, a1);  // r0d2 r1d2 r0d3 r1d3
          const __m256 t2 = _mm256_unpacklo_ps(a2, a3);
          const __m256 t3 = _mm256_unpackhi_ps(a2, a3);
          const __m256 c0 = _mm256_shuffle_ps(t0, t2, 0x44);  // d0: r0 r1 r2 r3
          const __m256 c1 = _mm256_shuffle_ps(t0, t2, 0xEE);  // d1
          const __m256 c2 = _mm256_shuffle_ps(t1, t3, 0x44);  // d2
          const __m256 c3 = _mm256_shuffle_ps(t1, t3, 0xEE);  // d3
          _mm256_storeu_ps(xt + (d + 0) * kTileRows, c0);
          _mm256_storeu_ps(xt + (d + 1) * kTileRows, c1);
          _mm256_storeu_ps(xt + (d + 2) * kTileRows, c2);
          _mm256_storeu_ps(xt + (d + 3) * kTileRows, c3);
          sq = _mm256_fmadd_ps(c0, c0, sq);
          sq = _mm256_fmadd_ps(c1, c1, sq);
          sq = _mm256_fmadd_ps(c2, c2, sq);
          sq = _mm256_fmadd_ps(c3, c3, sq);
        }
        for (; d < Ds; ++d) {
          alignas(32) float col[kLanes];
          for (int64_t i = 0; i < kLanes; ++i) col[i] = row_ok[i] ? *p[i] : 0.f;
          for (int64_t i = 0; i < kLanes; ++i) p[i] += step[i] / 4;
          const __m256 c = _mm256_load_ps(col);
          _mm256_storeu_ps(xt + d * kTileRows, c);
          sq = _mm256_fmadd_ps(c, c, sq);
        }
        _mm256_storeu_ps(ws.x_sq.data() + s * rows_padded + r0, sq);
      }
    }
  }
}
#endif

// ------------------------------------------------------------------------------------- micro-kernels
// Portable: one 24-row tile over codeword tiles [0, n_ct) of one subspace; the r-loops vectorise.
inline void assign_tile_scalar(const float* xt, int64_t Ds, const float* W, const float* bias, int64_t n_ct,
                               float* best_v, int32_t* best_k) {
  float run[kTileRows];
  int32_t idx[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) {
    run[r] = std::numeric_limits<float>::infinity();
    idx[r] = 0;
  }
  for (int64_t c = 0; c < n_ct; ++c) {
    float acc[kTileK][kTileRows];
    for (int64_t j = 0; j < kTileK; ++j) {
      for (int64_t r = 0; r < kTileRows; ++r) acc[j][r] = bias[c * kTileK + j];
    }
    const float* w = W + c * Ds * kTileK;
    for (int64_t d = 0; d < Ds; ++d) {
      const float* xv = xt + d * kTileRows;
      for (int64_t j = 0; j < kTileK; ++j) {
        const float wj = w[d * kTileK + j];
        for (int64_t r = 0; r < kTileRows; ++r) acc[j][r] += xv[r] * wj;
      }
    }
    for (int64_t j = 0; j < kTileK; ++j) {
      for (int64_t r = 0; r < kTileRows; ++r) {
        if (acc[j][r] < run[r]) {  // strict: the first of equal values stays; NaN never wins
          run[r] = acc[j][r];
          idx[r] = static_cast<int32_t>(c * kTileK + j);
        }
      }
    }
  }
  for (int64_t r = 0; r < kTileRows; ++r) {
    best_v[r] = run[r];
    best_k[r] = idx[r];
  }
}

#ifdef EQUSS_X86
// One 24-row tile xt [Ds][24] × codeword tiles [0, n_ct) of a K-block whose first tile is `ct0`. The
// running minimum (run) and its tile (tile) of the 24 rows live in memory between tiles (L1); the 4
// accumulators of every tile are stored to dist[c][j][24] for the block's index resolution.
__attribute__((target("avx2,fma"))) inline void tile_block_avx2(const float* xt, int64_t Ds, const float* W,
                                                                const float* bias, int64_t n_ct, int32_t ct0,
                                                                float* run, int32_t* tile, float* dist) {
  for (int64_t c = 0; c < n_ct; ++c) {
    const float* w = W + c * Ds * kTileK;
    __m256 a00 = _mm256_broadcast_ss(bias + c * kTileK + 0), a01 = _mm256_broadcast_ss(bias + c * kTileK + 1);
    __m256 a02 = _mm256_broadcast_ss(bias + c * kTileK + 2), a03 = _mm256_broadcast_ss(bias + c * kTileK + 3);
    __m256 a10 = a00, a11 = a01, a12 = a02, a13 = a03;
    __m256 a20 = a00, a21 = a01, a22 = a02, a23 = a03;
    const float* xp = xt;
    // One step of d: 3 row vectors × 4 broadcast codebook values = 12 FMAs.
#define EQUSS_STEP(o)                                        \
  {                                                          \
    const __m256 x0 = _mm256_loadu_ps(xp + (o) * kTileRows); \
    const __m256 x1 = _mm256_loadu_ps(xp + (o) * kTileRows + 8);  \
    const __m256 x2 = _mm256_loadu_ps(xp + (o) * kTileRows + 16); \
    __m256 b = _mm256_broadcast_ss(w + (o) * kTileK + 0);    \
    a00 = _mm256_fmadd_ps(x0, b, a00);                       \
    a10 = _mm256_fmadd_ps(x1, b, a10);                       \
    a20 = _mm256_fmadd_ps(x2, b, a20);                       \
    b = _mm256_broadcast_ss(w + (o) * kTileK + 1);           \
    a01 = _mm256_fmadd_ps(x0, b, a01);                       \
    a11 = _mm256_fmadd_ps(x1, b, a11);                       \
    a21 = _mm256_fmadd_ps(x2, b, a21);                       \
    b = _mm256_broadcast_ss(w + (o) * kTileK + 2);           \
    a02 = _mm256_fmadd_ps(x0, b, a02);                       \
    a12 = _mm256_fmadd_ps(x1, b, a12);                       \
    a22 = _mm256_fmadd_ps(x2, b, a22);                       \
    b = _mm256_broadcast_ss(w + (o) * kTileK + 3);           \
    a03 = _mm256_fmadd_ps(x0, b, a03);                       \
    a13 = _mm256_fmadd_ps(x1, b, a13);                       \
    a23 = _mm256_fmadd_ps(x2, b, a23);                       \
  }
    int64_t d = 0;
    for (; d + 4 <= Ds; d += 4, xp += 4 * kTileRows, w += 4 * kTileK) {  // unrolled: fewer loop µops
      EQUSS_STEP(0)
      EQUSS_STEP(1)
      EQUSS_STEP(2)
      EQUSS_STEP(3)
    }
    for (; d < Ds; ++d, xp += kTileRows, w += kTileK) EQUSS_STEP(0)
#undef EQUSS_STEP
    float* dc = dist + c * kTileK * kTileRows;
    const __m256 tid = _mm256_castsi256_ps(_mm256_set1_epi32(ct0 + static_cast<int32_t>(c)));
#define EQUSS_EPILOGUE(v, e0, e1, e2, e3)                                                            \
  {                                                                                                  \
    _mm256_storeu_ps(dc + 0 * kTileRows + 8 * v, e0);                                                \
    _mm256_storeu_ps(dc + 1 * kTileRows + 8 * v, e1);                                                \
    _mm256_storeu_ps(dc + 2 * kTileRows + 8 * v, e2);                                                \
    _mm256_storeu_ps(dc + 3 * kTileRows + 8 * v, e3);                                                \
    const __m256 old = _mm256_loadu_ps(run + 8 * v);                                                 \
    /* vminps returns its second operand when either is NaN or both are equal: the running value. */ \
    __m256 mn = _mm256_min_ps(e0, old);                                                              \
    mn = _mm256_min_ps(e1, mn);                                                                      \
    mn = _mm256_min_ps(e2, mn);                                                                      \
    mn = _mm256_min_ps(e3, mn);                                                                      \
    const __m256 lt = _mm256_cmp_ps(mn, old, _CMP_LT_OQ);                                            \
    _mm256_storeu_ps(run + 8 * v, mn);                                                               \
    float* tp = reinterpret_cast<float*>(tile + 8 * v);                                              \
    _mm256_storeu_ps(tp, _mm256_blendv_ps(_mm256_loadu_ps(tp), tid, lt));                            \
  }
    EQUSS_EPILOGUE(0, a00, a01, a02, a03)
    EQUSS_EPILOGUE(1, a10, a11, a12, a13)
    EQUSS_EPILOGUE(2, a20, a21, a22, a23)
#undef EQUSS_EPILOGUE
  }
}

// After a K-block: rows whose best tile lies in the block [ct0, ct0 + n_ct) take the first codeword of
// that tile whose stored distance equals their minimum bit for bit.
inline void resolve_block(const float* run, const int32_t* tile, const float* dist, int32_t ct0, int64_t n_ct,
                          int32_t* best_k) {
  for (int64_t r = 0; r < kTileRows; ++r) {
    const int32_t t = tile[r];
    const bool here = t >= ct0;
    const int64_t c = here ? t - ct0 : 0;
    uint32_t target, got;
    std::memcpy(&target, run + r, 4);
    int32_t j = kTileK - 1;
    for (int32_t jj = static_cast<int32_t>(kTileK) - 2; jj >= 0; --jj) {
      std::memcpy(&got, dist + (c * kTileK + jj) * kTileRows + r, 4);
      j = got == target ? jj : j;
    }
    (void)n_ct;
    best_k[r] = here ? t * static_cast<int32_t>(kTileK) + j : best_k[r];
  }
}
#endif

// ------------------------------------------------------------------------------------------ the chunk
// Assigns rows [0, rows) of a chunk for subspaces [m0, m0 + S) whose fp32 rows were packed into ws
// (pack_rows_*). Writes ws.codes[s][row] and ws.best_v[s][row] = the winning distance before ||x||².
inline void assign_packed(const PackedCodebooks& cb, int64_t m0, int64_t S, int64_t rows, Kernel kernel,
                          Workspace& ws) {
  const int64_t Ds = cb.Ds;
  const int64_t n_tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t rows_padded = n_tiles * kTileRows;
  for (int64_t s = 0; s < S; ++s) {
    const float* W = cb.w(m0 + s);
    const float* bias = cb.b(m0 + s);
    for (int64_t t = 0; t < n_tiles; ++t) {
      const float* xt = ws.xt.data() + s * rows_padded * Ds + t * Ds * kTileRows;
      float* best_v = ws.best_v.data() + s * rows_padded + t * kTileRows;
      int32_t* codes = ws.codes.data() + s * rows_padded + t * kTileRows;
#ifdef EQUSS_X86
      if (kernel == Kernel::kAvx2) {
        std::fill(ws.run.begin(), ws.run.end(), std::numeric_limits<float>::infinity());
        std::fill(ws.tile.begin(), ws.tile.end(), 0);
        std::fill(codes, codes + kTileRows, 0);
        for (int64_t c0 = 0; c0 < cb.tiles; c0 += ws.tiles_per_block) {
          const int64_t n_ct = std::min(ws.tiles_per_block, cb.tiles - c0);
          tile_block_avx2(xt, Ds, W + c0 * Ds * kTileK, bias + c0 * kTileK, n_ct, static_cast<int32_t>(c0),
                          ws.run.data(), ws.tile.data(), ws.dist.data());
          resolve_block(ws.run.data(), ws.tile.data(), ws.dist.data(), static_cast<int32_t>(c0), n_ct, codes);
        }
        for (int64_t r = 0; r < kTileRows; ++r) {
          best_v[r] = ws.run[r];
          // Never improved on +inf (every distance +inf or NaN): code 0, like the reference.
          if (!(ws.run[r] < std::numeric_limits<float>::infinity())) codes[r] = 0;
        }
        continue;
      }
#endif
      (void)kernel;
      assign_tile_scalar(xt, Ds, W, bias, cb.tiles, best_v, codes);
    }
  }
}

// Final values for row `r` of packed subspace s: code and min_dist (reference.py: l2 adds ||x||² and
// clamps at 0; an invalid row is code 0, NaN).
inline void finish_row(const Workspace& ws, int64_t s, int64_t rows_padded, int64_t r, bool l2, int32_t& code,
                       float& min_dist) {
  const float row_sq = ws.x_sq[s * rows_padded + r];
  if (!std::isfinite(row_sq)) {
    code = 0;
    min_dist = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  float dist = ws.best_v[s * rows_padded + r];
  if (l2) {
    dist += row_sq;
    dist = dist < 0.f ? 0.f : dist;  // the expanded form can round below 0
  }
  code = ws.codes[s * rows_padded + r];
  min_dist = dist;
}

// Packs rows [0, rows) × subspaces [0, S) of fp32 rows at `src` (row stride `row_stride` floats).
inline void pack_rows(const float* src, int64_t row_stride, int64_t rows, int64_t S, int64_t Ds, Kernel kernel,
                      Workspace& ws) {
#ifdef EQUSS_X86
  if (kernel == Kernel::kAvx2) {
    pack_rows_avx2(src, row_stride, rows, S, Ds, ws);
    return;
  }
#endif
  (void)kernel;
  pack_rows_scalar(src, row_stride, rows, S, Ds, ws);
}

}  // namespace equss::cpu::assign

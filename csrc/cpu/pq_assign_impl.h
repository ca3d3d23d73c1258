// ATen-side helpers of the CPU assignment (pq_assign and pq_assign_gather): kernel selection, codebook
// packing for any input dtype, the chunk conversion + packing step, and a dynamic work queue over the
// intra-op threads. The kernel itself is in pq_assign_kernel.h.
#pragma once

#include "cpu/pq_assign_kernel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace equss::cpu::assign {

// EQUSS_CPU_KERNEL=auto|avx2|scalar, read on every call so tests can compare both paths in one process.
inline Kernel select_kernel(const char* op) {
  const char* env = std::getenv("EQUSS_CPU_KERNEL");
  const std::string choice = env ? env : "auto";
  if (choice == "scalar") return Kernel::kScalar;
  if (choice == "avx2") {
    TORCH_CHECK(cpu_has_avx2_fma(), op, ": EQUSS_CPU_KERNEL=avx2 but this CPU lacks AVX2/FMA");
    return Kernel::kAvx2;
  }
  TORCH_CHECK(choice == "auto" || choice.empty(), op, ": EQUSS_CPU_KERNEL must be auto, avx2 or scalar, got '",
              choice, "'");
  return cpu_has_avx2_fma() ? Kernel::kAvx2 : Kernel::kScalar;
}

template <typename scalar_t>
void pack_codebooks(const scalar_t* cb, int64_t M, int64_t K, int64_t Ds, bool l2, PackedCodebooks& p) {
  init_packed_codebooks(M, K, Ds, l2, p);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) { pack_codebooks_range(cb, m0, m1, p); });
}

// Rows per chunk: the fp32 copy of a chunk (S subspaces) stays well within L2; whole 24-row tiles.
inline int64_t chunk_rows_for(int64_t S, int64_t Ds) {
  constexpr int64_t kChunkBytes = 192 * 1024;
  constexpr int64_t kMaxChunkRows = 192;
  const int64_t fit = kChunkBytes / std::max<int64_t>(1, S * Ds * int64_t(sizeof(float))) / kTileRows * kTileRows;
  return std::clamp<int64_t>(fit, kTileRows, kMaxChunkRows);
}

// Rows [n0, n0 + rows) × subspaces [m0, m0 + S) of x [N, M, Ds] into ws (converted to fp32 first unless x
// is fp32). Returns the fp32 rows: a pointer and the row stride in floats (row r, subspace s at
// ptr + r·stride + s·Ds).
template <typename scalar_t>
std::pair<const float*, int64_t> load_chunk(const scalar_t* x, int64_t M, int64_t Ds, int64_t n0, int64_t rows,
                                            int64_t m0, int64_t S, Kernel kernel, Workspace& ws) {
  const float* rows_f32;
  int64_t stride;
  if constexpr (std::is_same_v<scalar_t, float>) {
    rows_f32 = x + (n0 * M + m0) * Ds;
    stride = M * Ds;
  } else {
    float* dst = ws.conv.data();
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* src = x + ((n0 + r) * M + m0) * Ds;
      float* out = dst + r * S * Ds;
      for (int64_t i = 0; i < S * Ds; ++i) out[i] = static_cast<float>(src[i]);
    }
    rows_f32 = dst;
    stride = S * Ds;
  }
  pack_rows(rows_f32, stride, rows, S, Ds, kernel, ws);
  return {rows_f32, stride};
}

// Runs fn(item, worker) for every item in [0, n_items) on the intra-op threads, each thread claiming the
// next item when it is done with one (a thread slowed down by other load on the machine takes fewer).
// `worker` is the index of the calling thread in [0, threads) (its own workspace). Which thread runs an
// item never changes a result: items are independent.
template <typename Fn>
void for_each_item(int64_t n_items, int64_t threads, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t worker = t0; worker < t1; ++worker) {
      for (int64_t item = next.fetch_add(1); item < n_items; item = next.fetch_add(1)) fn(item, worker);
    }
  });
}

}  // namespace equss::cpu::assign

// pq_gather on CPU: out[n, m, :] = codebooks[m, codes[n, m], :], a bit-exact byte copy per (n, m); a code
// outside [0, K) gives a zero vector (equss/ops/reference.py).
#include "checks.h"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>

namespace equss::cpu {

at::Tensor pq_gather(const at::Tensor& codes, const at::Tensor& codebooks) {
  constexpr const char* op = "pq_gather";
  check_float_tensor(codebooks, "codebooks", op, 3);
  check_codes(codes, op, -1, codebooks.size(0));
  check_same_device(op, codes, "codes", codebooks, "codebooks");
  TORCH_CHECK(codebooks.device().is_cpu(), op, ": expected CPU tensors, got ", codebooks.device());
  const int64_t N = codes.size(0), M = codebooks.size(0), K = codebooks.size(1), Ds = codebooks.size(2);
  auto out = at::empty({N, M, Ds}, codebooks.options());
  if (out.numel() == 0) return out;
  const size_t row_bytes = static_cast<size_t>(Ds) * codebooks.element_size();
  const char* src = static_cast<const char*>(codebooks.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "equss_pq_gather_cpu", [&] {
    const index_t* c = codes.const_data_ptr<index_t>();
    // ~4 KiB of output per grain keeps the per-task overhead small for any Ds.
    const int64_t grain = std::max<int64_t>(1, 4096 / static_cast<int64_t>(row_bytes));
    at::parallel_for(0, N * M, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t m = i % M;
        const int64_t k = static_cast<int64_t>(c[i]);
        if (k < 0 || k >= K) {  // only when the caller skipped the range check: a zero vector (reference.py)
          std::memset(dst + i * row_bytes, 0, row_bytes);
          continue;
        }
        std::memcpy(dst + i * row_bytes, src + (m * K + k) * row_bytes, row_bytes);
      }
    });
  });
  return out;
}

}  // namespace equss::cpu

// pq_gather on CUDA: out[n, m, :] = codebooks[m, codes[n, m], :], a bit-exact copy of each Ds row; a code
// outside [0, K) (only when the caller skipped the range check) is never dereferenced: the row is written
// as zeros (equss/ops/reference.py). One 2-D launch, rows copied in 16/8/4/2-byte units: see
// cuda/pq_gather_kernel.cuh.
#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/pq_gather_kernel.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace equss::cuda {
namespace {

template <typename index_t, typename vec_t>
void launch_gather(const at::Tensor& codes, const at::Tensor& codebooks, at::Tensor& out, cudaStream_t stream) {
  const int64_t row_vecs = codebooks.size(2) * codebooks.element_size() / static_cast<int64_t>(sizeof(vec_t));
  gather::launch<index_t, vec_t>(codes.const_data_ptr<index_t>(), static_cast<const vec_t*>(codebooks.const_data_ptr()),
                                 static_cast<vec_t*>(out.mutable_data_ptr()), codes.size(0), codebooks.size(0),
                                 codebooks.size(1), row_vecs, num_sms(), stream);
}

}  // namespace

at::Tensor pq_gather(const at::Tensor& codes, const at::Tensor& codebooks) {
  constexpr const char* op = "pq_gather";
  check_float_tensor(codebooks, "codebooks", op, 3);
  check_codes(codes, op, -1, codebooks.size(0));
  check_cuda_tensors(op, {&codebooks, &codes});
  const c10::cuda::CUDAGuard device_guard(codebooks.device());
  const int64_t N = codes.size(0), M = codebooks.size(0), Ds = codebooks.size(2);
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max(), op, ": M=", M, " exceeds 2^31 - 1");
  auto out = at::empty({N, M, Ds}, codebooks.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The widest copy unit dividing the row's bytes and both base addresses.
  const uint64_t row_bytes = static_cast<uint64_t>(Ds) * codebooks.element_size();
  const uint64_t align = row_bytes | reinterpret_cast<uintptr_t>(codebooks.const_data_ptr()) |
                         reinterpret_cast<uintptr_t>(out.const_data_ptr());
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "equss_pq_gather_cuda", [&] {
    if (align % 16 == 0) {
      launch_gather<index_t, uint4>(codes, codebooks, out, stream);
    } else if (align % 8 == 0) {
      launch_gather<index_t, uint2>(codes, codebooks, out, stream);
    } else if (align % 4 == 0) {
      launch_gather<index_t, uint32_t>(codes, codebooks, out, stream);
    } else {
      launch_gather<index_t, uint16_t>(codes, codebooks, out, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace equss::cuda

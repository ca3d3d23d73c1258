// pq_gather on CUDA: out[n, m, :] = codebooks[m, codes[n, m], :], a bit-exact copy of each Ds row; a code
// outside [0, K) (only when the caller skipped the range check) is never dereferenced: the row is written
// as zeros (equss/ops/reference.py).
//
// Grid (M, row chunks) of 256 threads: block (m, c) walks rows n of subspace m (grid-stride in n), a group of
// L lanes per row (L = power of two >= min(vectors per row, 32)). A row is copied in the widest unit of 16,
// 8, 4 or 2 bytes that divides its byte size and both base addresses, so the common fp32 Ds = 32 row is 8
// LDG.128 + 8 STG.128 by 8 lanes. No per-element division: m is the block's, n the loop's.
#include "checks.h"
#include "cuda/launch.cuh"
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

template <typename vec_t>
__device__ __forceinline__ vec_t zero_vec() {
  vec_t v;
  memset(&v, 0, sizeof(v));
  return v;
}

template <typename index_t, typename vec_t>
__global__ void __launch_bounds__(kThreads)
    pq_gather_kernel(const index_t* __restrict__ codes, const vec_t* __restrict__ codebooks, vec_t* __restrict__ out,
                     int64_t N, int M, int64_t K, int row_vecs, int lanes) {
  const int tid = threadIdx.x;
  const int m = blockIdx.x;
  const int rl = tid / lanes;
  const int lv = tid - rl * lanes;
  const int rows_per_block = kThreads / lanes;
  const vec_t* cb_m = codebooks + static_cast<int64_t>(m) * K * row_vecs;
  for (int64_t n = static_cast<int64_t>(blockIdx.y) * rows_per_block + rl; n < N;
       n += static_cast<int64_t>(gridDim.y) * rows_per_block) {
    const int64_t i = n * M + m;
    const int64_t k = static_cast<int64_t>(codes[i]);
    const bool in_range = k >= 0 && k < K;
    const vec_t* src = cb_m + (in_range ? k : 0) * row_vecs;
    vec_t* dst = out + i * row_vecs;
    for (int v = lv; v < row_vecs; v += lanes) dst[v] = in_range ? src[v] : zero_vec<vec_t>();
  }
}

template <typename index_t, typename vec_t>
void launch_gather(const at::Tensor& codes, const at::Tensor& codebooks, at::Tensor& out, cudaStream_t stream) {
  const int64_t N = codes.size(0), M = codebooks.size(0), K = codebooks.size(1);
  const int64_t row_vecs = codebooks.size(2) * codebooks.element_size() / static_cast<int64_t>(sizeof(vec_t));
  const int lanes = row_group_width(row_vecs);
  const int64_t rows_per_block = kThreads / lanes;
  // ~8 blocks per SM in all; each thread then copies several rows.
  const int64_t want = (8 * static_cast<int64_t>(num_sms()) + M - 1) / M;
  const int64_t chunks = std::clamp<int64_t>(std::min(want, (N + rows_per_block - 1) / rows_per_block), 1, 65535);
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(chunks));
  pq_gather_kernel<index_t, vec_t><<<grid, kThreads, 0, stream>>>(
      codes.const_data_ptr<index_t>(), static_cast<const vec_t*>(codebooks.const_data_ptr()),
      static_cast<vec_t*>(out.mutable_data_ptr()), N, static_cast<int>(M), K, static_cast<int>(row_vecs), lanes);
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

// pq_ema_apply_ on CUDA: one block per subspace does the whole update in place (see the CPU version and
// pq_ema_apply_ref_ for the math): EMA of cluster_size and its sum n_tot (block reduction in shared
// memory), then EMA of embed_sum and, where n_tot > 0, codebooks = embed_sum / smoothed cluster size.
// One launch; M·K·Ds is small (32·256·32 = 262k), so M blocks are enough.
#include "checks.h"
#include "cuda/launch.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace equss::cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pq_ema_apply_kernel(const float* __restrict__ counts, const float* __restrict__ sums,
                        float* __restrict__ cluster_size, float* __restrict__ embed_sum,
                        scalar_t* __restrict__ codebooks, int64_t K, int64_t Ds, float decay, float one_minus_decay,
                        float eps, float k_eps) {
  __shared__ float partial[kThreads];
  const int tid = threadIdx.x;
  const int64_t m = blockIdx.x;
  float* cs = cluster_size + m * K;

  float local = 0.f;
  for (int64_t k = tid; k < K; k += kThreads) {
    // a + alpha·b as one fma, like torch's add_(…, alpha=…)
    const float v = fmaf(one_minus_decay, counts[m * K + k], cs[k] * decay);
    cs[k] = v;
    local += v;
  }
  partial[tid] = local;
  __syncthreads();  // also publishes the updated cs[k] to the whole block
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride) partial[tid] += partial[tid + stride];
    __syncthreads();
  }
  const float n_tot = partial[0];
  const bool renormalise = n_tot > 0.f;  // false for 0 and NaN: a never-used subspace keeps its codebook
  const float denom = n_tot + k_eps;

  const int64_t base = m * K * Ds;
  for (int64_t i = tid; i < K * Ds; i += kThreads) {
    const float e = fmaf(one_minus_decay, sums[base + i], embed_sum[base + i] * decay);
    embed_sum[base + i] = e;
    if (renormalise) {
      const float smoothed = (cs[i / Ds] + eps) / denom * n_tot;
      codebooks[base + i] = static_cast<scalar_t>(e / smoothed);
    }
  }
}

}  // namespace

void pq_ema_apply_(const at::Tensor& counts, const at::Tensor& sums, at::Tensor& cluster_size,
                   at::Tensor& embed_sum, at::Tensor& codebooks, double decay, double eps) {
  constexpr const char* op = "pq_ema_apply_";
  check_float_tensor(codebooks, "codebooks", op, 3);
  const int64_t M = codebooks.size(0), K = codebooks.size(1), Ds = codebooks.size(2);
  check_fp32_buffer(counts, "counts", op, {M, K});
  check_fp32_buffer(sums, "sums", op, {M, K, Ds});
  check_fp32_buffer(cluster_size, "cluster_size", op, {M, K});
  check_fp32_buffer(embed_sum, "embed_sum", op, {M, K, Ds});
  check_cuda_tensors(op, {&codebooks, &counts, &sums, &cluster_size, &embed_sum});
  if (codebooks.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(codebooks.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Python scalars rounded to fp32 the way torch rounds them for fp32 tensors.
  const float dec = static_cast<float>(decay);
  const float one_minus_dec = static_cast<float>(1.0 - decay);
  const float eps_f = static_cast<float>(eps);
  const float k_eps = static_cast<float>(static_cast<double>(K) * eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebooks.scalar_type(), "equss_pq_ema_apply_cuda", [&] {
    pq_ema_apply_kernel<scalar_t><<<static_cast<unsigned int>(M), kThreads, 0, stream>>>(
        counts.const_data_ptr<float>(), sums.const_data_ptr<float>(), cluster_size.mutable_data_ptr<float>(),
        embed_sum.mutable_data_ptr<float>(), codebooks.mutable_data_ptr<scalar_t>(), K, Ds, dec, one_minus_dec,
        eps_f, k_eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace equss::cuda

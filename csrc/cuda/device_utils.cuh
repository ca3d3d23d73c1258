// Device-side helpers shared by the equss_C CUDA kernels. Torch-free on purpose (only CUDA headers), so
// the kernels can be compiled and their SASS inspected on their own.
//
// Storage types: the kernels see float, double, __half and __nv_bfloat16; the host code maps c10::Half and
// c10::BFloat16 onto the CUDA types (same size and bit layout) with storage_t (cuda/launch.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace equss::cuda {

// Element -> fp32, exactly like tensor.float() (fp64 rounds to nearest, overflows to inf).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Read-only, L1-cached load (the inputs are never written by the kernel that reads them).
template <typename T>
__device__ __forceinline__ T load_ro(const T* p) {
  return __ldg(p);
}
template <>
__device__ __forceinline__ __half load_ro<__half>(const __half* p) {
  return __ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
template <>
__device__ __forceinline__ __nv_bfloat16 load_ro<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p)));
}

// A float tensor whose dtype is known only at run time (codebooks_out, stats_x of the fused op): the
// branch on `kind` is uniform across a warp and outside every hot loop.
enum class FloatKind : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

struct AnyFloatPtr {
  const void* data;
  FloatKind kind;

  __device__ __forceinline__ float load_float(int64_t i) const {
    switch (kind) {
      case FloatKind::kFloat: return __ldg(static_cast<const float*>(data) + i);
      case FloatKind::kDouble: return static_cast<float>(__ldg(static_cast<const double*>(data) + i));
      case FloatKind::kHalf: return to_float(load_ro(static_cast<const __half*>(data) + i));
      default: return to_float(load_ro(static_cast<const __nv_bfloat16*>(data) + i));
    }
  }

  // Copies element i bit for bit to element j of `out` (same dtype) and returns its fp32 value.
  __device__ __forceinline__ float copy_to(int64_t i, void* out, int64_t j) const {
    switch (kind) {
      case FloatKind::kFloat: {
        const float v = __ldg(static_cast<const float*>(data) + i);
        static_cast<float*>(out)[j] = v;
        return v;
      }
      case FloatKind::kDouble: {
        const double v = __ldg(static_cast<const double*>(data) + i);
        static_cast<double*>(out)[j] = v;
        return static_cast<float>(v);
      }
      case FloatKind::kHalf: {
        const unsigned short b = __ldg(static_cast<const unsigned short*>(data) + i);
        static_cast<unsigned short*>(out)[j] = b;
        return __half2float(__ushort_as_half(b));
      }
      default: {
        const unsigned short b = __ldg(static_cast<const unsigned short*>(data) + i);
        static_cast<unsigned short*>(out)[j] = b;
        return __bfloat162float(__ushort_as_bfloat16(b));
      }
    }
  }
};

// Sum over the `width` lanes (a power of two <= 32) of an aligned lane group; every lane of the warp must
// call it (all 32 take part in the shuffles), each group gets its own sum. Unrolled, `width` is uniform.
__device__ __forceinline__ float group_sum(float v, int width) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    if (o < width) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

// Smallest power of two >= min(n, 32).
inline int row_group_width(int64_t n) {
  int g = 1;
  while (g < 32 && g < n) g <<= 1;
  return g;
}

// Row groups of the row-wise kernels (segment sums, the fused epilogue): a row of Ds elements is handled by
// G lanes with kRowElems consecutive elements each (chunks of kRowElems·G elements), G the smallest power
// of two >= ceil(Ds / kRowElems), at most 32. Returns log2(G).
constexpr int kRowElems = 4;
inline int row_group_shift(int64_t Ds) {
  const int g = row_group_width((Ds + kRowElems - 1) / kRowElems);
  int shift = 0;
  while ((1 << shift) < g) ++shift;
  return shift;
}

// ---------------------------------------------------------------------------------------- cp.async
// 16-byte global -> shared copies that bypass the registers (sm_80+); a plain copy on older GPUs.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  *static_cast<float4*>(smem) = __ldg(static_cast<const float4*>(gmem));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace equss::cuda

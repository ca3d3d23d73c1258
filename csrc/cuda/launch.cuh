// Host-side launch helpers shared by the CUDA kernels of equss_C: the "all tensors on one CUDA device"
// check, grid sizes, the SM count, and the mapping of ATen dtypes onto the CUDA storage types the
// (torch-free) kernels are written for.
#pragma once

#include "cuda/device_utils.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace equss::cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `total` elements: enough to fill the GPU, few enough that each
// thread handles several elements (the loops use int64 indices, so any total is safe).
inline unsigned int grid_stride_blocks(int64_t total, int threads = kThreads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, int64_t(1) << 16));
}

inline void check_cuda_tensors(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  const at::Device device = (*tensors.begin())->device();
  TORCH_CHECK(device.is_cuda(), op, ": expected CUDA tensors, got ", device);
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device() == device, op, ": all tensors must be on ", device, ", got one on ", t->device());
  }
}

// An attribute of the current device, cached per device (attributes never change).
template <cudaDeviceAttr kAttr>
int device_attribute() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static int cached[64] = {};
  if (device < 64 && cached[device] > 0) return cached[device];
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttr, device));
  if (device < 64) cached[device] = value;
  return value;
}

// Multiprocessors of the current device.
inline int num_sms() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// Shared memory one block may opt in to on the current device (227 KiB on H100, 163 KiB on A100).
inline size_t smem_optin_bytes() {
  return static_cast<size_t>(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>());
}

// c10::Half / c10::BFloat16 -> __half / __nv_bfloat16 (same size and bits), anything else unchanged.
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<c10::Half> {
  using type = __half;
};
template <>
struct storage<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using storage_t = typename storage<T>::type;

static_assert(sizeof(c10::Half) == sizeof(__half) && sizeof(c10::BFloat16) == sizeof(__nv_bfloat16));

template <typename T>
const storage_t<T>* storage_ptr(const at::Tensor& t) {
  return reinterpret_cast<const storage_t<T>*>(t.const_data_ptr<T>());
}

inline FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatKind::kFloat;
    case at::kDouble: return FloatKind::kDouble;
    case at::kHalf: return FloatKind::kHalf;
    case at::kBFloat16: return FloatKind::kBFloat16;
    default: TORCH_CHECK(false, "equss: unsupported float dtype ", t);
  }
  return FloatKind::kFloat;
}

inline AnyFloatPtr any_float_ptr(const at::Tensor& t) { return {t.const_data_ptr(), float_kind(t.scalar_type())}; }

}  // namespace equss::cuda

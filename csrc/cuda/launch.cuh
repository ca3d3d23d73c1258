// Launch helpers shared by the CUDA kernels of equss_C: grid sizes for grid-stride loops and the
// "all tensors on one CUDA device" check.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

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

}  // namespace equss::cuda

// Minimal CPU emulation of the CUDA features the equss kernels use (see ../README.md): one block at a time,
// its threads as cooperative fibers (ucontext) on one OS thread that switch only at __syncthreads and warp
// shuffles, so atomics are plain read-modify-writes. Shared memory is refilled with 0xFF before every
// block. Not emulated: warp divergence (shuffles assume all 32 lanes call them), memory-ordering races,
// cp.async (the kernels' pre-sm_80 synchronous copy path runs), and nothing checks bounds.
#pragma once
#include <math.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct __half { unsigned short b; };
struct __nv_bfloat16 { unsigned short b; };
inline float __half2float(__half h) {
  const unsigned s = (h.b >> 15) & 1, e = (h.b >> 10) & 31, f = h.b & 1023;
  float v;
  if (e == 0) v = std::ldexp(float(f), -24);
  else if (e == 31) v = f ? NAN : INFINITY;
  else v = std::ldexp(float(f | 1024), int(e) - 25);
  return s ? -v : v;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.b) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return {b}; }

template <class T>
inline T __ldg(const T* p) { return *p; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emu {
// Cooperative fibers (ucontext): all CUDA threads of a block run on one OS thread and switch only at
// barriers, so __syncthreads and the warp shuffles cost a context switch, not an OS wake-up.
struct Barrier {
  unsigned n = 0, arrived = 0;
  uint64_t gen = 0;
};
void yield();
inline void wait(Barrier& b) {
  const uint64_t g = b.gen;
  if (++b.arrived == b.n) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == g) yield();
}
inline Barrier block_bar;
inline Barrier warp_bars[32];
inline uint64_t xch[32][32];
}  // namespace emu

inline void __syncthreads() { emu::wait(emu::block_bar); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  static_assert(sizeof(T) <= 8);
  const unsigned t = threadIdx.x, w = t / 32, l = t % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::xch[w][l] = bits;
  emu::wait(emu::warp_bars[w]);
  const uint64_t got = emu::xch[w][l ^ o];
  emu::wait(emu::warp_bars[w]);
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { double o = *p; *p = o + v; return o; }
inline int atomicAdd(int* p, int v) { int o = *p; *p = o + v; return o; }
inline float4 atomicAdd(float4* p, float4 v) { float4 o = *p; p->x += v.x; p->y += v.y; p->z += v.z; p->w += v.w; return o; }

#include <ucontext.h>
#include <functional>
namespace emu {
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};
inline ucontext_t sched_ctx;
inline std::vector<Fiber> fibers;
inline int current = -1;
inline std::function<void()> body;
// Shared-memory arrays, filled with 0xFF (NaN / -1) before every block: nothing may rely on their content.
inline std::vector<std::pair<void*, size_t>> smem_regions;
inline void yield() { swapcontext(&fibers[current].ctx, &sched_ctx); }
inline void fiber_main(int t) {
  threadIdx = dim3(t);
  body();
  fibers[t].done = true;
  swapcontext(&fibers[t].ctx, &sched_ctx);
}
// Runs the kernel on every block of `grid`, one block at a time.
struct Launch {
  dim3 grid, block;
  template <class K, class... A>
  void run(K kernel, A... args) const {
    gridDim = grid;
    blockDim = block;
    const unsigned n = block.x * block.y * block.z;
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by);
        for (auto& [p, bytes] : smem_regions) std::memset(p, 0xFF, bytes);
        block_bar = Barrier{n, 0, 0};
        for (unsigned w = 0; w < 32; ++w) warp_bars[w] = Barrier{w * 32 < n ? std::min(32u, n - 32 * w) : 0u, 0, 0};
        body = [=] { kernel(args...); };
        fibers.assign(n, Fiber{});
        for (unsigned t = 0; t < n; ++t) {
          fibers[t].stack.resize(256 * 1024);
          getcontext(&fibers[t].ctx);
          fibers[t].ctx.uc_stack.ss_sp = fibers[t].stack.data();
          fibers[t].ctx.uc_stack.ss_size = fibers[t].stack.size();
          fibers[t].ctx.uc_link = nullptr;
          makecontext(&fibers[t].ctx, reinterpret_cast<void (*)()>(&fiber_main), 1, int(t));
        }
        unsigned live = n;
        while (live > 0) {
          live = 0;
          for (unsigned t = 0; t < n; ++t) {
            if (fibers[t].done) continue;
            current = int(t);
            threadIdx = dim3(t);
            swapcontext(&sched_ctx, &fibers[t].ctx);
            if (!fibers[t].done) ++live;
          }
        }
      }
  }
};
template <class K>
struct Bound {
  K kernel;
  Launch cfg;
  template <class... A>
  void operator()(A&&... args) const { cfg.run(kernel, args...); }
};
template <class K>
Bound<K> launch(K kernel, dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  return {kernel, {grid, block}};
}
}  // namespace emu

// The CUDA kernels of equss_C run on the CPU (README.md): the real kernel sources of csrc/cuda (launches
// rewritten by emu_build.py), each block as cooperative fibers (include/emu.h). The host code mirrors
// csrc/cuda/*.cu without the CUDA runtime; outputs the kernels must fully overwrite start poisoned.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "emu.h"
#include "cuda/pq_assign_tile.cuh"
#include "cuda/pq_segment_sum.cuh"
#include "cuda/pq_gather_kernel.cuh"
#include "checks.h"

namespace equss::cuda::assign { alignas(16) float4 smem_raw[256 * 1024 / 16]; }
namespace equss::cuda::segsum { alignas(16) float4 smem_raw[256 * 1024 / 16]; }

namespace {
const bool registered = [] {
  emu::smem_regions.push_back({equss::cuda::assign::smem_raw, sizeof(equss::cuda::assign::smem_raw)});
  emu::smem_regions.push_back({equss::cuda::segsum::smem_raw, sizeof(equss::cuda::segsum::smem_raw)});
  return true;
}();
using namespace equss;
using namespace equss::cuda;

template <typename T> struct storage { using type = T; };
template <> struct storage<c10::Half> { using type = __half; };
template <> struct storage<c10::BFloat16> { using type = __nv_bfloat16; };
template <typename T> using storage_t = typename storage<T>::type;
template <typename T> const storage_t<T>* sp(const at::Tensor& t) { return reinterpret_cast<const storage_t<T>*>(t.const_data_ptr<T>()); }

FloatKind kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatKind::kFloat;
    case at::kDouble: return FloatKind::kDouble;
    case at::kHalf: return FloatKind::kHalf;
    default: return FloatKind::kBFloat16;
  }
}
constexpr int kSms = 4;
// EMU_SMEM_OPTIN=bytes (default 227 KiB: pipelined); 60000 runs the single-buffer layout.
size_t optin() { const char* e = std::getenv("EMU_SMEM_OPTIN"); return e ? std::strtoull(e, nullptr, 10) : 227 * 1024; }  // small, so the emulated grids stay small and several blocks share rows

std::pair<at::Tensor, at::Tensor> pack(const at::Tensor& codebooks, bool l2) {
  const int64_t M = codebooks.size(0), K = codebooks.size(1), Ds = codebooks.size(2);
  const int64_t n_kt = assign::num_k_tiles(K);
  auto opts = codebooks.options().dtype(at::kFloat);
  at::Tensor w = at::full({M, n_kt, assign::padded_ds(Ds), assign::kBN}, 12345.f, opts);  // poison: must be overwritten
  at::Tensor b = at::full({M, n_kt * assign::kBN}, 12345.f, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebooks.scalar_type(), "pack", [&] {
    assign::launch_pack(sp<scalar_t>(codebooks), w.mutable_data_ptr<float>(), b.mutable_data_ptr<float>(), M, K, Ds, l2, nullptr);
  });
  return {w, b};
}

std::tuple<at::Tensor, at::Tensor> pq_assign(const at::Tensor& x, const at::Tensor& codebooks, c10::string_view metric) {
  check_x_codebooks(x, codebooks, "pq_assign");
  const bool l2 = parse_metric(metric, "pq_assign");
  const int64_t N = x.size(0), M = x.size(1), K = codebooks.size(1), Ds = x.size(2);
  auto codes = at::full({N, M}, -7, x.options().dtype(at::kInt));
  auto min_dist = at::full({N, M}, 777.f, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return {codes, min_dist};
  auto [w, b] = pack(codebooks, l2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "assign", [&] {
    assign::launch_assign<storage_t<scalar_t>, false>(sp<scalar_t>(x), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
        codes.mutable_data_ptr<int32_t>(), min_dist.mutable_data_ptr<float>(), N, M, K, Ds, l2, assign::FusedOut{}, optin(), nullptr);
  });
  return {codes, min_dist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pq_assign_gather(
    const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& codebooks_out, c10::string_view metric,
    const std::optional<at::Tensor>& stats_x) {
  constexpr const char* op = "pq_assign_gather";
  check_x_codebooks(x, codebooks, op);
  const bool l2 = parse_metric(metric, op);
  const bool has_stats = stats_x.has_value();
  const int64_t N = x.size(0), M = x.size(1), K = codebooks.size(1), Ds = x.size(2);
  const auto f32 = x.options().dtype(at::kFloat);
  auto codes = at::full({N, M}, -7, x.options().dtype(at::kInt));
  auto min_dist = at::full({N, M}, 777.f, f32);
  auto quantized = at::full({N, M, Ds}, 555, codebooks_out.options());
  auto sq_err = at::full({N, M}, 666.f, f32);
  auto counts = at::zeros({M, K}, f32);
  auto sums = at::zeros({M, K, has_stats ? Ds : 0}, f32);
  if (N == 0 || M == 0) return {codes, min_dist, quantized, sq_err, counts, sums};
  auto [w, b] = pack(codebooks, l2);
  assign::FusedOut fused{};
  fused.codebooks_out = {codebooks_out.const_data_ptr(), kind(codebooks_out.scalar_type())};
  fused.quantized = quantized.mutable_data_ptr();
  fused.sq_err = sq_err.mutable_data_ptr<float>();
  fused.counts = counts.mutable_data_ptr<float>();
  fused.stats_x = has_stats ? AnyFloatPtr{stats_x->const_data_ptr(), kind(stats_x->scalar_type())} : AnyFloatPtr{nullptr, FloatKind::kFloat};
  fused.sums = has_stats ? sums.mutable_data_ptr<float>() : nullptr;
  fused.group_shift = row_group_shift(Ds);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "assign_gather", [&] {
    assign::launch_assign<storage_t<scalar_t>, true>(sp<scalar_t>(x), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
        codes.mutable_data_ptr<int32_t>(), min_dist.mutable_data_ptr<float>(), N, M, K, Ds, l2, fused, optin(), nullptr);
  });
  return {codes, min_dist, quantized, sq_err, counts, sums};
}

at::Tensor pq_gather(const at::Tensor& codes, const at::Tensor& codebooks) {
  const int64_t N = codes.size(0), M = codebooks.size(0), K = codebooks.size(1), Ds = codebooks.size(2);
  auto out = at::full({N, M, Ds}, 99, codebooks.options());
  if (out.numel() == 0) return out;
  const uint64_t row_bytes = static_cast<uint64_t>(Ds) * codebooks.element_size();
  const uint64_t align = row_bytes | reinterpret_cast<uintptr_t>(codebooks.const_data_ptr()) | reinterpret_cast<uintptr_t>(out.const_data_ptr());
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "gather", [&] {
    auto go = [&](auto tag) {
      using vec_t = decltype(tag);
      const int64_t row_vecs = Ds * codebooks.element_size() / int64_t(sizeof(vec_t));
      gather::launch<index_t, vec_t>(codes.const_data_ptr<index_t>(), static_cast<const vec_t*>(codebooks.const_data_ptr()),
                                     static_cast<vec_t*>(out.mutable_data_ptr()), N, M, K, row_vecs, kSms, nullptr);
    };
    if (align % 16 == 0) go(uint4{}); else if (align % 8 == 0) go(uint2{}); else if (align % 4 == 0) go(uint32_t{}); else go(uint16_t{});
  });
  return out;
}

at::Tensor pq_gather_backward(const at::Tensor& grad_out, const at::Tensor& codes, int64_t K) {
  const int64_t N = grad_out.size(0), M = grad_out.size(1), Ds = grad_out.size(2);
  const auto acc_dtype = gather_backward_acc_dtype(grad_out.scalar_type());
  auto grad = at::zeros({M, K, Ds}, grad_out.options().dtype(acc_dtype));
  if (grad_out.numel() == 0) return grad;
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "gb", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "gb", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      segsum::launch<storage_t<scalar_t>, acc_t, index_t, false, false>(sp<scalar_t>(grad_out), codes.const_data_ptr<index_t>(),
          grad.mutable_data_ptr<acc_t>(), nullptr, N, M, K, Ds, 8 * kSms, nullptr);
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor> pq_cluster_stats(const at::Tensor& x, const at::Tensor& codes, int64_t K) {
  const int64_t N = x.size(0), M = x.size(1), Ds = x.size(2);
  auto counts = at::zeros({M, K}, x.options().dtype(at::kFloat));
  auto sums = at::zeros({M, K, Ds}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {counts, sums};
  AT_DISPATCH_INDEX_TYPES(codes.scalar_type(), "cs", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cs", [&] {
      segsum::launch<storage_t<scalar_t>, float, index_t, true, true>(sp<scalar_t>(x), codes.const_data_ptr<index_t>(),
          sums.mutable_data_ptr<float>(), counts.mutable_data_ptr<float>(), N, M, K, Ds, 8 * kSms, nullptr);
    });
  });
  return {counts, sums};
}

}  // namespace

TORCH_LIBRARY(EMU_LIB, m) {
  m.def("pq_assign(Tensor x, Tensor codebooks, str metric) -> (Tensor codes, Tensor min_dist)", &pq_assign);
  m.def("pq_assign_gather(Tensor x, Tensor codebooks, Tensor codebooks_out, str metric, Tensor? stats_x) -> "
        "(Tensor codes, Tensor min_dist, Tensor quantized, Tensor sq_err, Tensor counts, Tensor sums)", &pq_assign_gather);
  m.def("pq_gather(Tensor codes, Tensor codebooks) -> Tensor", &pq_gather);
  m.def("pq_gather_backward(Tensor grad_out, Tensor codes, int K) -> Tensor", &pq_gather_backward);
  m.def("pq_cluster_stats(Tensor x, Tensor codes, int K) -> (Tensor counts, Tensor sums)", &pq_cluster_stats);
}

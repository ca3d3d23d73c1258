// pq_assign_gather on CUDA: codes, min_dist, quantized = codebooks_out[m, code], sq_err = ||x - quantized||²
// and the step's statistics (counts, and per-codeword sums of stats_x) in one op.
//
// The codebook packing of pq_assign, then one fused kernel: the tile kernel of pq_assign (so codes and
// min_dist are bit-identical to pq_assign's) whose epilogue gathers each row's codeword from
// codebooks_out (bit copy, any dtype), computes sq_err from the fp32 x tile still in shared memory (when
// Ds <= 32; else from x again, in L2) and adds counts and stats_x sums with fp32 global atomics. x is
// read from memory once. The statistics leave out invalid rows of x (min_dist NaN) and of stats_x, as
// equss/ops/reference.py says.
#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/pq_assign_host.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace equss::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pq_assign_gather(
    const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& codebooks_out, c10::string_view metric,
    const std::optional<at::Tensor>& stats_x) {
  constexpr const char* op = "pq_assign_gather";
  check_x_codebooks(x, codebooks, op);
  check_float_tensor(codebooks_out, "codebooks_out", op, 3);
  TORCH_CHECK(codebooks_out.sizes() == codebooks.sizes(), op, ": codebooks_out ", codebooks_out.sizes(),
              " must match codebooks ", codebooks.sizes());
  const bool l2 = parse_metric(metric, op);
  const bool has_stats = stats_x.has_value();
  if (has_stats) {
    const at::Tensor& s = *stats_x;
    check_float_tensor(s, "stats_x", op, 3);
    TORCH_CHECK(s.sizes() == x.sizes(), op, ": stats_x ", s.sizes(), " must have the shape of x ", x.sizes());
    check_cuda_tensors(op, {&x, &codebooks, &codebooks_out, &s});
  } else {
    check_cuda_tensors(op, {&x, &codebooks, &codebooks_out});
  }
  const int64_t N = x.size(0), M = x.size(1), K = codebooks.size(1), Ds = x.size(2);
  check_assign_sizes(op, N, M, K, Ds);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  auto codes = at::empty({N, M}, x.options().dtype(at::kInt));
  auto min_dist = at::empty({N, M}, f32);
  auto quantized = at::empty({N, M, Ds}, codebooks_out.options());
  auto sq_err = at::empty({N, M}, f32);
  auto counts = at::zeros({M, K}, f32);
  auto sums = at::zeros({M, K, has_stats ? Ds : 0}, f32);
  if (N == 0 || M == 0) return {codes, min_dist, quantized, sq_err, counts, sums};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PackedCodebooks packed = pack_codebooks(codebooks, l2, stream);
  assign::FusedOut fused{};
  fused.codebooks_out = any_float_ptr(codebooks_out);
  fused.quantized = quantized.mutable_data_ptr();
  fused.sq_err = sq_err.mutable_data_ptr<float>();
  fused.counts = counts.mutable_data_ptr<float>();
  fused.stats_x = has_stats ? any_float_ptr(*stats_x) : AnyFloatPtr{nullptr, FloatKind::kFloat};
  fused.sums = has_stats ? sums.mutable_data_ptr<float>() : nullptr;
  fused.group_shift = row_group_shift(Ds);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equss_pq_assign_gather_cuda", [&] {
    C10_CUDA_CHECK((assign::launch_assign<storage_t<scalar_t>, true>(
        storage_ptr<scalar_t>(x), packed.w.const_data_ptr<float>(), packed.bias.const_data_ptr<float>(),
        codes.mutable_data_ptr<int32_t>(), min_dist.mutable_data_ptr<float>(), N, M, K, Ds, l2, fused, smem_optin_bytes(), stream)));
  });
  return {codes, min_dist, quantized, sq_err, counts, sums};
}

}  // namespace equss::cuda

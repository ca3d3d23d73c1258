// pq_assign on CUDA: fused distance + running argmin, the N×M×K distance tensor is never written.
//
// Two launches on the current stream: the codebooks are packed once into fp32 tiles (W = -2c or -c,
// bias = ||c||² or 0, +inf for invalid and padding codewords), then the register-blocked tile kernel
// (8 rows × 8 codewords of fp32 FMA chains per thread, operands from shared memory with LDS.128) finds
// the first minimum of every row. Design, tie and NaN rules: cuda/pq_assign_tile.cuh.
//
// Why fp32 FMA and not tensor cores: mma.sync tf32 runs at several times the FFMA rate, but its 10-bit
// products move distances by ~2^-11·Σ|x_d c_d|, so near-ties (and bit-identical codewords: ties must go to
// the lowest index) could resolve differently from the fp32 chain. An exact tf32 path needs a rigorous
// per-(row, codeword) error bound and an fp32 recheck of every codeword within twice that bound of the
// tf32 minimum: a variable-length candidate list per row (all K of them for the all-equal rows the tests
// use), and 3xTF32 split products narrow the bound without making the result bit-identical. Without a GPU
// to validate such a path, this op stays exact: the FFMA tile kernel, predicted at ~65-70 % of the FP32
// FMA peak at the EQUSS shape (the Triton backend is the primary CUDA path anyway).
#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/pq_assign_host.cuh"
#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace equss::cuda {

PackedCodebooks pack_codebooks(const at::Tensor& codebooks, bool l2, cudaStream_t stream) {
  const int64_t M = codebooks.size(0), K = codebooks.size(1), Ds = codebooks.size(2);
  const int64_t n_kt = assign::num_k_tiles(K);
  const auto opts = codebooks.options().dtype(at::kFloat);
  PackedCodebooks p{at::empty({M, n_kt, assign::padded_ds(Ds), assign::kBN}, opts),
                    at::empty({M, n_kt * assign::kBN}, opts)};
  if (M == 0) return p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, codebooks.scalar_type(), "equss_pq_pack_codebooks_cuda",
                                  [&] {
                                    assign::launch_pack(storage_ptr<scalar_t>(codebooks), p.w.mutable_data_ptr<float>(),
                                                        p.bias.mutable_data_ptr<float>(), M, K, Ds, l2, stream);
                                  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p;
}

std::tuple<at::Tensor, at::Tensor> pq_assign(const at::Tensor& x, const at::Tensor& codebooks,
                                             c10::string_view metric) {
  constexpr const char* op = "pq_assign";
  check_x_codebooks(x, codebooks, op);
  check_cuda_tensors(op, {&x, &codebooks});
  const bool l2 = parse_metric(metric, op);
  const int64_t N = x.size(0), M = x.size(1), K = codebooks.size(1), Ds = x.size(2);
  check_assign_sizes(op, N, M, K, Ds);
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto codes = at::empty({N, M}, x.options().dtype(at::kInt));
  auto min_dist = at::empty({N, M}, x.options().dtype(at::kFloat));
  if (N == 0 || M == 0) return {codes, min_dist};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PackedCodebooks packed = pack_codebooks(codebooks, l2, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "equss_pq_assign_cuda", [&] {
    C10_CUDA_CHECK((assign::launch_assign<storage_t<scalar_t>, false>(
        storage_ptr<scalar_t>(x), packed.w.const_data_ptr<float>(), packed.bias.const_data_ptr<float>(),
        codes.mutable_data_ptr<int32_t>(), min_dist.mutable_data_ptr<float>(), N, M, K, Ds, l2, assign::FusedOut{},
        smem_optin_bytes(), stream)));
  });
  return {codes, min_dist};
}

}  // namespace equss::cuda

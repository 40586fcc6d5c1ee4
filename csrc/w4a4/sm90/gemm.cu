// sm_90a W4A4 GEMM: y[M, N] = dequant(act_codes) . dequant(w)^T + lora_act . lora_up^T + bias, the
// activations scaled per (group, token) (int4 codes) or per token (pow2 codes).
// Kernel = a producer warpgroup (one thread issues the copies) + 2 or 3 consumer warpgroups
// (config.cuh, gemm_mainloop.cuh), fused epilogue (epilogue.cuh). The host side checks
// arguments, picks the tile, builds the TMA descriptor and launches.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cudaTypedefs.h>
#include <torch/library.h>

#include <ATen/ops/zeros.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <set>

#include "../check.h"
#include "../ops.h"
#include "config.cuh"
#include "epilogue.cuh"
#include "gemm_mainloop.cuh"

namespace nunchaku::w4a4::sm90 {
namespace {

template <class T, bool kBf16, bool kTokenScales>
__global__ void __launch_bounds__(T::kThreads, 1)
    w4a4_gemm_kernel(const __grid_constant__ CUtensorMap act_map, const MainloopParams mp, const EpilogueParams ep) {
  // wgmma, setmaxnreg and TMA exist only on sm_90a; the library also carries the Ampere/Ada
  // targets, for which this kernel is empty (gemm_sm90 refuses other GPUs before launching).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // The kernel has no static shared memory, so the dynamic block starts at the base of the
  // CTA's shared window (1024-byte aligned, as the 128-byte swizzle needs). Using smem_raw
  // directly (no integer round-up) keeps the compiler aware that every access is shared
  // memory: LDS/STS instead of generic LD/ST (measured: the round-up made them generic).
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  auto& sm = *reinterpret_cast<typename T::Smem*>(smem_raw);

  // Tiles along N vary fastest, so CTAs resident together share the activation tile in L2.
  const int n0 = blockIdx.x * T::kChannels;
  const int m0 = blockIdx.y * T::kTokens;
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < T::kStages; ++s) {
      ptx::mbar_init(&sm.full[s], 1);
      ptx::mbar_init(&sm.empty[s], T::kConsumerWarpgroups * 4);
    }
    ptx::fence_barrier_init();
    ptx::prefetch_tensormap(&act_map);
  }
  __syncthreads();

  if (wg == 0) {
    ptx::setmaxnreg_dec<T::kProducerRegs>();
    if (threadIdx.x == 0) producer_loop<T, kTokenScales>(sm, &act_map, mp, ep.lora_act, ep.M, ep.R, m0, n0);
  } else {
    ptx::setmaxnreg_inc<T::kConsumerRegs>();
    float acc[T::kAccRegs];
    consumer_mainloop<T, kBf16, kTokenScales>(sm, mp, wg - 1, acc);
    epilogue<T, kBf16, kTokenScales>(sm, ep, mp.ascales, mp.KT, m0, n0, wg - 1, acc);
  }
#else
  __trap();  // unreachable: gemm_sm90 checks for an sm_90a build first (check_sm90a_build)
#endif
}

// 1 when this library's sm_90 code was compiled for sm_90a. A build for plain 9.0 (e.g. a
// TORCH_CUDA_ARCH_LIST preset to "9.0") compiles the kernel above to an empty body, which would
// return uninitialized output: the op refuses such a build instead.
__global__ void sm90a_build_probe(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

void check_sm90a_build(const at::Device& dev) {
  static std::mutex mutex;
  static std::set<int> ok_devices;
  const std::lock_guard<std::mutex> lock(mutex);
  if (ok_devices.count(dev.index())) return;
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor flag = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(dev));
  sm90a_build_probe<<<1, 1, 0, c10::cuda::getCurrentCUDAStream(dev.index())>>>(flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(flag.item<int>() == 1,
              "w4a4_gemm_sm90: nunchaku._C was built without the sm_90a target (TORCH_CUDA_ARCH_LIST had 9.0, "
              "not 9.0a), so its Hopper kernels are empty; rebuild with TORCH_CUDA_ARCH_LIST including 9.0a");
  ok_devices.insert(dev.index());
}

PFN_cuTensorMapEncodeTiled_v12000 get_encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    cudaDriverEntryPointQueryResult qres;
    void* ptr = nullptr;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &qres);
    if (err == cudaSuccess && qres == cudaDriverEntryPointSuccess) fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  TORCH_CHECK(fn != nullptr, "w4a4_gemm_sm90: cuTensorMapEncodeTiled is not available from the CUDA driver");
  return fn;
}

// act_codes [M, K] bytes, row pitch K: boxes of `tokens` rows x 128 bytes, 128-byte swizzle (what
// wgmma's K-major descriptor expects); rows past M and columns past K are zero-filled.
CUtensorMap make_act_map(const at::Tensor& act_codes, int tokens) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(act_codes.size(1)), static_cast<cuuint64_t>(act_codes.size(0))};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(act_codes.stride(0))};
  const cuuint32_t box[2] = {kBlockK, static_cast<cuuint32_t>(tokens)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult res = get_encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, act_codes.data_ptr(), dims, strides,
                                       box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                       CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, "w4a4_gemm_sm90: cuTensorMapEncodeTiled failed with error ", num(static_cast<int>(res)));
  return map;
}

template <class T, bool kBf16, bool kTokenScales>
void launch(const at::Tensor& act_codes, const MainloopParams& mp, const EpilogueParams& ep, cudaStream_t stream) {
  const CUtensorMap map = make_act_map(act_codes, T::kTokens);
  const auto kernel = w4a4_gemm_kernel<T, kBf16, kTokenScales>;
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), T::kSmemBytes);
  const dim3 grid((ep.N + T::kChannels - 1) / T::kChannels, (ep.M + T::kTokens - 1) / T::kTokens);
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(map, mp, ep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T>
void launch_for_dtype(bool bf16, bool token_scales, const at::Tensor& act_codes, const MainloopParams& mp,
                      const EpilogueParams& ep, cudaStream_t stream) {
  if (token_scales) {
    bf16 ? launch<T, true, true>(act_codes, mp, ep, stream) : launch<T, false, true>(act_codes, mp, ep, stream);
  } else {
    bf16 ? launch<T, true, false>(act_codes, mp, ep, stream) : launch<T, false, false>(act_codes, mp, ep, stream);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static_assert(kScaleRowPad % Tile<2>::kTokens == 0 && kScaleRowPad % Tile<3>::kTokens == 0,
              "act_scales padding must cover whole token tiles of either tile");

// The tile for this problem: 192 tokens x 128 channels (two consumer warpgroups; measured the
// faster one per tile at M = 4608), unless 128 x 192 (three) needs fewer waves of CTAs over the
// SMs (e.g. M = 1024, N = 3072: 144 tiles against 128 on 132 SMs); NUNCHAKU_SM90_GEMM_TILE =
// "192x128" or "128x192" forces one (tests, benchmarks).
int consumer_warpgroups_for(int64_t M, int64_t N, int sms) {
  if (const char* forced = std::getenv("NUNCHAKU_SM90_GEMM_TILE"); forced != nullptr && forced[0] != '\0') {
    const std::string tile(forced);
    TORCH_CHECK(tile == "192x128" || tile == "128x192", "NUNCHAKU_SM90_GEMM_TILE must be 192x128 or 128x192 "
                "(tokens x channels), got '", tile, "'");
    return tile == "192x128" ? 2 : 3;
  }
  const int64_t waves2 = ceil_div(ceil_div(M, Tile<2>::kTokens) * ceil_div(N, Tile<2>::kChannels), sms);
  const int64_t waves3 = ceil_div(ceil_div(M, Tile<3>::kTokens) * ceil_div(N, Tile<3>::kChannels), sms);
  return waves3 < waves2 ? 3 : 2;
}

}  // namespace
}  // namespace nunchaku::w4a4::sm90

namespace nunchaku::w4a4 {

void gemm_sm90(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& wcodes_packed,
               const at::Tensor& wscales_packed, const at::Tensor& lora_act, const at::Tensor& lora_up,
               const at::Tensor& bias, int64_t gelu_from, at::Tensor& out) {
  using namespace sm90;
  constexpr const char* op = "w4a4_gemm_sm90";
  TORCH_CHECK(out.is_cuda(), op, ": out must be a CUDA tensor");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf, op,
              ": out must be bfloat16 or float16, got ", out.scalar_type());
  TORCH_CHECK(act_codes.dim() == 2, op, ": act_codes must be 2-D [M, K]");
  TORCH_CHECK(wcodes_packed.dim() == 4, op, ": wcodes_packed must be 4-D [K_pad/128, N_pad/64, 64, 64]");
  TORCH_CHECK(lora_up.dim() == 2, op, ": lora_up must be 2-D [N, R]");
  const int64_t M = act_codes.size(0), K = act_codes.size(1);
  // The grid's y dimension counts token tiles (at most 65535, of 128 tokens with the smaller tile).
  TORCH_CHECK(ceil_div(M, Tile<3>::kTokens) <= 65535, op, ": M = ", num(M), " tokens is more than the ",
              num(65535 * Tile<3>::kTokens), " one call can take; split the batch");
  const int64_t N = lora_up.size(0);
  TORCH_CHECK(N > 0 && N % 128 == 0, op, ": N = ", num(N), " (lora_up's rows) must be a positive multiple of 128");
  const int64_t n_pad = ceil_div(N, Tile<3>::kChannels) * Tile<3>::kChannels;
  const int64_t KT = wcodes_packed.size(0);
  const int64_t R = lora_up.size(1);
  TORCH_CHECK(K > 0 && K % 64 == 0, op, ": K = ", num(K), " must be a positive multiple of 64");
  TORCH_CHECK(KT == (K + kBlockK - 1) / kBlockK, op, ": wcodes_packed has ", num(KT), " K tiles, act_codes has K = ",
              num(K), " (expected ", num((K + kBlockK - 1) / kBlockK), ")");
  TORCH_CHECK(R % 16 == 0 && R >= 16 && R <= kMaxRank, op, ": rank R = ", num(R), " must be a multiple of 16 in [16, ",
              num(kMaxRank), "]");
  const int64_t m_pad = scale_rows_padded(M);
  const auto dev = out.device();
  check_device_arch(op, dev, 90, 90, "a Hopper GPU (sm_90)");
  check_sm90a_build(dev);
  check_operand(op, act_codes, "act_codes", dev, at::kByte, {M, K});
  // Group-scaled activations (int4 codes) come with [K/64, M_pad] scales, token-scaled ones (pow2
  // format: the group's power of two is in the codes) with [M_pad].
  const bool token_scales = act_scales.dim() == 1;
  if (token_scales)
    check_operand(op, act_scales, "act_scales (per token)", dev, at::kFloat, {m_pad});
  else
    check_operand(op, act_scales, "act_scales (per group and token; 1-D [M_pad] for pow2 codes)", dev, at::kFloat,
                  {K / 64, m_pad});
  check_operand(op, wcodes_packed, "wcodes_packed", dev, at::kByte,
                {KT, n_pad / kChannelBlock, kChannelBlock, kBlockK / 2});
  check_operand(op, wscales_packed, "wscales_packed", dev, out.scalar_type(), {2 * KT, n_pad});
  check_operand(op, lora_act, "lora_act", dev, at::kFloat, {M, R});
  check_operand(op, lora_up, "lora_up", dev, out.scalar_type(), {N, R});
  check_operand(op, bias, "bias", dev, out.scalar_type(), {N});
  check_operand(op, out, "out", dev, out.scalar_type(), {M, N});
  check_gelu_from(op, gelu_from, N);
  TORCH_CHECK(M <= INT32_MAX / 2 && N * K <= INT32_MAX * int64_t{8}, op, ": problem too large");
  if (M == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const MainloopParams mp{wcodes_packed.data_ptr<uint8_t>(),
                          static_cast<const uint16_t*>(wscales_packed.data_ptr()), act_scales.data_ptr<float>(),
                          static_cast<int>(n_pad), static_cast<int>(K / 64), static_cast<int>(KT),
                          static_cast<int>(m_pad)};
  const EpilogueParams ep{lora_act.data_ptr<float>(), lora_up.data_ptr(), bias.data_ptr(), out.data_ptr(),
                          static_cast<int>(M), static_cast<int>(N), static_cast<int>(R),
                          static_cast<int>(gelu_from)};
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  if (consumer_warpgroups_for(M, N, device_info(dev.index()).sms) == 2)
    launch_for_dtype<Tile<2>>(bf16, token_scales, act_codes, mp, ep, stream);
  else
    launch_for_dtype<Tile<3>>(bf16, token_scales, act_codes, mp, ep, stream);
}

}  // namespace nunchaku::w4a4

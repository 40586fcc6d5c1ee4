// Activation side of the W4A4 linear: one pass over x that
//   - smooths and quantizes it to 4-bit codes per (token, 64-channel group), stored
//       for the sm_90 GEMM as fp8 e4m3 bytes in a uint8 [M, K] tensor (that GEMM runs on the fp8
//       tensor cores; every code in [-8, 15] is exact in e4m3; uint8 rather than float8 so that
//       generic tensor utilities, opcheck included, can handle the tensor),
//       for the sm_80 GEMM (INT4 tensor cores) as nibbles, two per byte, uint8 [M, K/2],
//   - writes the per-(group, token) fp32 scales,
//   - and computes the rank-R down projection x @ lora_down from the same registers (tensor
//     cores, mma.sync m16n8k16), so the low-rank branch costs no second read of x.
//
// Work split: a CTA owns 16 tokens (one mma row block); its 8 warps take the K groups
// g = warp, warp + 8, ...; each thread holds x in the mma A-fragment layout, so the values it
// quantizes are the values it feeds to the low-rank mma. The 8 per-warp low-rank partial sums
// are added in a fixed order (deterministic output).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

#include "check.h"
#include "dtype.cuh"
#include "ops.h"
#include "ptx.cuh"

namespace nunchaku::w4a4 {
namespace {

constexpr int kRowsPerCta = 16;
constexpr int kWarps = 8;
constexpr int kMaxRank = 128;
// Must match the GEMM M tile (sm90/config.cuh kBlockM): it bulk-copies the scales of whole tiles.
constexpr int kScaleRowPad = 192;

enum class CodeFormat { kE4m3Bytes, kInt4Nibbles };

// a / b correctly rounded, given rb = RN(1/b): one Newton correction of a * rb (Markstein), the
// same result as IEEE division for normal operands at a third of its instruction count. Both
// divisions of the quantizer (x / smooth, v / ascale) reuse a reciprocal over many numerators.
__device__ __forceinline__ float div_rn(float a, float b, float rb) {
  const float q = a * rb;
  return fmaf(fmaf(-q, b, a), rb, q);
}

__device__ __forceinline__ uint8_t nibble_pair(float lo, float hi) {
  return static_cast<uint8_t>((static_cast<int>(lo) & 0xF) | ((static_cast<int>(hi) & 0xF) << 4));
}

template <CodeFormat kFormat, bool kBf16, bool kUnsigned, int kRank16>
__global__ void __launch_bounds__(kWarps * 32, kRank16 <= 2 ? 3 : 1) quantize_act_kernel(
    const uint16_t* __restrict__ x, int64_t x_ld, const uint16_t* __restrict__ smooth,
    const uint16_t* __restrict__ lora_down, int M, int K, int m_pad, uint8_t* __restrict__ codes,
    float* __restrict__ scales, float* __restrict__ lora_act) {
  using H = Half2<kBf16>;
  constexpr int kRank = kRank16 * 16;
  constexpr int kNB = kRank / 8;
  constexpr float kQMax = kUnsigned ? 15.f : 7.f;
  constexpr float kQMin = kUnsigned ? 0.f : -8.f;

  __shared__ float lora_red[kRowsPerCta][kRank];
  // Per warp: the [64, R] slice of lora_down for its current group, rows padded by 16 bytes so
  // the 8 row addresses of an ldmatrix phase fall in distinct banks.
  constexpr int kLdsRow = kRank + 8;
  extern __shared__ __align__(16) uint16_t ld_smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ra = blockIdx.x * kRowsPerCta + lane / 4;
  const int rb = ra + 8;
  const bool va = ra < M, vb = rb < M;
  const int kq = 2 * (lane % 4);
  const int G = K / 64;

  float lacc[kNB][4];
#pragma unroll
  for (int i = 0; i < kNB; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) lacc[i][j] = 0.f;

  const uint32_t* xa_row = reinterpret_cast<const uint32_t*>(x + (va ? ra : 0) * x_ld);
  const uint32_t* xb_row = reinterpret_cast<const uint32_t*>(x + (vb ? rb : 0) * x_ld);

  uint16_t* ld_buf = ld_smem + warp * 64 * kLdsRow;

  for (int g = warp; g < G; g += kWarps) {
    // lora_down rows of this group -> this warp's smem slice, with cp.async (no registers held
    // while the copy is in flight: 32 fewer registers at R = 32, so 3 CTAs fit per SM).
    constexpr int kChunksPerRow = kRank / 8;
    __syncwarp();  // every lane is done reading the previous group's slice
#pragma unroll
    for (int i = 0; i < 64 * kChunksPerRow / 32; ++i) {
      const int c = lane + 32 * i;
      const uint16_t* src = lora_down + static_cast<int64_t>(g * 64 + c / kChunksPerRow) * kRank + (c % kChunksPerRow) * 8;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                       ptx::smem_addr(ld_buf + (c / kChunksPerRow) * kLdsRow + (c % kChunksPerRow) * 8)),
                   "l"(src)
                   : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    // [k16 step][low/high 8 of the step]: bf16/fp16 pairs at channels kbase + kq + {0,1} (+8).
    uint32_t xa[4][2], xb[4][2], sm[4][2];
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k = g * 64 + 16 * s + 8 * h + kq;
        xa[s][h] = va ? __ldg(xa_row + k / 2) : 0u;
        xb[s][h] = vb ? __ldg(xb_row + k / 2) : 0u;
        sm[s][h] = __ldg(reinterpret_cast<const uint32_t*>(smooth) + k / 2);
      }


    float v_a[4][2][2], v_b[4][2][2];
    float amax_a = 0.f, amax_b = 0.f;
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float2 fs = H::to_float2(sm[s][h]);
        const float2 rs = make_float2(__frcp_rn(fs.x), __frcp_rn(fs.y));
        float2 fa = H::to_float2(xa[s][h]);
        float2 fb = H::to_float2(xb[s][h]);
        if constexpr (kUnsigned) {
          fa.x += 0.171875f; fa.y += 0.171875f;
          fb.x += 0.171875f; fb.y += 0.171875f;
        }
        v_a[s][h][0] = div_rn(fa.x, fs.x, rs.x);
        v_a[s][h][1] = div_rn(fa.y, fs.y, rs.y);
        v_b[s][h][0] = div_rn(fb.x, fs.x, rs.x);
        v_b[s][h][1] = div_rn(fb.y, fs.y, rs.y);
        amax_a = fmaxf(amax_a, fmaxf(fabsf(v_a[s][h][0]), fabsf(v_a[s][h][1])));
        amax_b = fmaxf(amax_b, fmaxf(fabsf(v_b[s][h][0]), fabsf(v_b[s][h][1])));
      }
    // The 4 lanes of a quad hold the 64 channels of one row pair.
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      amax_a = fmaxf(amax_a, __shfl_xor_sync(0xffffffffu, amax_a, o));
      amax_b = fmaxf(amax_b, __shfl_xor_sync(0xffffffffu, amax_b, o));
    }
    float sa = __fdiv_rn(amax_a, kQMax);
    float sb = __fdiv_rn(amax_b, kQMax);
    if (sa == 0.f) sa = 1.f;
    if (sb == 0.f) sb = 1.f;
    const float rsa = __frcp_rn(sa), rsb = __frcp_rn(sb);

#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int k = g * 64 + 16 * s + 8 * h + kq;
        const float qa0 = fminf(fmaxf(rintf(div_rn(v_a[s][h][0], sa, rsa)), kQMin), kQMax);
        const float qa1 = fminf(fmaxf(rintf(div_rn(v_a[s][h][1], sa, rsa)), kQMin), kQMax);
        const float qb0 = fminf(fmaxf(rintf(div_rn(v_b[s][h][0], sb, rsb)), kQMin), kQMax);
        const float qb1 = fminf(fmaxf(rintf(div_rn(v_b[s][h][1], sb, rsb)), kQMin), kQMax);
        if constexpr (kFormat == CodeFormat::kE4m3Bytes) {
          if (va) *reinterpret_cast<uint16_t*>(codes + static_cast<int64_t>(ra) * K + k) = ptx::f32x2_to_e4m3x2(qa0, qa1);
          if (vb) *reinterpret_cast<uint16_t*>(codes + static_cast<int64_t>(rb) * K + k) = ptx::f32x2_to_e4m3x2(qb0, qb1);
        } else {
          // k is even: channel k in the low nibble, k + 1 in the high one (two's complement
          // for signed codes), the order mma.sync's 4-bit fragments read.
          if (va) codes[static_cast<int64_t>(ra) * (K / 2) + k / 2] = nibble_pair(qa0, qa1);
          if (vb) codes[static_cast<int64_t>(rb) * (K / 2) + k / 2] = nibble_pair(qb0, qb1);
        }
      }
    // Rows in [M, m_pad) get scale 0: the GEMM multiplies their (zero-filled) codes by it.
    if (lane % 4 == 0) {
      if (ra < m_pad) scales[static_cast<int64_t>(g) * m_pad + ra] = va ? sa : 0.f;
      if (rb < m_pad) scales[static_cast<int64_t>(g) * m_pad + rb] = vb ? sb : 0.f;
    }

    // Low-rank down projection on the raw x; B fragments come from the smem slice through
    // ldmatrix.trans (lora_down is [K, R]: the two k of a B register are R elements apart).
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncwarp();
    const uint32_t buf_addr = ptx::smem_addr(ld_buf);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint32_t a[4] = {xa[s][0], xb[s][0], xa[s][1], xb[s][1]};
#pragma unroll
      for (int nb = 0; nb < kNB; nb += 2) {
        const int k = 16 * s + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int n = (nb + (lane >> 4)) * 8;
        uint32_t b[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                     : "r"(buf_addr + 2 * (k * kLdsRow + n)));
        ptx::mma_m16n8k16<kBf16>(lacc[nb], a, b[0], b[1]);
        ptx::mma_m16n8k16<kBf16>(lacc[nb + 1], a, b[2], b[3]);
      }
    }
  }

  // Deterministic cross-warp sum: warps add their partials one after the other.
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        const int c = nb * 8 + kq;
        float* p0 = &lora_red[lane / 4][c];
        float* p1 = &lora_red[lane / 4 + 8][c];
        if (w == 0) {
          p0[0] = lacc[nb][0]; p0[1] = lacc[nb][1];
          p1[0] = lacc[nb][2]; p1[1] = lacc[nb][3];
        } else {
          p0[0] += lacc[nb][0]; p0[1] += lacc[nb][1];
          p1[0] += lacc[nb][2]; p1[1] += lacc[nb][3];
        }
      }
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < kRowsPerCta * kRank; i += kWarps * 32) {
    const int row = blockIdx.x * kRowsPerCta + i / kRank;
    if (row < M) lora_act[static_cast<int64_t>(row) * kRank + i % kRank] = lora_red[i / kRank][i % kRank];
  }
}

template <CodeFormat kFormat, bool kBf16, bool kUnsigned>
void launch_quantize(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down, at::Tensor& codes,
                     at::Tensor& scales, at::Tensor& lora_act, int m_pad, cudaStream_t stream) {
  const int M = x.size(0), K = x.size(1), R = lora_down.size(1);
  const dim3 grid(m_pad / kRowsPerCta), block(kWarps * 32);
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* sp = reinterpret_cast<const uint16_t*>(smooth.data_ptr());
  const auto* lp = reinterpret_cast<const uint16_t*>(lora_down.data_ptr());
  auto* cp = reinterpret_cast<uint8_t*>(codes.data_ptr());
  auto* scp = scales.data_ptr<float>();
  auto* lap = lora_act.data_ptr<float>();
#define NUNCHAKU_QUANT_CASE(R16)                                                                            \
  case R16: {                                                                                               \
    constexpr int smem = kWarps * 64 * (R16 * 16 + 8) * 2;                                                  \
    static std::once_flag once;                                                                             \
    std::call_once(once, [] {                                                                               \
      C10_CUDA_CHECK(cudaFuncSetAttribute(quantize_act_kernel<kFormat, kBf16, kUnsigned, R16>,              \
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, smem));              \
    });                                                                                                     \
    quantize_act_kernel<kFormat, kBf16, kUnsigned, R16>                                                     \
        <<<grid, block, smem, stream>>>(xp, x.stride(0), sp, lp, M, K, m_pad, cp, scp, lap);                \
    break;                                                                                                  \
  }
  switch (R / 16) {
    NUNCHAKU_QUANT_CASE(1)
    NUNCHAKU_QUANT_CASE(2)
    NUNCHAKU_QUANT_CASE(3)
    NUNCHAKU_QUANT_CASE(4)
    NUNCHAKU_QUANT_CASE(5)
    NUNCHAKU_QUANT_CASE(6)
    NUNCHAKU_QUANT_CASE(7)
    NUNCHAKU_QUANT_CASE(8)
    default:
      TORCH_CHECK(false, "w4a4_quantize_act: rank ", num(R), " is not a multiple of 16 in [16, ", num(kMaxRank), "]");
  }
#undef NUNCHAKU_QUANT_CASE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <CodeFormat kFormat>
void quantize_act(const char* op, const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                  bool act_unsigned, at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& lora_act) {
  constexpr bool kNibbles = kFormat == CodeFormat::kInt4Nibbles;
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", num(x.dim()), "-D");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K > 0 && K % 64 == 0, op, ": K = ", num(K), " must be a positive multiple of 64");
  TORCH_CHECK(x.stride(1) == 1, op, ": x must have a contiguous last dimension (stride(1) == 1)");
  TORCH_CHECK(x.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0, op,
              ": x rows must start at 4-byte aligned addresses (even row stride, aligned base)");
  for (const auto* t : {&smooth, &lora_down}) {
    TORCH_CHECK(t->device() == x.device(), op, ": smooth and lora_down must be on x's device");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": smooth and lora_down must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": smooth and lora_down must be contiguous");
  }
  TORCH_CHECK(smooth.dim() == 1 && smooth.size(0) == K, op, ": smooth must be [K] = [", num(K), "], got ",
              shape(smooth.sizes()));
  TORCH_CHECK(lora_down.dim() == 2 && lora_down.size(0) == K, op, ": lora_down must be [K, R] with K = ", num(K),
              ", got ", shape(lora_down.sizes()));
  const int64_t R = lora_down.size(1);
  TORCH_CHECK(R % 16 == 0 && R >= 16 && R <= kMaxRank, op, ": rank R = ", num(R),
              " must be a multiple of 16 in [16, ", num(kMaxRank), "]");
  const int64_t m_pad = (M + kScaleRowPad - 1) / kScaleRowPad * kScaleRowPad;
  const int64_t code_cols = kNibbles ? K / 2 : K;
  TORCH_CHECK(act_codes.device() == x.device() && act_codes.scalar_type() == at::kByte &&
                  act_codes.is_contiguous() && act_codes.dim() == 2 && act_codes.size(0) == M &&
                  act_codes.size(1) == code_cols,
              op, ": act_codes must be a contiguous uint8 [M, ", kNibbles ? "K/2" : "K", "] = [", num(M), ", ",
              num(code_cols), "] tensor (", kNibbles ? "int4 nibble pairs" : "e4m3 bytes", ") on x's device");
  TORCH_CHECK(act_scales.device() == x.device() && act_scales.scalar_type() == at::kFloat &&
                  act_scales.is_contiguous() && act_scales.dim() == 2 && act_scales.size(0) == K / 64 &&
                  act_scales.size(1) == m_pad,
              op, ": act_scales must be a contiguous float32 [K/64, M_pad] = [", num(K / 64), ", ", num(m_pad),
              "] tensor on x's device (M_pad = M rounded up to 192)");
  TORCH_CHECK(lora_act.device() == x.device() && lora_act.scalar_type() == at::kFloat && lora_act.is_contiguous() &&
                  lora_act.dim() == 2 && lora_act.size(0) == M && lora_act.size(1) == R,
              op, ": lora_act must be a contiguous float32 [M, R] = [", num(M), ", ", num(R), "] tensor on x's device");
  TORCH_CHECK(K <= INT32_MAX && M * K <= (int64_t{1} << 40), op, ": problem too large");
  if (M == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (bf16) {
    act_unsigned ? launch_quantize<kFormat, true, true>(x, smooth, lora_down, act_codes, act_scales, lora_act, m_pad, stream)
                 : launch_quantize<kFormat, true, false>(x, smooth, lora_down, act_codes, act_scales, lora_act, m_pad, stream);
  } else {
    act_unsigned ? launch_quantize<kFormat, false, true>(x, smooth, lora_down, act_codes, act_scales, lora_act, m_pad, stream)
                 : launch_quantize<kFormat, false, false>(x, smooth, lora_down, act_codes, act_scales, lora_act, m_pad, stream);
  }
}

}  // namespace

void quantize_act_sm90(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                       bool act_unsigned, at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& lora_act) {
  constexpr const char* op = "w4a4_quantize_act_sm90";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  // e4m3 conversion instructions exist from sm_89 on; the codes feed the sm_90 GEMM.
  check_device_arch(op, x.device(), 89, 90, "an sm_89 or sm_90 GPU (fp8 conversion)");
  quantize_act<CodeFormat::kE4m3Bytes>(op, x, smooth, lora_down, act_unsigned, act_codes, act_scales, lora_act);
}

void quantize_act_sm80(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                       bool act_unsigned, at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& lora_act) {
  constexpr const char* op = "w4a4_quantize_act_sm80";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  check_device_arch(op, x.device(), 80, 90, "an sm_80 or newer GPU");
  quantize_act<CodeFormat::kInt4Nibbles>(op, x, smooth, lora_down, act_unsigned, act_codes, act_scales, lora_act);
}

}  // namespace nunchaku::w4a4

// Ampere/Ada (sm_80/86/89) W4A4 GEMM on the INT4 tensor cores:
//   y[M, N] = sum_g ascale[g, m] * wscale[g, n] * (qa[m, g-th 64 K] . qw[n, same])
//             + lora_act . lora_up^T + bias, accumulated in fp32, rounded once.
// One mma.sync m16n8k64 consumes exactly one 64-wide quantization group, so its int32 result is
// the exact group dot product and is promoted right away (fp32 FMA with the two scales).
// Classic sm_80 structure: 8 warps in a 2 x 4 grid, each 64 tokens x 32 channels; a 4-stage
// cp.async pipeline with one group (64 K) per stage; fragments through ldmatrix.
// Operands need no repacking: codes are stored two per byte, even k in the low nibble, which is
// the order the 4-bit mma fragments read. See nunchaku/ops/sm80_layout.py for every tensor.
// (gemm_sm80.cu, not gemm.cu: torch.utils.cpp_extension.load names object files by base name.)
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../check.h"
#include "../dtype.cuh"
#include "../lowrank_epilogue.cuh"
#include "../ops.h"
#include "../ptx.cuh"

namespace nunchaku::w4a4::sm80 {
namespace {

constexpr int kGroup = 64;
constexpr int kBlockM = 128, kBlockN = 128, kStages = 4;
constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpM = kBlockM / kWarpsM, kWarpN = kBlockN / kWarpsN;
constexpr int kMTiles = kWarpM / 16, kNTiles = kWarpN / 8;
constexpr int kRowBytes = kGroup / 2;  // one row's codes of one group

struct SharedStorage {
  uint8_t act[kStages][kBlockM * kRowBytes];
  uint8_t w[kStages][kBlockN * kRowBytes];
  float ascale[kStages][kBlockM];
  uint16_t wscale[kStages][kBlockN];
};

struct Params {
  const uint8_t* act;      // [M, K/2]
  const float* ascale;     // [G, m_pad]
  const uint8_t* w;        // [N, K/2]
  const uint16_t* wscale;  // [G, N], out dtype
  int M, N, G, m_pad;
};

// Byte offset of 16-byte chunk c (0 or 1) of tile row r. Rows are 32 bytes, so the 8 rows one
// ldmatrix phase reads would share banks pairwise; XOR-ing the chunk with bit 2 of the row puts
// them in 8 distinct 16-byte bank groups.
__device__ __forceinline__ int swizzle(int r, int c) { return r * kRowBytes + ((c ^ ((r >> 2) & 1)) << 4); }

__device__ __forceinline__ void load_stage(SharedStorage& sm, const Params& p, int slot, int g, int m0, int n0) {
  const int t = threadIdx.x;
  const int64_t pitch = static_cast<int64_t>(p.G) * kRowBytes;
  // 128 rows x 2 chunks of activation codes and as many of weight codes: one of each per thread.
  const int row = t >> 1, c = t & 1;
  const bool m_ok = m0 + row < p.M;
  ptx::cp_async_16(sm.act[slot] + swizzle(row, c), p.act + (m_ok ? m0 + row : 0) * pitch + g * kRowBytes + 16 * c, m_ok);
  ptx::cp_async_16(sm.w[slot] + swizzle(row, c), p.w + (n0 + row) * pitch + g * kRowBytes + 16 * c, true);
  if (t < kBlockM / 4) {
    // m_pad >= M is a multiple of 4: a 4-row chunk that starts below M lies inside act_scales
    // (its rows past M hold 0); chunks past M are zero-filled.
    const int r = m0 + 4 * t;
    ptx::cp_async_16(&sm.ascale[slot][4 * t], p.ascale + static_cast<int64_t>(g) * p.m_pad + (r < p.M ? r : 0), r < p.M);
  } else if (t < kBlockM / 4 + kBlockN / 8) {
    const int i = t - kBlockM / 4;
    ptx::cp_async_16(&sm.wscale[slot][8 * i], p.wscale + static_cast<int64_t>(g) * p.N + n0 + 8 * i, true);
  }
}

template <bool kBf16, bool kUnsigned>
__global__ void __launch_bounds__(kThreads, 1) w4a4_gemm_kernel(const Params p, const EpilogueParams ep) {
  __shared__ __align__(128) SharedStorage sm;
  const int n0 = blockIdx.x * kBlockN, m0 = blockIdx.y * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;

  float acc[kMTiles][4 * kNTiles];
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < 4 * kNTiles; ++j) acc[i][j] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < p.G) load_stage(sm, p, s, s, m0, n0);
    ptx::cp_async_commit();
  }

  // ldmatrix.x4 row addresses: A tiles are 16 rows x 2 chunks (matrices: rows 0-7 / 8-15 of
  // chunk 0, then of chunk 1 = fragment registers a0..a3); B loads two n8 tiles (matrices:
  // tile 0 chunk 0 / chunk 1, tile 1 chunk 0 / chunk 1 = b0, b1 of each).
  const int a_row = wm * kWarpM + (lane & 15), a_chunk = lane >> 4;
  const int b_row = wn * kWarpN + ((lane >> 4) << 3) + (lane & 7), b_chunk = (lane >> 3) & 1;

  for (int g = 0; g < p.G; ++g) {
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage g landed for everyone, and stage g-1's slot is free to refill
    if (g + kStages - 1 < p.G) load_stage(sm, p, (g + kStages - 1) % kStages, g + kStages - 1, m0, n0);
    ptx::cp_async_commit();

    const int slot = g % kStages;
    const uint32_t act_base = ptx::smem_addr(sm.act[slot]), w_base = ptx::smem_addr(sm.w[slot]);
    uint32_t a[kMTiles][4], b[kNTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) ptx::ldmatrix_x4(a[mt], act_base + swizzle(a_row + 16 * mt, a_chunk));
#pragma unroll
    for (int pair = 0; pair < kNTiles / 2; ++pair) {
      uint32_t r[4];
      ptx::ldmatrix_x4(r, w_base + swizzle(b_row + 16 * pair, b_chunk));
      b[2 * pair][0] = r[0];
      b[2 * pair][1] = r[1];
      b[2 * pair + 1][0] = r[2];
      b[2 * pair + 1][1] = r[3];
    }

    float as[kMTiles][2], ws[kNTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      as[mt][0] = sm.ascale[slot][wm * kWarpM + 16 * mt + lane / 4];
      as[mt][1] = sm.ascale[slot][wm * kWarpM + 16 * mt + lane / 4 + 8];
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      const float2 f = Half2<kBf16>::to_float2(
          *reinterpret_cast<const uint32_t*>(&sm.wscale[slot][wn * kWarpN + 8 * nt + 2 * (lane % 4)]));
      ws[nt][0] = f.x;
      ws[nt][1] = f.y;
    }

#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        int part[4];
        ptx::mma_m16n8k64_4bit<kUnsigned>(part, a[mt], b[nt][0], b[nt][1]);
        // C fragment: (row lane/4, cols 2*(lane%4) + {0,1}), then the same 8 rows further down.
        float* c = &acc[mt][4 * nt];
        c[0] = fmaf(ptx::small_int_to_float(part[0]), as[mt][0] * ws[nt][0], c[0]);
        c[1] = fmaf(ptx::small_int_to_float(part[1]), as[mt][0] * ws[nt][1], c[1]);
        c[2] = fmaf(ptx::small_int_to_float(part[2]), as[mt][1] * ws[nt][0], c[2]);
        c[3] = fmaf(ptx::small_int_to_float(part[3]), as[mt][1] * ws[nt][1], c[3]);
      }
  }

#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
    lowrank_bias_store<kBf16, kNTiles>(ep, GlobalEpilogueOperands{ep}, m0 + wm * kWarpM + 16 * mt + lane / 4,
                                       n0 + wn * kWarpN, acc[mt]);
}

template <bool kBf16, bool kUnsigned>
void launch(const Params& p, const EpilogueParams& ep, cudaStream_t stream) {
  const dim3 grid(p.N / kBlockN, (p.M + kBlockM - 1) / kBlockM);
  w4a4_gemm_kernel<kBf16, kUnsigned><<<grid, kThreads, 0, stream>>>(p, ep);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace nunchaku::w4a4::sm80

namespace nunchaku::w4a4 {

void gemm_sm80(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& wcodes,
               const at::Tensor& wscales, const at::Tensor& lora_act, const at::Tensor& lora_up,
               const at::Tensor& bias, bool act_unsigned, int64_t gelu_from, at::Tensor& out) {
  using namespace sm80;
  constexpr const char* op = "w4a4_gemm_sm80";
  TORCH_CHECK(out.is_cuda(), op, ": out must be a CUDA tensor");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf, op,
              ": out must be bfloat16 or float16, got ", out.scalar_type());
  TORCH_CHECK(act_codes.dim() == 2, op, ": act_codes must be 2-D [M, K/2]");
  TORCH_CHECK(wcodes.dim() == 2, op, ": wcodes must be 2-D [N, K/2]");
  TORCH_CHECK(lora_up.dim() == 2, op, ": lora_up must be 2-D [N, R]");
  const int64_t M = act_codes.size(0), K = 2 * act_codes.size(1);
  const int64_t N = wcodes.size(0), R = lora_up.size(1);
  TORCH_CHECK(K > 0 && K % kGroup == 0, op, ": K = ", num(K), " must be a positive multiple of 64");
  TORCH_CHECK(N > 0 && N % kBlockN == 0, op, ": N = ", num(N), " must be a positive multiple of ", num(kBlockN));
  TORCH_CHECK(R % 16 == 0 && R >= 16, op, ": rank R = ", num(R), " must be a positive multiple of 16");
  const int64_t m_pad = scale_rows_padded(M);
  const auto dev = out.device();
  check_device_arch(op, dev, 80, 90, "an sm_80 or newer GPU (INT4 mma.sync)");
  check_operand(op, act_codes, "act_codes", dev, at::kByte, {M, K / 2});
  check_operand(op, act_scales, "act_scales", dev, at::kFloat, {K / kGroup, m_pad});
  check_operand(op, wcodes, "wcodes", dev, at::kByte, {N, K / 2});
  check_operand(op, wscales, "wscales", dev, out.scalar_type(), {K / kGroup, N});
  check_operand(op, lora_act, "lora_act", dev, at::kFloat, {M, R});
  check_operand(op, lora_up, "lora_up", dev, out.scalar_type(), {N, R});
  check_operand(op, bias, "bias", dev, out.scalar_type(), {N});
  check_operand(op, out, "out", dev, out.scalar_type(), {M, N});
  check_gelu_from(op, gelu_from, N);
  TORCH_CHECK(M <= INT32_MAX / 2 && N <= INT32_MAX / 2 && K <= INT32_MAX / 2, op, ": problem too large");
  if (M == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Params p{act_codes.data_ptr<uint8_t>(), act_scales.data_ptr<float>(), wcodes.data_ptr<uint8_t>(),
                 static_cast<const uint16_t*>(wscales.data_ptr()), static_cast<int>(M), static_cast<int>(N),
                 static_cast<int>(K / kGroup), static_cast<int>(m_pad)};
  const EpilogueParams ep{lora_act.data_ptr<float>(), lora_up.data_ptr(), bias.data_ptr(), out.data_ptr(),
                          static_cast<int>(M), static_cast<int>(N), static_cast<int>(R),
                          static_cast<int>(gelu_from)};
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  if (bf16)
    act_unsigned ? launch<true, true>(p, ep, stream) : launch<true, false>(p, ep, stream);
  else
    act_unsigned ? launch<false, true>(p, ep, stream) : launch<false, false>(p, ep, stream);
}

}  // namespace nunchaku::w4a4

// Activation side of the W4A4 linear: one pass over x that
//   - smooths and quantizes it to 4-bit codes per (token, 64-channel group), stored
//       for the sm_90 GEMM as fp8 e4m3 bytes in a uint8 [M, K] tensor (that GEMM runs on the fp8
//       tensor cores; every code in [-8, 15] is exact in e4m3; uint8 rather than float8 so that
//       generic tensor utilities, opcheck included, can handle the tensor),
//       for the sm_80 GEMM (INT4 tensor cores) as nibbles, two per byte, uint8 [M, K/2],
//     and writes the per-(group, token) fp32 scales;
//   - or, in the pow2 format (for the sm_90 GEMM), to integers q in [-16, 16] with a power-of-two scale
//     2^e per (token, group), the smallest with 16 * 2^e >= the group's max |v| (so the step is
//     at most max/8, finer than the 4-bit format's max/7 in every group); stored as the e4m3
//     bytes of q * 2^(e - t + 4), t = the token's largest e, with 2^(t - 4) as the token's one
//     scale: the GEMM then promotes with the weight scale alone. Until t is known (the token's groups are
//     spread over a cluster) the codes go out as int8 q and the exponents stay in shared memory;
//     after the cluster has agreed on t, each thread rewrites its own codes.
//   - and computes the rank-R down projection x @ lora_down from the same shared-memory copy of
//     x (tensor cores, mma.sync m16n8k16), so the low-rank branch costs no second read of x.
//
// Work split: a CTA owns 32 tokens and a range of K groups, which it walks through a
// kStages-deep cp.async ring of (x tile [32 x 64], lora_down slice [64 x R]); the lora_down slice
// is shared by the CTA's 32 tokens. On sm_90 the K groups are split over the CTAs of a cluster
// (gridDim.y of them): with whole rows per CTA there were only M/32 CTAs of 4 warps, about one
// warp per scheduler, and the kernel was latency-bound; the split gives every SM several CTAs,
// and the cluster adds the CTAs' low-rank partial sums through distributed shared memory in a
// fixed order (deterministic, no workspace). Every global access is 16 bytes wide (the previous design, 4-byte x loads and 2-byte
// code stores in the mma fragment layout, was bound by the count of memory instructions: ncu
// showed LG throttle and long-scoreboard stalls at 5x the memory floor). Quantization: thread
// (row = tid / 4, quarter = tid % 4) takes 16 consecutive channels of the group from shared
// memory and writes their codes as one 16-byte (e4m3) or 8-byte (nibbles) store. Low-rank
// branch: warp w takes m16 block w % 2 and k16 steps {2, 3} * (w / 2) + {0, 1} of every group
// for all R columns; the two k halves are added in a fixed order at the end (deterministic).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cooperative_groups.h>
#include <mutex>

#include "check.h"
#include "dtype.cuh"
#include "ops.h"
#include "ptx.cuh"

namespace nunchaku::w4a4 {
namespace {

constexpr int kRowsPerCta = 32;
constexpr int kThreads = 128;
// cp.async ring depth: 4, or 3 above rank 96 so that rank 128 fits the 99 KB of shared memory
// a CTA may use on sm_86/sm_89 (4 stages would need 102 KB there).
template <int kRank>
constexpr int kStagesFor = kRank > 96 ? 3 : 4;
constexpr int kMaxRank = 128;
constexpr int kGroup = 64;
// Row pitch of the x tile in shared memory, in 16-bit elements: 128 bytes of data + 16 of
// padding, so that the 8 rows an ldmatrix phase (or a quarter-warp's 16-byte loads) touches
// fall into distinct banks.
constexpr int kXPitch = kGroup + 8;
static_assert(kScaleRowPad % kRowsPerCta == 0, "CTAs must tile M_pad exactly");

enum class CodeFormat { kE4m3Bytes, kInt4Nibbles, kE4m3Pow2 };

// pow2 format: the exponent floor (groups with max |v| below 2^-96 get 2^-100: zero for any
// activation that matters, and it keeps every 2^-e a normal float).
constexpr int kPow2MinExp = -100;
constexpr float kPow2QMax = 16.f;
// Codes are q * 2^(e - t + kPow2CodeShift): the largest, 16 * 2^4 = 256, fits e4m3 (max 448), and
// groups down to 2^-13 of the token's largest stay exact.
constexpr int kPow2CodeShift = 4;

// The smallest e >= kPow2MinExp with 16 * 2^e >= amax (amax >= 0): ceil(log2(amax)) - 4, read off
// the float's bits (exact, no log).
__device__ __forceinline__ int pow2_group_exponent(float amax) {
  const uint32_t bits = __float_as_uint(amax);
  const int ceil_log2 = static_cast<int>(bits >> 23) - 127 + ((bits & 0x7FFFFFu) != 0 ? 1 : 0);
  return max(kPow2MinExp, ceil_log2 - 4);
}

// 2^e as a float, for e in [-126, 127].
__device__ __forceinline__ float exp2_int(int e) { return __int_as_float((127 + e) << 23); }

// a / b correctly rounded, given rb = RN(1/b): one Newton correction of a * rb (Markstein), the
// same result as IEEE division for normal operands at a third of its instruction count. Both
// divisions of the quantizer (x / smooth, v / ascale) reuse a reciprocal over many numerators.
__device__ __forceinline__ float div_rn(float a, float b, float rb) {
  const float q = a * rb;
  return fmaf(fmaf(-q, b, a), rb, q);
}

__device__ __forceinline__ uint32_t nibble_pair(float lo, float hi) {
  return (static_cast<uint32_t>(static_cast<int>(lo)) & 0xF) | ((static_cast<uint32_t>(static_cast<int>(hi)) & 0xF) << 4);
}

template <int kRank>
struct QuantSmem {
  static constexpr int kLdPitch = kRank + 8;  // lora_down slice row pitch (ldmatrix.trans, no conflicts)
  static constexpr int kStages = kStagesFor<kRank>;
  uint16_t x[kStages][kRowsPerCta * kXPitch];
  uint16_t lora_down[kStages][kGroup * kLdPitch];
  // The group's 64 smoothing factors ride the same ring (a global load per group sat in front of
  // the quantization: 9% of the kernel's stall samples).
  alignas(16) uint16_t smooth[kStages][kGroup];
  union alignas(16) {
    // In the loop: each warp's reciprocals of the current group's 64 smoothing factors. A warp
    // computes them once (two per lane) where every thread used to compute its own 16, 32 times
    // over per CTA; those correctly rounded reciprocals, each behind a branch to its slow path,
    // were half the loop. (Sharing the space matters: 1 KB more per CTA once left four CTAs an
    // SM instead of five with the pow2 format's exponent bytes, KERNEL_NOTES.md "Session 10".)
    float smooth_rcp[kThreads / 32][kGroup];
    // After it: the partial sums of the second k half, then of the CTA.
    float lora_half[kRowsPerCta][kRank];
  };
  int token_exp[kRowsPerCta];           // pow2 format: this CTA's largest group exponent per row
};

// One thread's share of the copies of successive groups into the ring: the smoothing factors
// (threads 0-7), two 16-byte chunks of the x tile (rows past M zero-filled) and R/16 chunks of the
// lora_down slice. The source pointers are loop-carried and advance one group per call: worked
// out from the group index each time, the addresses were a fifth of the loop's instructions.
template <int kRank>
struct GroupLoader {
  static constexpr int kChunksPerRow = kRank / 8;
  static constexpr int kXChunks = kRowsPerCta * 8 / kThreads;
  static constexpr int kLdChunks = kGroup * kChunksPerRow / kThreads;
  const uint16_t* x_src[kXChunks];
  const uint16_t* ld_src;
  const uint16_t* smooth_src;
  uint32_t x_fill;  // bit i: chunk i's row is below M

  __device__ __forceinline__ GroupLoader(const uint16_t* __restrict__ x, int64_t x_ld,
                                         const uint16_t* __restrict__ smooth,
                                         const uint16_t* __restrict__ lora_down, int m0, int M, int g) {
    const int t = threadIdx.x;
    x_fill = 0;
#pragma unroll
    for (int i = 0; i < kXChunks; ++i) {
      const int c = t + kThreads * i;
      const int row = c / 8, chunk = c % 8;
      const bool ok = m0 + row < M;
      x_fill |= ok ? 1u << i : 0u;
      x_src[i] = x + (ok ? m0 + row : 0) * x_ld + g * kGroup + chunk * 8;
    }
    ld_src = lora_down + static_cast<int64_t>(g) * kGroup * kRank + t * 8;
    smooth_src = smooth + g * kGroup + t * 8;
  }

  // Copies the next group into ring slot `slot` and moves on to the group after it.
  __device__ __forceinline__ void load_next(QuantSmem<kRank>& sm, int slot) {
    const int t = threadIdx.x;
    if (t < kGroup / 8) ptx::cp_async_16(&sm.smooth[slot][0] + t * 8, smooth_src, true);
#pragma unroll
    for (int i = 0; i < kXChunks; ++i) {
      const int c = t + kThreads * i;
      ptx::cp_async_16(&sm.x[slot][(c / 8) * kXPitch + (c % 8) * 8], x_src[i], (x_fill >> i) & 1u);
      x_src[i] += kGroup;
    }
    // The group's lora_down rows are contiguous: chunk c of the slice starts at element 8 c.
#pragma unroll
    for (int i = 0; i < kLdChunks; ++i) {
      const int c = t + kThreads * i;
      ptx::cp_async_16(&sm.lora_down[slot][(c / kChunksPerRow) * QuantSmem<kRank>::kLdPitch + (c % kChunksPerRow) * 8],
                       ld_src + i * kThreads * 8, true);
    }
    ld_src += kGroup * kRank;
    smooth_src += kGroup;
  }
};

// pow2 format, once the token exponent t of this thread's row is known: rewrites the thread's own
// provisional int8 codes (16 per group, written by this same thread) as the e4m3 bytes of
// q * 2^(e - t + 4), and the first CTA of the row block writes the token scale 2^(t - 4) (0 on
// rows past M). The codes are exact in e4m3 down to e - t = -13; below, the conversion rounds
// (those groups' maxima are under 2^-13 of the token's largest group).
__device__ __forceinline__ void pow2_finish(uint8_t* __restrict__ codes, float* __restrict__ scales,
                                            const int8_t* group_exp, int K, int M, int m0, int g_begin,
                                            int g_count, int groups_per_split, int row_exp) {
  const int t = threadIdx.x, q_row = t / 4, quarter = t % 4;
  const int64_t row = m0 + q_row;
  // kBatch groups' loads are issued before any of their stores: one at a time, every group
  // waited a full round trip to L2.
  constexpr int kBatch = 8;
  if (row < M) {
    uint4* base = reinterpret_cast<uint4*>(codes + row * K + g_begin * kGroup + quarter * 16);
    for (int i0 = 0; i0 < g_count; i0 += kBatch) {
      uint4 in[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b)
        if (i0 + b < g_count) in[b] = base[(i0 + b) * (kGroup / 16)];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (i0 + b >= g_count) break;
        const int d = group_exp[q_row * groups_per_split + i0 + b] - row_exp + kPow2CodeShift;  // <= 4
        const float factor = d >= -126 ? exp2_int(d) : 0.f;
        const uint32_t words[4] = {in[b].x, in[b].y, in[b].z, in[b].w};
        uint32_t out[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float f[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) f[k] = static_cast<float>(static_cast<int8_t>(words[j] >> (8 * k))) * factor;
          out[j] = ptx::f32x4_to_e4m3x4(f[0], f[1], f[2], f[3]);
        }
        base[(i0 + b) * (kGroup / 16)] = make_uint4(out[0], out[1], out[2], out[3]);
      }
    }
  }
  if (blockIdx.y == 0 && quarter == 0) scales[row] = row < M ? exp2_int(row_exp - kPow2CodeShift) : 0.f;
}

template <CodeFormat kFormat, bool kBf16, bool kUnsigned, int kRank16>
__global__ void __launch_bounds__(kThreads) quantize_act_kernel(
    const uint16_t* __restrict__ x, int64_t x_ld, const uint16_t* __restrict__ smooth,
    const uint16_t* __restrict__ lora_down, int M, int K, int m_pad, uint8_t* __restrict__ codes,
    float* __restrict__ scales, float* __restrict__ lora_act) {
  using H = Half2<kBf16>;
  constexpr int kRank = kRank16 * 16;
  constexpr int kNTiles = kRank / 8;
  constexpr bool kPow2 = kFormat == CodeFormat::kE4m3Pow2;
  static_assert(!(kPow2 && kUnsigned), "the pow2 format is signed only");
  constexpr float kQMax = kPow2 ? kPow2QMax : kUnsigned ? 15.f : 7.f;
  constexpr float kQMin = kPow2 ? -kPow2QMax : kUnsigned ? 0.f : -8.f;
  constexpr int kStages = QuantSmem<kRank>::kStages;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  auto& sm = *reinterpret_cast<QuantSmem<kRank>*>(smem_raw);

  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  const int m0 = blockIdx.x * kRowsPerCta;
  const int G = K / kGroup;
  // This CTA's groups: split `gridDim.y` ways (a cluster along y on sm_90, else gridDim.y == 1).
  const int groups_per_split = (G + gridDim.y - 1) / gridDim.y;
  const int g_begin = min(G, static_cast<int>(blockIdx.y) * groups_per_split);
  const int g_count = min(G, g_begin + groups_per_split) - g_begin;
  const int q_row = t / 4, quarter = t % 4;
  const bool row_ok = m0 + q_row < M;
  const int mb = warp % 2, kh = warp / 2;
  // pow2 format: the group exponents of this CTA's rows ([kRowsPerCta][groups_per_split], after
  // the fixed part of shared memory) and this row's largest.
  int8_t* group_exp = reinterpret_cast<int8_t*>(smem_raw + sizeof(QuantSmem<kRank>));
  int row_exp = kPow2MinExp;

  float lacc[kNTiles][4];
#pragma unroll
  for (int i = 0; i < kNTiles; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) lacc[i][j] = 0.f;

  GroupLoader<kRank> loader(x, x_ld, smooth, lora_down, m0, M, g_begin);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < g_count) loader.load_next(sm, s);
    ptx::cp_async_commit();
  }

  for (int gi = 0; gi < g_count; ++gi) {
    const int g = g_begin + gi;
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();  // group g landed for all; the slot of group g-1 is free to refill
    if (gi + kStages - 1 < g_count)
      loader.load_next(sm, (gi + kStages - 1) % kStages);
    ptx::cp_async_commit();
    const int slot = gi % kStages;

    float* rcp = sm.smooth_rcp[warp];
    {
      const float2 f = H::to_float2(reinterpret_cast<const uint32_t*>(sm.smooth[slot])[lane]);
      *reinterpret_cast<float2*>(&rcp[2 * lane]) = make_float2(__frcp_rn(f.x), __frcp_rn(f.y));
    }

    // ---- low-rank down projection on the raw x, issued before the quantization so that it covers
    // the reciprocals' latency: A fragments by ldmatrix from the x tile, B fragments by
    // ldmatrix.trans from the lora_down slice (stored [k][r]).
    const uint32_t x_base = ptx::smem_addr(&sm.x[slot][0]);
    const uint32_t ld_base = ptx::smem_addr(&sm.lora_down[slot][0]);
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const int k16 = 16 * (2 * kh + ks);
      uint32_t a[4];
      ptx::ldmatrix_x4(a, x_base + 2 * ((16 * mb + (lane & 15)) * kXPitch + k16 + 8 * (lane >> 4)));
#pragma unroll
      for (int nt = 0; nt < kNTiles; nt += 2) {
        const int k = k16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int n = (nt + (lane >> 4)) * 8;
        uint32_t b[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
                     : "r"(ld_base + 2 * (k * QuantSmem<kRank>::kLdPitch + n)));
        ptx::mma_m16n8k16<kBf16>(lacc[nt], a, b[0], b[1]);
        ptx::mma_m16n8k16<kBf16>(lacc[nt + 1], a, b[2], b[3]);
      }
    }

    __syncwarp();

    // ---- quantization: 16 channels of one row per thread
    uint32_t xw[8], sw[8];
    float rs[16];
    {
      const uint4* xs = reinterpret_cast<const uint4*>(&sm.x[slot][q_row * kXPitch + quarter * 16]);
      const uint4 x0 = xs[0], x1 = xs[1];
      const uint4* sp = reinterpret_cast<const uint4*>(&sm.smooth[slot][quarter * 16]);
      const uint4 s0 = sp[0], s1 = sp[1];
      xw[0] = x0.x; xw[1] = x0.y; xw[2] = x0.z; xw[3] = x0.w; xw[4] = x1.x; xw[5] = x1.y; xw[6] = x1.z; xw[7] = x1.w;
      sw[0] = s0.x; sw[1] = s0.y; sw[2] = s0.z; sw[3] = s0.w; sw[4] = s1.x; sw[5] = s1.y; sw[6] = s1.z; sw[7] = s1.w;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float4 r4 = reinterpret_cast<const float4*>(&rcp[quarter * 16])[j];
        rs[4 * j] = r4.x; rs[4 * j + 1] = r4.y; rs[4 * j + 2] = r4.z; rs[4 * j + 3] = r4.w;
      }
    }
    float v[16];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 fs = H::to_float2(sw[i]);
      float2 fx = H::to_float2(xw[i]);
      if constexpr (kUnsigned) {
        fx.x += 0.171875f;
        fx.y += 0.171875f;
      }
      v[2 * i] = div_rn(fx.x, fs.x, rs[2 * i]);
      v[2 * i + 1] = div_rn(fx.y, fs.y, rs[2 * i + 1]);
      amax = fmaxf(amax, fmaxf(fabsf(v[2 * i]), fabsf(v[2 * i + 1])));
    }
    // The 4 lanes of a quad hold the 64 channels of one row.
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    float q[16];
    float scale = 1.f;
    if constexpr (kPow2) {
      const int e = pow2_group_exponent(amax);
      const float inv = exp2_int(-e);  // exact scaling: q = rint(v / 2^e)
#pragma unroll
      for (int j = 0; j < 16; ++j) q[j] = fminf(fmaxf(rintf(v[j] * inv), kQMin), kQMax);
      row_exp = max(row_exp, e);
      if (quarter == 0) group_exp[q_row * groups_per_split + gi] = static_cast<int8_t>(e);
    } else {
      scale = __fdiv_rn(amax, kQMax);
      if (scale == 0.f) scale = 1.f;
      const float rscale = __frcp_rn(scale);
#pragma unroll
      for (int j = 0; j < 16; ++j) q[j] = fminf(fmaxf(rintf(div_rn(v[j], scale, rscale)), kQMin), kQMax);
    }
    const int64_t row = m0 + q_row;
    if (row_ok) {
      if constexpr (kPow2) {
        // Provisional: the int8 codes, rewritten as e4m3 once the token's exponent is known.
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          w[j] = (static_cast<uint32_t>(static_cast<int>(q[4 * j]) & 0xFF)) |
                 (static_cast<uint32_t>(static_cast<int>(q[4 * j + 1]) & 0xFF) << 8) |
                 (static_cast<uint32_t>(static_cast<int>(q[4 * j + 2]) & 0xFF) << 16) |
                 (static_cast<uint32_t>(static_cast<int>(q[4 * j + 3]) & 0xFF) << 24);
        *reinterpret_cast<uint4*>(codes + row * K + g * kGroup + quarter * 16) = make_uint4(w[0], w[1], w[2], w[3]);
      } else if constexpr (kFormat == CodeFormat::kE4m3Bytes) {
        uint4 out;
        out.x = ptx::f32x4_to_e4m3x4(q[0], q[1], q[2], q[3]);
        out.y = ptx::f32x4_to_e4m3x4(q[4], q[5], q[6], q[7]);
        out.z = ptx::f32x4_to_e4m3x4(q[8], q[9], q[10], q[11]);
        out.w = ptx::f32x4_to_e4m3x4(q[12], q[13], q[14], q[15]);
        *reinterpret_cast<uint4*>(codes + row * K + g * kGroup + quarter * 16) = out;
      } else {
        // Channel 2i in the low nibble, 2i + 1 in the high one (two's complement for signed
        // codes): the order mma.sync's 4-bit fragments read.
        uint2 out = make_uint2(0u, 0u);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          out.x |= nibble_pair(q[2 * i], q[2 * i + 1]) << (8 * i);
          out.y |= nibble_pair(q[8 + 2 * i], q[8 + 2 * i + 1]) << (8 * i);
        }
        *reinterpret_cast<uint2*>(codes + row * (K / 2) + g * (kGroup / 2) + quarter * 8) = out;
      }
    }
    // Rows in [M, m_pad) get scale 0: the GEMMs multiply their (zero) codes by it.
    if (!kPow2 && quarter == 0) scales[static_cast<int64_t>(g) * m_pad + row] = row_ok ? scale : 0.f;
  }

  // Deterministic: the second k half parks its partial sums, the first adds its own to them (once
  // every warp is past the loop: the partial sums share space with the reciprocals).
  __syncthreads();
  const int r_a = lane / 4, c0 = 2 * (lane % 4);
  float (*part)[kRank] = sm.lora_half;
  if (kh == 1) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      part[16 * mb + r_a][8 * nt + c0] = lacc[nt][0];
      part[16 * mb + r_a][8 * nt + c0 + 1] = lacc[nt][1];
      part[16 * mb + r_a + 8][8 * nt + c0] = lacc[nt][2];
      part[16 * mb + r_a + 8][8 * nt + c0 + 1] = lacc[nt][3];
    }
  }
  if (kPow2 && quarter == 0) sm.token_exp[q_row] = row_exp;
  __syncthreads();
  if (kh == 0) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      part[16 * mb + r_a][8 * nt + c0] += lacc[nt][0];
      part[16 * mb + r_a][8 * nt + c0 + 1] += lacc[nt][1];
      part[16 * mb + r_a + 8][8 * nt + c0] += lacc[nt][2];
      part[16 * mb + r_a + 8][8 * nt + c0 + 1] += lacc[nt][3];
    }
  }
  __syncthreads();
  if (gridDim.y == 1) {
    for (int e = t; e < kRowsPerCta * kRank; e += kThreads) {
      const int row = m0 + e / kRank;
      if (row < M) lora_act[static_cast<int64_t>(row) * kRank + e % kRank] = part[e / kRank][e % kRank];
    }
    if constexpr (kPow2) pow2_finish(codes, scales, group_exp, K, M, m0, g_begin, g_count, groups_per_split, row_exp);
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The cluster's CTAs (one per K range) add their partial sums in rank order, each CTA for its
  // own 1/S of the elements, read from every CTA's shared memory (the same order as one CTA
  // adding them all, so the same bits; one CTA doing it all kept the others waiting at the
  // second sync: 14% of the kernel's stall samples); the second sync keeps every CTA resident
  // until its peers are done reading it. The pow2 format's token exponent is the largest of the
  // CTAs' row maxima, read in the same window.
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  {
    const int ranks = static_cast<int>(cluster.num_blocks());
    if constexpr (kPow2) {
      for (int r = 0; r < ranks; ++r) row_exp = max(row_exp, cluster.map_shared_rank(&sm.token_exp[0], r)[q_row]);
    }
    constexpr int kElems = kRowsPerCta * kRank;
    const int per_rank = (kElems + ranks - 1) / ranks;
    const int e_end = min(kElems, (static_cast<int>(cluster.block_rank()) + 1) * per_rank);
    for (int e = static_cast<int>(cluster.block_rank()) * per_rank + t; e < e_end; e += kThreads) {
      float sum = 0.f;
      for (int r = 0; r < ranks; ++r) sum += cluster.map_shared_rank(&part[0][0], r)[e];
      const int row = m0 + e / kRank;
      if (row < M) lora_act[static_cast<int64_t>(row) * kRank + e % kRank] = sum;
    }
  }
  cluster.sync();
  if constexpr (kPow2) pow2_finish(codes, scales, group_exp, K, M, m0, g_begin, g_count, groups_per_split, row_exp);
#else
  __trap();  // K splits need clusters (sm_90); the host launches them only there
#endif
}

// How many ways to split K: the fewest CTAs per cluster (1, 2, 4 or 8) that give every SM
// at least NUNCHAKU_QUANT_CTAS_PER_SM CTAs (4 warps each), never more ways than groups (an
// uneven split may leave the last CTA without groups: it then adds zeros); 1 where clusters do
// not exist (before sm_90); and more ways while a CTA would walk more than 32 groups. Measured on
// the H100 at M = 4608 (session 3, K = 3072): 4 CTAs per SM (K split 4 ways) 43 µs, 8 (8 ways)
// 58 µs, no split 79 µs; (session 10, after the reciprocals left the loop) 4 ways against 8:
// K = 3072 36.0 / 37.4 µs, K = 12288 102.1 / 98.1, K = 15360 122.5 / 118.3 (int4; pow2 alike).
#ifndef NUNCHAKU_QUANT_CTAS_PER_SM
#define NUNCHAKU_QUANT_CTAS_PER_SM 4
#endif
constexpr int kMaxGroupsPerSplit = 32;
int k_splits(int row_blocks, int G, bool clusters, int sms) {
  if (!clusters) return 1;
  int s = 1;
  while (s < 8 && row_blocks * s < NUNCHAKU_QUANT_CTAS_PER_SM * sms && G / (2 * s) >= 1) s *= 2;
  while (s < 8 && (G + s - 1) / s > kMaxGroupsPerSplit) s *= 2;
  return s;
}

template <CodeFormat kFormat, bool kBf16, bool kUnsigned>
void launch_quantize(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down, at::Tensor& codes,
                     at::Tensor& scales, at::Tensor& lora_act, int m_pad, cudaStream_t stream) {
  const int M = x.size(0), K = x.size(1), R = lora_down.size(1);
  const DeviceInfo info = device_info(x.device().index());
  const int splits = k_splits(m_pad / kRowsPerCta, K / kGroup, info.cc >= 90, info.sms);
  // The pow2 format keeps its CTA's group exponents in shared memory, one byte per (row, group).
  const int groups_per_split = (K / kGroup + splits - 1) / splits;
  const int exp_bytes = kFormat == CodeFormat::kE4m3Pow2 ? (kRowsPerCta * groups_per_split + 15) / 16 * 16 : 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(m_pad / kRowsPerCta, splits);
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute cluster_attr[1];
  cluster_attr[0].id = cudaLaunchAttributeClusterDimension;
  cluster_attr[0].val.clusterDim.x = 1;
  cluster_attr[0].val.clusterDim.y = splits;
  cluster_attr[0].val.clusterDim.z = 1;
  config.attrs = cluster_attr;
  config.numAttrs = splits > 1 ? 1 : 0;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* sp = reinterpret_cast<const uint16_t*>(smooth.data_ptr());
  const auto* lp = reinterpret_cast<const uint16_t*>(lora_down.data_ptr());
  auto* cp = reinterpret_cast<uint8_t*>(codes.data_ptr());
  auto* scp = scales.data_ptr<float>();
  auto* lap = lora_act.data_ptr<float>();
#define NUNCHAKU_QUANT_CASE(R16)                                                                            \
  case R16: {                                                                                               \
    const int smem = sizeof(QuantSmem<R16 * 16>) + exp_bytes;                                                \
    TORCH_CHECK(smem <= info.max_smem_per_block, "w4a4_quantize_act_pow2_sm90: K = ", num(K), " at rank ",     \
                num(R), " needs ", num(smem), " bytes of shared memory per CTA (one byte per row and group), more " \
                "than the GPU's ", num(info.max_smem_per_block));                                            \
    allow_dynamic_smem(reinterpret_cast<const void*>(quantize_act_kernel<kFormat, kBf16, kUnsigned, R16>),  \
                       smem);                                                                               \
    config.dynamicSmemBytes = smem;                                                                         \
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, quantize_act_kernel<kFormat, kBf16, kUnsigned, R16>, xp,     \
                                      static_cast<int64_t>(x.stride(0)), sp, lp, M, K, m_pad, cp, scp,      \
                                      lap));                                                                \
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
  constexpr bool kPow2 = kFormat == CodeFormat::kE4m3Pow2;
  TORCH_CHECK(!(kPow2 && act_unsigned), op, ": the pow2 format is signed only");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", num(x.dim()), "-D");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K > 0 && K % 64 == 0, op, ": K = ", num(K), " must be a positive multiple of 64");
  TORCH_CHECK(x.stride(1) == 1, op, ": x must have a contiguous last dimension (stride(1) == 1)");
  TORCH_CHECK(x.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, op,
              ": x rows must start at 16-byte aligned addresses (row stride a multiple of 8, aligned base)");
  for (const auto* t : {&smooth, &lora_down}) {
    TORCH_CHECK(t->device() == x.device(), op, ": smooth and lora_down must be on x's device");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": smooth and lora_down must have x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), op, ": smooth and lora_down must be contiguous");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, op,
                ": smooth and lora_down must start at 16-byte aligned addresses");
  }
  TORCH_CHECK(smooth.dim() == 1 && smooth.size(0) == K, op, ": smooth must be [K] = [", num(K), "], got ",
              shape(smooth.sizes()));
  TORCH_CHECK(lora_down.dim() == 2 && lora_down.size(0) == K, op, ": lora_down must be [K, R] with K = ", num(K),
              ", got ", shape(lora_down.sizes()));
  const int64_t R = lora_down.size(1);
  TORCH_CHECK(R % 16 == 0 && R >= 16 && R <= kMaxRank, op, ": rank R = ", num(R),
              " must be a multiple of 16 in [16, ", num(kMaxRank), "]");
  const int64_t m_pad = scale_rows_padded(M);
  const int64_t code_cols = kNibbles ? K / 2 : K;
  TORCH_CHECK(act_codes.device() == x.device() && act_codes.scalar_type() == at::kByte &&
                  act_codes.is_contiguous() && act_codes.dim() == 2 && act_codes.size(0) == M &&
                  act_codes.size(1) == code_cols,
              op, ": act_codes must be a contiguous uint8 [M, ", kNibbles ? "K/2" : "K", "] = [", num(M), ", ",
              num(code_cols), "] tensor (", kNibbles ? "int4 nibble pairs" : "e4m3 bytes", ") on x's device");
  if constexpr (kPow2) {
    TORCH_CHECK(act_scales.device() == x.device() && act_scales.scalar_type() == at::kFloat &&
                    act_scales.is_contiguous() && act_scales.dim() == 1 && act_scales.size(0) == m_pad,
                op, ": act_scales must be a contiguous float32 [M_pad] = [", num(m_pad),
                "] tensor (one scale per token) on x's device (M_pad = M rounded up to ", num(kScaleRowPad), ")");
  } else {
    TORCH_CHECK(act_scales.device() == x.device() && act_scales.scalar_type() == at::kFloat &&
                    act_scales.is_contiguous() && act_scales.dim() == 2 && act_scales.size(0) == K / 64 &&
                    act_scales.size(1) == m_pad,
                op, ": act_scales must be a contiguous float32 [K/64, M_pad] = [", num(K / 64), ", ", num(m_pad),
                "] tensor on x's device (M_pad = M rounded up to ", num(kScaleRowPad), ")");
  }
  TORCH_CHECK(lora_act.device() == x.device() && lora_act.scalar_type() == at::kFloat && lora_act.is_contiguous() &&
                  lora_act.dim() == 2 && lora_act.size(0) == M && lora_act.size(1) == R,
              op, ": lora_act must be a contiguous float32 [M, R] = [", num(M), ", ", num(R), "] tensor on x's device");
  TORCH_CHECK(K <= INT32_MAX && M * K <= (int64_t{1} << 40), op, ": problem too large");
  if (M == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if constexpr (kPow2) {
    bf16 ? launch_quantize<kFormat, true, false>(x, smooth, lora_down, act_codes, act_scales, lora_act, m_pad, stream)
         : launch_quantize<kFormat, false, false>(x, smooth, lora_down, act_codes, act_scales, lora_act, m_pad, stream);
  } else if (bf16) {
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

void quantize_act_pow2_sm90(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                            at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& lora_act) {
  constexpr const char* op = "w4a4_quantize_act_pow2_sm90";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  check_device_arch(op, x.device(), 90, 90, "a Hopper GPU (sm_90; its codes feed the sm_90 GEMM)");
  quantize_act<CodeFormat::kE4m3Pow2>(op, x, smooth, lora_down, false, act_codes, act_scales, lora_act);
}

void quantize_act_sm80(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                       bool act_unsigned, at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& lora_act) {
  constexpr const char* op = "w4a4_quantize_act_sm80";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  check_device_arch(op, x.device(), 80, 90, "an sm_80 or newer GPU");
  quantize_act<CodeFormat::kInt4Nibbles>(op, x, smooth, lora_down, act_unsigned, act_codes, act_scales, lora_act);
}

}  // namespace nunchaku::w4a4

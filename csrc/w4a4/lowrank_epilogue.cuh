// The W4A4 GEMMs' epilogue: y = acc + lora_act @ lora_up^T + bias, rounded once; on the columns
// n >= gelu_from, GELU (tanh) of that rounded value, rounded again (the MLP up-projections: what
// PyTorch's GELU kernel gives reading the stored output, without its pass over it). The
// parameters and the GELU are shared; lowrank_bias_store below is the sm_80 kernel's (the sm_90
// kernel computes y^T and has its own, sm90/epilogue.cuh, with the same numerics).
//
// The sm_80 mainloop leaves a warp's result as mma.sync m16n8 C fragments, so the rank-R up
// projection runs as mma.sync m16n8k16 straight into the accumulator registers. lora_act is
// fp32; it is split into a 16-bit high part and a 16-bit residual (two MMAs): about 16
// significant bits of lora_act with bf16, 22 with fp16 (one 16-bit operand alone gives 8 or 11),
// for R/8 extra mma.sync per n8 block.
#pragma once

#include <cmath>
#include <cstdint>

#include "dtype.cuh"
#include "ptx.cuh"

namespace nunchaku::w4a4 {

struct EpilogueParams {
  const float* lora_act;  // [M, R] fp32
  const void* lora_up;    // [N, R] out dtype
  const void* bias;       // [N] out dtype
  void* out;              // [M, N] out dtype
  int M, N, R;
  int gelu_from;          // first column that gets GELU; N: none
};

// GELU (approximate="tanh") of an fp32 value: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3),
// computed as the identical x * sigmoid(2u) = x / (1 + 2^(-2u log2 e)). A handful of instructions
// instead of tanhf's ~20 (it runs on every element of the widest outputs of a FLUX block, in an
// epilogue nothing overlaps), with no cancellation anywhere: within a few fp32 ulps of the exact
// value. PyTorch's 0.5 x (1 + tanhf(u)) agrees as closely for x >= -1 and cancels below (tens of
// ulps), so the 16-bit outputs are PyTorch's but where a value sits on a rounding boundary, a
// little more often for x < -1, where ours is the more accurate.
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr double kMinusTwoLog2e = -2.0 * 0.7978845608028654 * 1.4426950408889634;  // -2 sqrt(2/pi) log2(e)
  constexpr float kLinear = static_cast<float>(kMinusTwoLog2e);
  constexpr float kCubic = static_cast<float>(kMinusTwoLog2e * 0.044715);
  const float exponent = x * fmaf(kCubic, x * x, kLinear);
  return __fdividef(x, 1.0f + exp2f(exponent));
}

// lora_act's fp32 pair (x0, x1) as two packed 16-bit pairs, the nearest values and their
// residuals, for the two MMAs of the low-rank up projection.
template <bool kBf16>
__device__ __forceinline__ void split_hi_lo(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  using H = Half2<kBf16>;
  const float h0 = H::round_trip(x0), h1 = H::round_trip(x1);
  hi = H::pack(h0, h1);
  lo = H::pack(x0 - h0, x1 - h1);
}

// Epilogue operands read straight from global memory (the sm_80 kernel).
struct GlobalEpilogueOperands {
  const EpilogueParams& p;
  // Row `row` of lora_act (nullptr past M), then lora_act[row, r .. r+1] from it.
  __device__ __forceinline__ const float* lora_act_row(int row) const {
    return row < p.M ? p.lora_act + static_cast<int64_t>(row) * p.R : nullptr;
  }
  __device__ __forceinline__ float2 lora_act_pair(const float* row, int r) const {
    return __ldg(reinterpret_cast<const float2*>(row + r));
  }
  // lora_up[n, r .. r+1] as a packed 16-bit pair.
  __device__ __forceinline__ uint32_t lora_up_pair(int n, int r) const {
    return __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(p.lora_up) + static_cast<int64_t>(n) * p.R + r));
  }
  // bias[n .. n+1] as a packed 16-bit pair.
  __device__ __forceinline__ uint32_t bias_pair(int n) const {
    return __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(p.bias) + n));
  }
};

// One warp: rows row_a = (first row of the m16 block) + lane/4 and row_a + 8, columns
// n_base + 8*j + 2*(lane%4) + {0, 1} for j < kNTiles; acc[4*j .. 4*j+3] is n8 block j's C fragment.
// Operands: GlobalEpilogueOperands (or any type with the same accessors).
template <bool kBf16, int kNTiles, class Operands>
__device__ __forceinline__ void lowrank_bias_store(const EpilogueParams& p, const Operands& src, int row_a, int n_base,
                                                   float* __restrict__ acc) {
  using H = Half2<kBf16>;
  const int lane = threadIdx.x % 32;
  const int row_b = row_a + 8;
  const bool va = row_a < p.M, vb = row_b < p.M;
  const int kq = 2 * (lane % 4);

  const float* act_a = src.lora_act_row(row_a);
  const float* act_b = src.lora_act_row(row_b);
  for (int r0 = 0; r0 < p.R; r0 += 16) {
    float2 la[2], lb[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      la[h] = act_a ? src.lora_act_pair(act_a, r0 + kq + 8 * h) : make_float2(0.f, 0.f);
      lb[h] = act_b ? src.lora_act_pair(act_b, r0 + kq + 8 * h) : make_float2(0.f, 0.f);
    }
    uint32_t a_hi[4], a_lo[4];
    const float2* pairs[4] = {&la[0], &lb[0], &la[1], &lb[1]};
#pragma unroll
    for (int i = 0; i < 4; ++i) split_hi_lo<kBf16>(pairs[i]->x, pairs[i]->y, a_hi[i], a_lo[i]);
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      const int n = n_base + 8 * j + lane / 4;
      const uint32_t b0 = src.lora_up_pair(n, r0 + kq);
      const uint32_t b1 = src.lora_up_pair(n, r0 + kq + 8);
      float c[4] = {acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]};
      ptx::mma_m16n8k16<kBf16>(c, a_hi, b0, b1);
      ptx::mma_m16n8k16<kBf16>(c, a_lo, b0, b1);
      acc[4 * j] = c[0];
      acc[4 * j + 1] = c[1];
      acc[4 * j + 2] = c[2];
      acc[4 * j + 3] = c[3];
    }
  }

  uint32_t* out_a = reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(p.out) + static_cast<int64_t>(row_a) * p.N);
  uint32_t* out_b = reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(p.out) + static_cast<int64_t>(row_b) * p.N);
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    const int n = n_base + 8 * j + kq;
    const float2 b = H::to_float2(src.bias_pair(n));
    float y[4] = {acc[4 * j] + b.x, acc[4 * j + 1] + b.y, acc[4 * j + 2] + b.x, acc[4 * j + 3] + b.y};
    // gelu_from is even, so both columns of a pair are on the same side of it.
    if (n >= p.gelu_from) {
#pragma unroll
      for (int i = 0; i < 4; ++i) y[i] = gelu_tanh(H::round_trip(y[i]));
    }
    if (va) out_a[n / 2] = H::pack(y[0], y[1]);
    if (vb) out_b[n / 2] = H::pack(y[2], y[3]);
  }
}

}  // namespace nunchaku::w4a4

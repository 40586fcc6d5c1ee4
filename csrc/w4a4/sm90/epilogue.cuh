// Epilogue of the sm_90 W4A4 GEMM, on the transposed tile the mainloop leaves: each consumer
// warp holds 16 channels x kTokens tokens as kTokens / 8 mma.sync m16n8 C fragments (rows =
// channels).
//   0. with token-scaled activations (the pow2 format), acc *= the token's scale (a power of
//      two: exact);
//   1. + lora_act . lora_up^T by mma.sync m16n8k16 straight into the accumulators (A = lora_up's
//      16 x 16 slices, B = lora_act, fp32 split into a 16-bit high part and a residual: two
//      MMAs, ~16 significant bits with bf16, 22 with fp16; with three consumers staged in
//      shared memory first);
//   2. + bias, GELU on the channels >= gelu_from, one rounding to the output dtype;
//   3. stmatrix.trans into shared memory (tokens as rows), then 16-byte stores of whole output
//      row pieces (the fragments' own layout would scatter 2-byte stores over 16 rows).
#pragma once

#include "../lowrank_epilogue.cuh"
#include "config.cuh"

namespace nunchaku::w4a4::sm90 {

template <class T, bool kBf16, bool kTokenScales>
__device__ __forceinline__ void epilogue(typename T::Smem& sm, const EpilogueParams& p, const float* token_scales,
                                         int m0, int n0, int wg, float (&acc)[T::kAccRegs]) {
  using H = Half2<kBf16>;
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, kq = 2 * (lane % 4);
  const int ch_local = wg * 64 + warp * 16 + g;  // rows ch_local and ch_local + 8 of the tile
  const int ch_a = n0 + ch_local, ch_b = ch_a + 8;

  // The last channel tile may reach past N (the weights are zero-padded to whole tiles): those
  // warpgroups skip the operands they would read out of bounds and store nothing.
  const bool channels_valid = n0 + wg * 64 < p.N;
  if constexpr (kTokenScales) {
    // token_scales is padded to M_pad (zeros), a multiple of the token tile: no bounds check.
#pragma unroll
    for (int j = 0; j < T::kTokens / 8; ++j) {
      const float2 ts = __ldg(reinterpret_cast<const float2*>(token_scales + m0 + 8 * j + kq));
      acc[4 * j] *= ts.x;
      acc[4 * j + 1] *= ts.y;
      acc[4 * j + 2] *= ts.x;
      acc[4 * j + 3] *= ts.y;
    }
  }
  // With three consumers (128 tokens) the warpgroup first copies 32 ranks of its tokens' lora_act
  // rows at a time into its columns of the output staging tile (16-byte loads, all in flight at
  // once) and its warps read their B fragments from there; with two (192 tokens) each warp loads
  // its fragments from global memory (L1). Measured (session 7, same-call A/B): staging is 4-8%
  // faster with three consumers and 0-4% slower with two.
  constexpr bool kStaged = T::kConsumerWarpgroups == 3;
  const uint16_t* up = static_cast<const uint16_t*>(p.lora_up);
  uint8_t* lora_tile = sm.out + wg * 128;  // kTokens rows of 128 bytes, pitch kOutPitch
  for (int rc = 0; channels_valid && rc < p.R; rc += 32) {
    const int chunk = min(32, p.R - rc);  // ranks in this piece: 32, or 16 at the end
    if constexpr (kStaged) {
      const int pieces_per_row = chunk / 4;
      for (int piece = tid; piece < T::kTokens * pieces_per_row; piece += 128) {
        const int row = piece / pieces_per_row, c4 = piece % pieces_per_row;
        const int tok = min(m0 + row, p.M - 1);  // rows past M: never stored
        const float4 v =
            __ldg(reinterpret_cast<const float4*>(p.lora_act + static_cast<int64_t>(tok) * p.R + rc) + c4);
        *reinterpret_cast<float4*>(lora_tile + row * T::kOutPitch + c4 * 16) = v;
      }
      ptx::named_bar_sync(1 + wg, 128);
    }
    for (int r0 = rc; r0 < rc + chunk; r0 += 16) {
      uint32_t a[4];
      a[0] = __ldg(reinterpret_cast<const uint32_t*>(up + static_cast<int64_t>(ch_a) * p.R + r0 + kq));
      a[1] = __ldg(reinterpret_cast<const uint32_t*>(up + static_cast<int64_t>(ch_b) * p.R + r0 + kq));
      a[2] = __ldg(reinterpret_cast<const uint32_t*>(up + static_cast<int64_t>(ch_a) * p.R + r0 + kq + 8));
      a[3] = __ldg(reinterpret_cast<const uint32_t*>(up + static_cast<int64_t>(ch_b) * p.R + r0 + kq + 8));
#pragma unroll
      for (int j = 0; j < T::kTokens / 8; ++j) {
        float2 l0 = make_float2(0.f, 0.f), l1 = make_float2(0.f, 0.f);
        if constexpr (kStaged) {
          const uint8_t* b_row = lora_tile + (8 * j + g) * T::kOutPitch + (r0 - rc + kq) * 4;
          l0 = *reinterpret_cast<const float2*>(b_row);
          l1 = *reinterpret_cast<const float2*>(b_row + 32);
        } else if (const int tok = m0 + 8 * j + g; tok < p.M) {
          const float* row = p.lora_act + static_cast<int64_t>(tok) * p.R + r0 + kq;
          l0 = __ldg(reinterpret_cast<const float2*>(row));
          l1 = __ldg(reinterpret_cast<const float2*>(row + 8));
        }
        uint32_t b_hi[2], b_lo[2];
        split_hi_lo<kBf16>(l0.x, l0.y, b_hi[0], b_lo[0]);
        split_hi_lo<kBf16>(l1.x, l1.y, b_hi[1], b_lo[1]);
        float c[4] = {acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]};
        ptx::mma_m16n8k16<kBf16>(c, a, b_hi[0], b_hi[1]);
        ptx::mma_m16n8k16<kBf16>(c, a, b_lo[0], b_lo[1]);
        acc[4 * j] = c[0];
        acc[4 * j + 1] = c[1];
        acc[4 * j + 2] = c[2];
        acc[4 * j + 3] = c[3];
      }
    }
    // The piece is read before the next one (or the output) overwrites it.
    if constexpr (kStaged) ptx::named_bar_sync(1 + wg, 128);
  }

  const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
  const float bias_a = channels_valid ? H::to_float2(__ldg(bias + ch_a)).x : 0.f;
  const float bias_b = channels_valid ? H::to_float2(__ldg(bias + ch_b)).x : 0.f;
  const bool gelu_a = ch_a >= p.gelu_from, gelu_b = ch_b >= p.gelu_from;

  // Rows 8 j' + i of the staging tile (tokens) take, from matrix q = lane / 8 of a stmatrix.x4,
  // channels ch_local - g + 8 (q % 2) .. + 7 of n8 block j' = j + q / 2.
  const int q = lane / 8;
  const uint32_t stage_addr = ptx::smem_addr(sm.out) + (8 * (q / 2) + lane % 8) * T::kOutPitch +
                              (wg * 64 + warp * 16 + 8 * (q % 2)) * 2;
#pragma unroll
  for (int j = 0; j < T::kTokens / 8; j += 2) {
    uint32_t y[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v[4] = {acc[4 * (j + h)] + bias_a, acc[4 * (j + h) + 1] + bias_a, acc[4 * (j + h) + 2] + bias_b,
                    acc[4 * (j + h) + 3] + bias_b};
      if (gelu_a) v[0] = gelu_tanh(H::round_trip(v[0])), v[1] = gelu_tanh(H::round_trip(v[1]));
      if (gelu_b) v[2] = gelu_tanh(H::round_trip(v[2])), v[3] = gelu_tanh(H::round_trip(v[3]));
      y[2 * h] = H::pack(v[0], v[1]);
      y[2 * h + 1] = H::pack(v[2], v[3]);
    }
    ptx::stmatrix_x4_trans(stage_addr + 8 * j * T::kOutPitch, y[0], y[1], y[2], y[3]);
  }
  // Each warpgroup stores its own 64 channels of every row: only its four warps need to agree.
  ptx::named_bar_sync(1 + wg, 128);
  if (n0 + wg * 64 >= p.N) return;  // channel padding of the last tile (N % 64 == 0)
  uint16_t* out = static_cast<uint16_t*>(p.out);
  constexpr int kPiecesPerRow = 64 * 2 / 16;
#pragma unroll
  for (int i = 0; i < T::kTokens * kPiecesPerRow / 128; ++i) {
    const int piece = tid + 128 * i;
    const int r = piece / kPiecesPerRow, c = piece % kPiecesPerRow;
    if (m0 + r < p.M) {
      const uint4 v = *reinterpret_cast<const uint4*>(sm.out + r * T::kOutPitch + wg * 128 + c * 16);
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(m0 + r) * p.N + n0 + wg * 64 + c * 8) = v;
    }
  }
}

}  // namespace nunchaku::w4a4::sm90

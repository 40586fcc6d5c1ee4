// Epilogue of the sm_90 W4A4 GEMM, on the transposed tile the mainloop leaves: each consumer
// warp holds 16 channels x kTokens tokens as kTokens / 8 mma.sync m16n8 C fragments (rows =
// channels).
//   0. with token-scaled activations (the pow2 format), acc *= the token's scale (a power of
//      two: exact);
//   1. + lora_act . lora_up^T by mma.sync m16n8k16 straight into the accumulators (A = lora_up's
//      16 x 16 slices, B = lora_act, fp32 split into a 16-bit high part and a residual: two
//      MMAs, ~16 significant bits with bf16, 22 with fp16; lora_act's rows arrive in shared
//      memory through the stage ring and are split there once per CTA);
//   2. + bias, GELU on the channels >= gelu_from, one rounding to the output dtype;
//   3. stmatrix.trans into shared memory (tokens as rows), then 16-byte stores of whole output
//      row pieces (the fragments' own layout would scatter 2-byte stores over 16 rows).
#pragma once

#include "../lowrank_epilogue.cuh"
#include "config.cuh"

namespace nunchaku::w4a4::sm90 {

// Named barrier of all consumer warpgroups (1 + wg are the per-warpgroup ones).
constexpr uint32_t kAllConsumersBarrier = 4;

template <class T, bool kBf16, bool kTokenScales>
__device__ __forceinline__ void epilogue(typename T::Smem& sm, const EpilogueParams& p, const float* token_scales,
                                         int KT, int m0, int n0, int wg, float (&acc)[T::kAccRegs]) {
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
  const uint16_t* up = static_cast<const uint16_t*>(p.lora_up);
  // lora_up's A fragment of ranks r0 .. r0 + 15 (rows ch_a, ch_b), loaded one 16-rank step ahead.
  auto load_up = [&](int r0, uint32_t(&a)[4]) {
    a[0] = __ldg(reinterpret_cast<const uint32_t*>(up + static_cast<int64_t>(ch_a) * p.R + r0 + kq));
    a[1] = __ldg(reinterpret_cast<const uint32_t*>(up + static_cast<int64_t>(ch_b) * p.R + r0 + kq));
    a[2] = __ldg(reinterpret_cast<const uint32_t*>(up + static_cast<int64_t>(ch_a) * p.R + r0 + kq + 8));
    a[3] = __ldg(reinterpret_cast<const uint32_t*>(up + static_cast<int64_t>(ch_b) * p.R + r0 + kq + 8));
  };
  uint32_t a_cur[4] = {0, 0, 0, 0};
  if (channels_valid) load_up(0, a_cur);

  // The tile's lora_act rows came through the stage ring (producer_loop): byte o of them (row-major
  // [kTokens, R] fp32) is in the activation slot of ring iteration KT + o / kActTileBytes. Those
  // slots follow each other from KT's, except that the ring wraps to slot 0.
  for (int piece = 0; piece < lora_pieces(p.R); ++piece) {
    const int it = KT + piece;
    ptx::mbar_wait(&sm.full[it % T::kStages], (it / T::kStages) & 1);
  }
  const int first_slot = KT % T::kStages;
  uint8_t* const rows = sm.act[first_slot];
  const int wrap_at = (T::kStages - first_slot) * T::kActTileBytes;
  auto at = [&](int o) { return rows + o - (o >= wrap_at ? T::kStages * T::kActTileBytes : 0); };

  // One pass over them by all consumer threads, in place: each pair of ranks (an 8-byte unit,
  // u = rank / 2) becomes its 16-bit high parts and residuals (split_hi_lo), the two B-fragment
  // registers of the up projection's MMAs, so each value is split once per CTA instead of once
  // per warp. The units of a row are permuted within aligned blocks (u ^ swizzle(row)) so that
  // the fragment loads below, 4 rows x 4 units per half warp, hit 16 different bank pairs: rows
  // of 16-unit multiples (R % 32 == 0) flip bits 2-3 by row % 4, the others (R % 32 == 16, rows
  // 8 units off each other's banks) bit 2 by (row / 2) % 2. A thread reads its whole block before
  // it writes it back, so the pass needs no barrier inside. Thread i of a warp starts at 16-byte
  // chunk i of its block and goes round: neighbouring threads own neighbouring rows (or blocks),
  // so in step order all of them would hit the same banks.
  const int row_bytes = 4 * p.R;
  const bool wide_blocks = p.R % 32 == 0;
  const int block_units = wide_blocks ? 16 : 8;
  auto swizzle = [&](int row) { return wide_blocks ? 4 * (row & 3) : 4 * ((row >> 1) & 1); };
  const int blocks_per_row = p.R / 2 / block_units;
  constexpr int kConsumerThreads = 128 * T::kConsumerWarpgroups;
  for (int task = wg * 128 + tid; task < T::kTokens * blocks_per_row; task += kConsumerThreads) {
    const int row = task / blocks_per_row;
    const int o0 = row * row_bytes + (task - row * blocks_per_row) * block_units * 8;
    const int chunks = block_units / 2, rotation = task;
    uint4 v[8];  // loaded and stored as the same type, so no aliasing rule can reorder them
#pragma unroll
    for (int q = 0; q < 8; ++q)
      if (q < chunks) v[q] = *reinterpret_cast<const uint4*>(at(o0 + 16 * ((q + rotation) & (chunks - 1))));
    const int swz = swizzle(row);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if (q >= chunks) continue;
      const int chunk = (q + rotation) & (chunks - 1);
      uint4 w;  // units 2c and 2c + 1 land together: the swizzle leaves bit 0 of u alone
      split_hi_lo<kBf16>(__uint_as_float(v[q].x), __uint_as_float(v[q].y), w.x, w.y);
      split_hi_lo<kBf16>(__uint_as_float(v[q].z), __uint_as_float(v[q].w), w.z, w.w);
      *reinterpret_cast<uint4*>(at(o0 + 8 * ((2 * chunk) ^ swz))) = w;
    }
  }
  ptx::named_bar_sync(kAllConsumersBarrier, kConsumerThreads);

  // Rows 8 j + g of every fragment have g's swizzle.
  const int swz = swizzle(g);
  for (int r0 = 0; r0 < p.R; r0 += 16) {
    uint32_t a_next[4] = {0, 0, 0, 0};
    if (channels_valid && r0 + 16 < p.R) load_up(r0 + 16, a_next);
    const int unit_lo = ((r0 + kq) / 2) ^ swz, unit_hi = ((r0 + kq + 8) / 2) ^ swz;
    if (channels_valid) {
#pragma unroll
      for (int j = 0; j < T::kTokens / 8; ++j) {
        const int row_offset = (8 * j + g) * row_bytes;
        const uint2 b0 = *reinterpret_cast<const uint2*>(at(row_offset + 8 * unit_lo));  // {hi, residual} of k = kq, kq + 1
        const uint2 b1 = *reinterpret_cast<const uint2*>(at(row_offset + 8 * unit_hi));  // of k = kq + 8, kq + 9
        float c[4] = {acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]};
        ptx::mma_m16n8k16<kBf16>(c, a_cur, b0.x, b1.x);
        ptx::mma_m16n8k16<kBf16>(c, a_cur, b0.y, b1.y);
        acc[4 * j] = c[0];
        acc[4 * j + 1] = c[1];
        acc[4 * j + 2] = c[2];
        acc[4 * j + 3] = c[3];
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) a_cur[i] = a_next[i];
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

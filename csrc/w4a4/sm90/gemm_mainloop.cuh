// Mainloop of the sm_90 W4A4 GEMM: the producer thread and the consumer MMA loop.
//
// Per K stage (128 channels = 2 quantization groups):
//   producer: one thread issues the stage's copies onto its `full` barrier: the fp8 activation
//             tile by TMA (128-byte swizzle), the packed int4 weight blocks of the CTA's channels
//             (contiguous in global memory), the 16-bit weight scales and (group-scaled
//             activations only) the fp32 activation scales of both groups by bulk copies.
//   consumer: per group, each thread converts its 32 weight codes (16 bytes) to the two e4m3 A
//             fragments of the group's two wgmma m64nNk32, issues them into a fresh partial
//             accumulator, loads the next group's codes while they run, then promotes:
//             acc += partial * (wscale[n] * ascale[m]) in fp32, or, with token-scaled
//             activations (the pow2 format: each group's power of two is inside the e4m3 codes,
//             one scale per token is left for the epilogue), acc += partial * wscale[n]: one
//             FFMA per element and no activation-scale loads.
// Unpacking in the consumers takes the weight conversion off the path between the copies and
// the MMAs: when a producer warpgroup unpacked into shared memory, its per-stage latency was
// what the consumers waited on (KERNEL_NOTES.md, sessions 4-6).
#pragma once

// Diagnostic switches (wrong results; for timing ablations from benchmarks/device_run.sh --ablate):
//   NUNCHAKU_ABLATE_UNPACK   the A fragments are the packed words themselves (no conversion)
//   NUNCHAKU_ABLATE_PROMOTE  the promotion is acc += part (1 FADD instead of FMUL + FFMA + LDS)

#include <cuda.h>

#include "../dtype.cuh"
#include "../ptx.cuh"
#include "config.cuh"

namespace nunchaku::w4a4::sm90 {

struct MainloopParams {
  const uint8_t* w_packed;  // [KT, N_pad/64, 64, 64] uint8, see nunchaku/ops/sm90_layout.py
  const uint16_t* wscales;  // [2*KT, N_pad] in the output dtype, bf16 or fp16 (zero rows past K/64)
  const float* ascales;     // [G, M_pad] fp32 per (group, token), or [M_pad] per token (kTokenScales)
  int n_pad, G, KT, m_pad;
};

// 8 signed int4 codes (two's-complement nibbles, nibble i = code i) -> 8 e4m3 bytes in order.
// e4m3 is not linear in the code, so the values come from two 8-entry byte tables selected by
// prmt (one for codes 0..7, one for -8..-1); a third prmt in sign-replicate mode turns each
// nibble's sign bit into a byte mask that picks between them. 11 integer ops per 8 codes.
__device__ __forceinline__ uint2 int4x8_to_e4m3x8(uint32_t w) {
  constexpr uint32_t kPos0 = 0x44403800u;  // e4m3 of 0, 1, 2, 3
  constexpr uint32_t kPos1 = 0x4E4C4A48u;  // 4, 5, 6, 7
  constexpr uint32_t kNeg0 = 0xCACCCED0u;  // -8, -7, -6, -5
  constexpr uint32_t kNeg1 = 0xB8C0C4C8u;  // -4, -3, -2, -1
  const uint32_t w4 = w << 4;
  const uint32_t sel_lo = w & 0x7777u;
  const uint32_t sel_hi = (w >> 16) & 0x7777u;
  // Sign bits of codes 0..7 sit at bits 3,7,11,...,31 of w, i.e. at byte msbs of (w << 4) and w.
  const uint32_t neg_lo = ptx::prmt(w4, w, 0xD9C8u);
  const uint32_t neg_hi = ptx::prmt(w4, w, 0xFBEAu);
  const uint32_t p_lo = ptx::prmt(kPos0, kPos1, sel_lo), n_lo = ptx::prmt(kNeg0, kNeg1, sel_lo);
  const uint32_t p_hi = ptx::prmt(kPos0, kPos1, sel_hi), n_hi = ptx::prmt(kNeg0, kNeg1, sel_hi);
  return make_uint2((p_lo & ~neg_lo) | (n_lo & neg_lo), (p_hi & ~neg_hi) | (n_hi & neg_hi));
}

// One thread (the producer warpgroup's thread 0) issues every copy; nothing else is on the
// path from a free stage to a full one. After the K stages the ring carries the tile's lora_act
// rows for the epilogue (lora_pieces(R) more iterations, into the activation slots): the
// mainloop frees those slots a few stages before it ends, so the rows land while the consumers
// still multiply, where the epilogue used to wait on global loads (a third of its stall samples
// in session 8's profile, KERNEL_NOTES.md).
template <class T, bool kTokenScales>
__device__ __forceinline__ void producer_loop(typename T::Smem& sm, const CUtensorMap* act_map,
                                              const MainloopParams& p, const float* lora_act, int M, int R, int m0,
                                              int n0) {
  const int64_t kt_bytes = static_cast<int64_t>(p.n_pad / kChannelBlock) * kChannelBlockBytes;
  const uint8_t* w_src = p.w_packed + static_cast<int64_t>(n0 / kChannelBlock) * kChannelBlockBytes;
  for (int kt = 0; kt < p.KT; ++kt) {
    const int s = kt % T::kStages;
    ptx::mbar_wait(&sm.empty[s], ((kt / T::kStages) & 1) ^ 1);
    const int g0 = 2 * kt;
    const bool g1_valid = g0 + 1 < p.G;
    const uint32_t bytes = T::kActTileBytes + T::kWPackedTileBytes + 2 * T::kWScaleRowBytes +
                           (kTokenScales ? 0 : (1 + (g1_valid ? 1 : 0)) * T::kTokens * 4);
    ptx::mbar_arrive_expect_tx(&sm.full[s], bytes);
    ptx::tma_load_2d(sm.act[s], act_map, kt * kBlockK, m0, &sm.full[s]);
    ptx::bulk_g2s(sm.w_packed[s], w_src + kt * kt_bytes, T::kWPackedTileBytes, &sm.full[s]);
    for (int g = 0; g < 2; ++g)
      ptx::bulk_g2s(sm.wscale[s][g], p.wscales + static_cast<int64_t>(g0 + g) * p.n_pad + n0, T::kWScaleRowBytes,
                    &sm.full[s]);
    if constexpr (kTokenScales) continue;
    ptx::bulk_g2s(sm.ascale[s][0], p.ascales + static_cast<int64_t>(g0) * p.m_pad + m0, T::kTokens * 4,
                  &sm.full[s]);
    // An odd group count leaves the last stage's second group empty: the consumers skip it.
    if (g1_valid)
      ptx::bulk_g2s(sm.ascale[s][1], p.ascales + static_cast<int64_t>(g0 + 1) * p.m_pad + m0, T::kTokens * 4,
                    &sm.full[s]);
  }
  // The tile's rows of lora_act are contiguous in global memory ([M, R] fp32): piece i is bytes
  // [i, i + 1) * kActTileBytes of them. Rows past M are not copied (their columns are never
  // stored); a piece with none arrives with zero bytes so that the consumers' waits stay uniform.
  const int64_t tile_bytes = static_cast<int64_t>(min(T::kTokens, M - m0)) * R * 4;
  const uint8_t* rows = reinterpret_cast<const uint8_t*>(lora_act + static_cast<int64_t>(m0) * R);
  for (int piece = 0; piece < lora_pieces(R); ++piece) {
    const int it = p.KT + piece, s = it % T::kStages;
    ptx::mbar_wait(&sm.empty[s], ((it / T::kStages) & 1) ^ 1);
    const int64_t offset = static_cast<int64_t>(piece) * T::kActTileBytes;
    const int64_t left = tile_bytes - offset;
    const uint32_t bytes = static_cast<uint32_t>(left <= 0 ? 0 : (left < T::kActTileBytes ? left : T::kActTileBytes));
    ptx::mbar_arrive_expect_tx(&sm.full[s], bytes);
    if (bytes > 0) ptx::bulk_g2s(sm.act[s], rows + offset, bytes, &sm.full[s]);
  }
}

// This thread's 32 codes of group g of stage s: 16 contiguous bytes (a warp reads 512 contiguous
// bytes: conflict-free).
template <class T>
__device__ __forceinline__ uint4 load_packed_codes(const typename T::Smem& sm, int s, int g, int frag_offset) {
  return *reinterpret_cast<const uint4*>(sm.w_packed[s] + g * (kChannelBlockBytes / 2) + frag_offset);
}

// The codes as the group's two k32 A fragments, a[0..3] and a[4..7].
__device__ __forceinline__ void unpack_a_fragments(uint4 v, uint32_t (&a)[8]) {
#ifdef NUNCHAKU_ABLATE_UNPACK
  a[0] = v.x, a[1] = v.y, a[2] = v.z, a[3] = v.w, a[4] = v.x, a[5] = v.y, a[6] = v.z, a[7] = v.w;
#else
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint2 e = int4x8_to_e4m3x8(words[i]);
    a[2 * i] = e.x;
    a[2 * i + 1] = e.y;
  }
#endif
}

// The two k32 wgmmas of group g of stage s into `part` (overwritten). The B descriptor is built
// once (stage 0) and offset per stage / k step: the start-address field holds addr >> 4 in its
// low 14 bits and every smem address here is below 256 KB, so adding (offset >> 4) to the
// 64-bit descriptor never carries out of it.
template <class T>
__device__ __forceinline__ void issue_group(uint64_t b_desc0, int s, int g, const uint32_t (&a)[8],
                                            float (&part)[T::kAccRegs]) {
  constexpr uint32_t kActStride = T::kActTileBytes >> 4;
  const uint32_t a0[4] = {a[0], a[1], a[2], a[3]};
  const uint32_t a1[4] = {a[4], a[5], a[6], a[7]};
  ptx::fence_operands(part);
  ptx::wgmma_fence();
  ptx::wgmma_m64k32_e4m3_rs<T::kTokens>(part, a0, b_desc0 + s * kActStride + ((g * kGroup) >> 4), 0);
  ptx::wgmma_m64k32_e4m3_rs<T::kTokens>(part, a1, b_desc0 + s * kActStride + ((g * kGroup + 32) >> 4), 1);
  ptx::wgmma_commit();
}

// acc += part * (ascale[m] * wscale[n]) for group g of stage s, or acc += part * wscale[n] with
// token scales (applied once, in the epilogue); this thread's channels are rows r and r + 8 of the
// accumulator (scales sw0, sw1), its tokens 8j + col and 8j + col + 1.
template <class T, bool kTokenScales>
__device__ __forceinline__ void promote(const typename T::Smem& sm, int s, int g, int col, float sw0, float sw1,
                                        const float (&part)[T::kAccRegs], float (&acc)[T::kAccRegs]) {
#ifdef NUNCHAKU_ABLATE_PROMOTE
#pragma unroll
  for (int i = 0; i < T::kAccRegs; ++i) acc[i] += part[i];
  return;
#endif
#pragma unroll
  for (int j = 0; j < T::kTokens / 8; ++j) {
    if constexpr (kTokenScales) {
      acc[4 * j + 0] = fmaf(part[4 * j + 0], sw0, acc[4 * j + 0]);
      acc[4 * j + 1] = fmaf(part[4 * j + 1], sw0, acc[4 * j + 1]);
      acc[4 * j + 2] = fmaf(part[4 * j + 2], sw1, acc[4 * j + 2]);
      acc[4 * j + 3] = fmaf(part[4 * j + 3], sw1, acc[4 * j + 3]);
    } else {
      const float2 sa = *reinterpret_cast<const float2*>(&sm.ascale[s][g][8 * j + col]);
      acc[4 * j + 0] = fmaf(part[4 * j + 0], sa.x * sw0, acc[4 * j + 0]);
      acc[4 * j + 1] = fmaf(part[4 * j + 1], sa.y * sw0, acc[4 * j + 1]);
      acc[4 * j + 2] = fmaf(part[4 * j + 2], sa.x * sw1, acc[4 * j + 2]);
      acc[4 * j + 3] = fmaf(part[4 * j + 3], sa.y * sw1, acc[4 * j + 3]);
    }
  }
}

template <bool kBf16>
__device__ __forceinline__ float widen_scale(uint16_t h) {
  if constexpr (kBf16) {
    return __uint_as_float(static_cast<uint32_t>(h) << 16);
  } else {
    return __half2float(__ushort_as_half(h));
  }
}

// acc: this consumer's 64 channels x kTokens tokens in the wgmma accumulator layout (rows are
// channels).
template <class T, bool kBf16, bool kTokenScales>
__device__ __forceinline__ void consumer_mainloop(typename T::Smem& sm, const MainloopParams& p, int wg,
                                                  float (&acc)[T::kAccRegs]) {
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32;
  const int row = wg * 64 + warp * 16 + lane / 4;  // channel within the CTA's tile
  const int col = 2 * (lane % 4);                  // token within an n8 block
  const int frag_offset = wg * kChannelBlockBytes + tid * 16;

  const uint64_t b_desc0 = ptx::desc_k_major_sw128(ptx::smem_addr(sm.act[0]));

  float part[T::kAccRegs];
#pragma unroll
  for (int i = 0; i < T::kAccRegs; ++i) {
    acc[i] = 0.f;
    part[i] = 0.f;
  }

  // The next group's codes are loaded while the MMAs run and converted after the promotion:
  // ptxas serializes the wgmmas (C7513) when registers that a later wgmma reads are written
  // while one is in flight, and converting before the promotion made it spill.
  ptx::mbar_wait(&sm.full[0], 0);
  uint4 codes = load_packed_codes<T>(sm, 0, 0, frag_offset);
  for (int kt = 0; kt < p.KT; ++kt) {
    const int s = kt % T::kStages;
    // An odd group count leaves the last stage's second group empty (zero padding): skipped, so
    // its scale slot, which no copy fills, is never read.
    const bool g1_valid = 2 * kt + 1 < p.G;
#pragma unroll
    for (int g = 0; g < kBlockK / kGroup; ++g) {
      if (g == 1 && !g1_valid) break;
      uint32_t a[8];
      unpack_a_fragments(codes, a);
      const float sw0 = widen_scale<kBf16>(sm.wscale[s][g][row]);
      const float sw1 = widen_scale<kBf16>(sm.wscale[s][g][row + 8]);
      issue_group<T>(b_desc0, s, g, a, part);
      if (g == 0 && g1_valid) {
        codes = load_packed_codes<T>(sm, s, 1, frag_offset);
      } else if (kt + 1 < p.KT) {
        const int s_next = (kt + 1) % T::kStages;
        ptx::mbar_wait(&sm.full[s_next], ((kt + 1) / T::kStages) & 1);
        codes = load_packed_codes<T>(sm, s_next, 0, frag_offset);
      }
      ptx::wgmma_wait<0>();
      ptx::fence_operands(part);
      promote<T, kTokenScales>(sm, s, g, col, sw0, sw1, part, acc);
    }
    __syncwarp();
    if (lane == 0) ptx::mbar_arrive(&sm.empty[s]);
  }
}

}  // namespace nunchaku::w4a4::sm90

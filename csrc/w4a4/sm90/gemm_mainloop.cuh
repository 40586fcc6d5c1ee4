// Mainloop of the sm_90 W4A4 GEMM: the producer warpgroup and the consumer MMA loop.
//
// Per K stage (128 channels = 2 quantization groups):
//   producer: bulk-copies the 8 KB packed int4 weight tile and its 16-bit weight scales (issued
//             kStages-1 stages ahead into a ring that only the producer reads), TMA-loads the
//             fp8 activation tile (128-byte swizzle), bulk-copies the fp32 activation scales of
//             both groups, unpacks int4 -> fp8 e4m3 into the swizzled layout wgmma reads and
//             widens the weight scales to fp32. Weight scales stay 16-bit in global memory (half
//             the bytes of fp32; they are exact in the model's dtype) at 256 conversions a stage.
//   consumer: per group, two wgmma m64n128k32 into a fresh partial accumulator, then the
//             promotion acc += partial * (ascale[m] * wscale[n]) in fp32. The consumer
//             warpgroups drift out of phase, so one's promotion overlaps the others' MMAs.
#pragma once

// Diagnostic switches (wrong results; for timing ablations from benchmarks/device_run.sh --ablate):
//   NUNCHAKU_ABLATE_UNPACK   the producer skips the int4 -> fp8 unpack (weights = stale smem)
//   NUNCHAKU_ABLATE_PROMOTE  the promotion is acc += part (1 FADD instead of FMUL + FFMA + LDS)

#include <cuda.h>

#include "../dtype.cuh"
#include "../lowrank_epilogue.cuh"
#include "../ptx.cuh"
#include "config.cuh"

namespace nunchaku::w4a4::sm90 {

struct MainloopParams {
  const uint8_t* w_packed;  // [N/128, KT, 128, 64] uint8, see nunchaku/ops/sm90_layout.py
  const uint16_t* wscales;  // [2*KT, N] in the output dtype, bf16 or fp16 (zero rows past K/64)
  const float* ascales;     // [G, M_pad] fp32
  int N, G, KT, m_pad;
};

// 8 signed int4 codes (two's-complement nibbles, nibble i = code i) -> 8 e4m3 bytes in order.
// e4m3 is not linear in the code, so the values come from two 8-entry byte tables selected by
// prmt (one for codes 0..7, one for -8..-1); a third prmt in sign-replicate mode turns each
// nibble's sign bit into a byte mask that picks between them. 11 integer ops per 8 codes (plus,
// in SASS, a copy of one table word from a uniform register before each table prmt).
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

// Thread 0: the packed weight tile kt and its two groups' 16-bit scales into ring slot s.
__device__ __forceinline__ void load_packed(SharedStorage& sm, const MainloopParams& p, const uint8_t* w_src,
                                            int n0, int kt, int s) {
  ptx::mbar_arrive_expect_tx(&sm.packed[s], kWPackedTileBytes + 2 * kWScaleRowBytes);
  ptx::bulk_g2s(sm.w_packed[s], w_src + static_cast<int64_t>(kt) * kWPackedTileBytes, kWPackedTileBytes,
                &sm.packed[s]);
  for (int g = 0; g < 2; ++g)
    ptx::bulk_g2s(sm.wscale_in[s][g], p.wscales + static_cast<int64_t>(2 * kt + g) * p.N + n0, kWScaleRowBytes,
                  &sm.packed[s]);
}

// Thread 0, after the producer's last stage: bulk-copy the epilogue's operands into shared
// memory (config.cuh) while the consumers finish the last stages, so the epilogue waits on no
// global load (measured: the epilogue was 23% of the warps' stall samples at 4608 x 3072 x 3072,
// mostly waiting on those loads, with the tensor cores idle).
// lora_act piece i goes into the activation slot of virtual stage KT + i once the consumers have
// released it, like the producer's own next stage would.
__device__ __forceinline__ void stage_epilogue_operands(SharedStorage& sm, const MainloopParams& p,
                                                        const EpilogueParams& ep, int m0, int n0) {
  const int rows = min(kBlockM, ep.M - m0);
  const int rows_per_slot = act_rows_per_slot(ep.R);
  const int pieces = (rows + rows_per_slot - 1) / rows_per_slot;
  const uint32_t up_bytes = kBlockN * ep.R * 2;
  ptx::mbar_arrive_expect_tx(&sm.epilogue_full, up_bytes + kBlockN * 2 + rows * ep.R * 4);
  ptx::bulk_g2s(sm.w_packed[0], static_cast<const uint16_t*>(ep.lora_up) + static_cast<int64_t>(n0) * ep.R, up_bytes,
                &sm.epilogue_full);
  ptx::bulk_g2s(sm.bias, static_cast<const uint16_t*>(ep.bias) + n0, kBlockN * 2, &sm.epilogue_full);
  for (int i = 0; i < pieces; ++i) {
    const int v = p.KT + i;
    const int s = act_slot_of_piece(p.KT, i);
    ptx::mbar_wait(&sm.empty[s], ((v / kStages) & 1) ^ 1);
    const int n_rows = min(rows_per_slot, rows - i * rows_per_slot);
    ptx::bulk_g2s(sm.act[s], ep.lora_act + static_cast<int64_t>(m0 + i * rows_per_slot) * ep.R, n_rows * ep.R * 4,
                  &sm.epilogue_full);
  }
}

template <bool kBf16>
__device__ __forceinline__ void producer_loop(SharedStorage& sm, const CUtensorMap* act_map,
                                              const MainloopParams& p, const EpilogueParams& ep, int m0, int n0) {
  const int t = threadIdx.x;  // 0..127
  constexpr int kActCopyIssuer = 32;
  const uint8_t* w_src = p.w_packed + static_cast<int64_t>(n0 / kBlockN) * p.KT * kWPackedTileBytes;

  if (t == 0) {
    for (int kt = 0; kt < kStages - 1 && kt < p.KT; ++kt) load_packed(sm, p, w_src, n0, kt, kt);
  }

  // Thread t unpacks 16 packed bytes (32 codes) of 4 rows: a warp reads 512 contiguous bytes per
  // step (conflict-free) and its 16-byte stores land in distinct bank groups thanks to the swizzle.
  const int chunk = t & 3;
  const int row0 = t >> 2;

  for (int kt = 0; kt < p.KT; ++kt) {
    const int s = kt % kStages;
    const uint32_t phase = (kt / kStages) & 1;

    if (t == 0) {
      const int kn = kt + kStages - 1;
      if (kn < p.KT) load_packed(sm, p, w_src, n0, kn, kn % kStages);
    }

    ptx::mbar_wait(&sm.empty[s], phase ^ 1);

    // The activation copies are issued from warp 1, the packed weights' from warp 0: the
    // producer's per-stage latency is the consumers' critical path, and every producer warp waits
    // for the slowest at the barrier below (measured: 3-5% faster than both from thread 0).
    if (t == kActCopyIssuer) {
      const int g0 = 2 * kt;
      const bool g1_valid = g0 + 1 < p.G;
      const uint32_t bytes = kActTileBytes + (1 + (g1_valid ? 1 : 0)) * kBlockM * 4;
      ptx::mbar_arrive_expect_tx(&sm.full[s], bytes);
      ptx::tma_load_2d(sm.act[s], act_map, kt * kBlockK, m0, &sm.full[s]);
      ptx::bulk_g2s(sm.ascale[s][0], p.ascales + static_cast<int64_t>(g0) * p.m_pad + m0, kBlockM * 4, &sm.full[s]);
      // An odd group count leaves the last stage's second group empty: its weights are zero
      // padding and its activation codes are TMA zero fill; the ascale slot keeps zero (from
      // kernel start) or an earlier scale of the same rows, so the promotion adds exactly zero
      // (or NaN in rows whose scales are infinite, which are not finite anyway; a GPU test).
      if (g1_valid)
        ptx::bulk_g2s(sm.ascale[s][1], p.ascales + static_cast<int64_t>(g0 + 1) * p.m_pad + m0, kBlockM * 4,
                      &sm.full[s]);
    }

    ptx::mbar_wait(&sm.packed[s], phase);
    {
      // Thread t widens scales 2*(t%64), 2*(t%64)+1 of group t/64 (one 4-byte read, one 8-byte write).
      const int g = t / 64, n = 2 * (t % 64);
      const uint32_t pair = *reinterpret_cast<const uint32_t*>(&sm.wscale_in[s][g][n]);
      *reinterpret_cast<float2*>(&sm.wscale[s][g][n]) = Half2<kBf16>::to_float2(pair);
    }
#ifndef NUNCHAKU_ABLATE_UNPACK
    // All four shared loads first, then the conversions: the unpack is on the consumers'
    // critical path, and one load's latency a row was in series with it (measured: 2-4%).
    uint4 words[kBlockN / 32];
#pragma unroll
    for (int i = 0; i < kBlockN / 32; ++i)
      words[i] = *reinterpret_cast<const uint4*>(sm.w_packed[s] + (row0 + 32 * i) * (kBlockK / 2) + chunk * 16);
#pragma unroll
    for (int i = 0; i < kBlockN / 32; ++i) {
      const int n = row0 + 32 * i;
      const uint4 v = words[i];
      const uint2 a = int4x8_to_e4m3x8(v.x), b = int4x8_to_e4m3x8(v.y);
      const uint2 c = int4x8_to_e4m3x8(v.z), d = int4x8_to_e4m3x8(v.w);
      uint8_t* row = sm.w[s] + n * kBlockK;
      *reinterpret_cast<uint4*>(row + (((2 * chunk) ^ (n & 7)) << 4)) = make_uint4(a.x, a.y, b.x, b.y);
      *reinterpret_cast<uint4*>(row + (((2 * chunk + 1) ^ (n & 7)) << 4)) = make_uint4(c.x, c.y, d.x, d.y);
    }
#endif
    ptx::fence_proxy_async_smem();
    ptx::mbar_arrive(&sm.full[s]);
    // Next iteration thread 0 refills this packed slot (tile kt + kStages lands where kt was):
    // every producer thread must be done reading it.
    ptx::named_bar_sync(1, kProducerThreads);
  }
  // The barrier above was the last read of the packed ring by any producer thread, and no bulk
  // copy into the ring is pending (load_packed is issued only for tiles kt < KT, each waited on
  // above): the ring is free for the epilogue's lora_up tile.
  if (t == 0) stage_epilogue_operands(sm, p, ep, m0, n0);
}

// Issue the two k32 wgmmas of quantization group g (0/1) of stage s into `part` (overwritten).
// Descriptors are built once (stage 0, this warpgroup's rows) and offset per stage / k step:
// the start-address field holds addr >> 4 in its low 14 bits and every smem address here is
// below 256 KB, so adding (offset >> 4) to the 64-bit descriptor never carries out of it.
__device__ __forceinline__ void issue_group(uint64_t a_desc0, uint64_t b_desc0, int s, int g, float (&part)[64]) {
  constexpr uint32_t kActStride = sizeof(SharedStorage::act[0]) >> 4;
  constexpr uint32_t kWStride = sizeof(SharedStorage::w[0]) >> 4;
  ptx::fence_operands(part);
  ptx::wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kGroup / 32; ++kk) {
    const uint32_t koff = (g * kGroup + kk * 32) >> 4;
    ptx::wgmma_m64n128k32_e4m3(part, a_desc0 + s * kActStride + koff, b_desc0 + s * kWStride + koff, kk);
  }
  ptx::wgmma_commit();
}

// acc += part * (ascale[m] * wscale[n]) for group g of stage s.
__device__ __forceinline__ void promote(const SharedStorage& sm, int s, int g, int row_in_tile, int col_in_n8,
                                        const float (&part)[64], float (&acc)[64]) {
#ifdef NUNCHAKU_ABLATE_PROMOTE
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] += part[i];
  return;
#endif
  const float sa0 = sm.ascale[s][g][row_in_tile];
  const float sa1 = sm.ascale[s][g][row_in_tile + 8];
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
    const float2 sw = *reinterpret_cast<const float2*>(&sm.wscale[s][g][8 * j + col_in_n8]);
    acc[4 * j + 0] = fmaf(part[4 * j + 0], sa0 * sw.x, acc[4 * j + 0]);
    acc[4 * j + 1] = fmaf(part[4 * j + 1], sa0 * sw.y, acc[4 * j + 1]);
    acc[4 * j + 2] = fmaf(part[4 * j + 2], sa1 * sw.x, acc[4 * j + 2]);
    acc[4 * j + 3] = fmaf(part[4 * j + 3], sa1 * sw.y, acc[4 * j + 3]);
  }
}

// acc: this consumer's 64 x 128 fp32 tile in the wgmma accumulator layout.
// Per group: MMAs into `part`, wait, promote. A warpgroup does not overlap its own promotion
// with its MMAs (a second partial accumulator needs 192 accumulator registers and spilled,
// see KERNEL_NOTES.md); the overlap comes from the other consumer warpgroups.
__device__ __forceinline__ void consumer_mainloop(SharedStorage& sm, const MainloopParams& p, int wg,
                                                  float (&acc)[64]) {
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32;
  const int row_in_tile = wg * 64 + warp * 16 + lane / 4;
  const int col_in_n8 = 2 * (lane % 4);

  const uint64_t a_desc0 = ptx::desc_k_major_sw128(ptx::smem_addr(sm.act[0]) + wg * 64 * kBlockK);
  const uint64_t b_desc0 = ptx::desc_k_major_sw128(ptx::smem_addr(sm.w[0]));

  float part[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    acc[i] = 0.f;
    part[i] = 0.f;
  }

  for (int kt = 0; kt < p.KT; ++kt) {
    const int s = kt % kStages;
    ptx::mbar_wait(&sm.full[s], (kt / kStages) & 1);
#pragma unroll
    for (int g = 0; g < kBlockK / kGroup; ++g) {
      issue_group(a_desc0, b_desc0, s, g, part);
      ptx::wgmma_wait<0>();
      ptx::fence_operands(part);
      promote(sm, s, g, row_in_tile, col_in_n8, part, acc);
    }
    __syncwarp();
    if (lane == 0) ptx::mbar_arrive(&sm.empty[s]);
  }
}

}  // namespace nunchaku::w4a4::sm90

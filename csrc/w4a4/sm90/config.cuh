// Tile shapes, pipeline depth and shared-memory plan of the sm_90 W4A4 GEMM.
#pragma once

#include <cstdint>

namespace nunchaku::w4a4::sm90 {

constexpr int kBlockK = 128;  // K per pipeline stage: two quantization groups, one 128-byte swizzle row
constexpr int kGroup = 64;
constexpr int kChannelBlock = 64;  // channels of one consumer warpgroup (the wgmma's M)
constexpr int kChannelBlockBytes = kChannelBlock * kBlockK / 2;  // its packed int4 codes of a stage
constexpr int kProducerThreads = 128;
constexpr int kMaxRank = 128;

// The epilogue's rows of lora_act (fp32, kTokens x R) travel through the stage ring after the
// last K stage, in pieces of one activation tile (kTokens x 128 bytes): R / 32 pieces, rounded up.
__host__ __device__ constexpr int lora_pieces(int rank) { return (rank + 31) / 32; }

// A CTA computes a tile of y as its transpose: the wgmma's M side is the output channels, so the
// int4 weights are its A operand and are widened to fp8 in registers by the warps that multiply
// them (wgmma takes A from registers, B only from shared memory); the fp8 activation codes are
// B, straight from TMA. Warpgroup 0 is the producer (one thread issues the copies), the others
// are consumers; each owns 64 channels x kTokens tokens: one wgmma m64nN accumulator plus a
// partial accumulator of the same size for the current 64-wide K group. A warpgroup cannot
// promote one partial while its own next wgmma runs (ptxas serializes that, KERNEL_NOTES.md):
// the other consumers keep the tensor cores busy meanwhile.
// Two shapes, chosen per call by the host (gemm.cu): 2 consumers x 192 tokens (tile 192 x 128,
// the faster one per tile) and 3 consumers x 128 tokens (tile 128 x 192: fewer tiles, hence
// fewer waves, at some M and N).
template <int kConsumers>
struct Tile {
  static_assert(kConsumers == 2 || kConsumers == 3);
  static constexpr int kConsumerWarpgroups = kConsumers;
  static constexpr int kTokens = kConsumers == 2 ? 192 : 128;  // per CTA = the wgmma's N
  static constexpr int kChannels = kChannelBlock * kConsumers;
  static constexpr int kAccRegs = kTokens / 2;  // fp32 accumulators per thread of m64 x kTokens
  static constexpr int kThreads = kProducerThreads + 128 * kConsumers;
  // setmaxnreg only moves registers between the CTA's warpgroups (65536 in all).
  static constexpr uint32_t kProducerRegs = kConsumers == 2 ? 40 : 24;
  static constexpr uint32_t kConsumerRegs = kConsumers == 2 ? 232 : 160;
  static_assert(kProducerRegs * kProducerThreads + kConsumerRegs * 128 * kConsumers <= 65536);
  static constexpr int kStages = 5;
  // All pieces are in flight at once, in slots the mainloop has finished with.
  static_assert(lora_pieces(kMaxRank) < kStages);

  static constexpr int kActTileBytes = kTokens * kBlockK;                   // fp8 codes, 128-byte swizzle
  static constexpr int kWPackedTileBytes = kChannelBlockBytes * kConsumers;  // int4, as stored
  static constexpr int kWScaleRowBytes = kChannels * 2;  // one group's 16-bit weight scales of a tile
  // The epilogue stages the 16-bit output tile here, tokens as rows, to store whole 16-byte
  // pieces of output rows; the 16 padding bytes a row spread the transposing stores of 8 rows
  // over all banks.
  static constexpr int kOutPitch = kChannels * 2 + 16;

  struct alignas(1024) Smem {
    uint8_t act[kStages][kActTileBytes];
    uint8_t w_packed[kStages][kWPackedTileBytes];
    uint16_t wscale[kStages][kBlockK / kGroup][kChannels];  // bf16/fp16 as stored
    float ascale[kStages][kBlockK / kGroup][kTokens];
    uint8_t out[kTokens * kOutPitch];
    uint64_t full[kStages];   // producer -> consumers: every copy of the stage landed
    uint64_t empty[kStages];  // consumers -> producer: stage may be overwritten
  };
  static constexpr int kSmemBytes = sizeof(Smem);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory plan exceeds the 227 KB an sm_90 CTA can have");
};

}  // namespace nunchaku::w4a4::sm90

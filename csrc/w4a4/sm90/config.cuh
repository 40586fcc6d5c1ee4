// Tile shape, pipeline depth and shared-memory plan of the sm_90 W4A4 GEMM.
#pragma once

#include <cstdint>

namespace nunchaku::w4a4::sm90 {

// One CTA computes a 192 (tokens) x 128 (output channels) tile of y. Warpgroup 0 is the
// producer (copies + int4 -> fp8 unpack), warpgroups 1..3 are consumers; each consumer owns
// 64 tokens x 128 channels, i.e. one wgmma m64n128 accumulator (64 fp32 registers per thread)
// plus one partial accumulator of the same size for the current 64-wide K group.
// Three consumers instead of two: while one promotes, two can keep the tensor cores busy, and
// the weight unpack of a stage is shared by 192 tokens instead of 128.
constexpr int kConsumerWarpgroups = 3;
constexpr int kBlockM = 64 * kConsumerWarpgroups;
constexpr int kBlockN = 128;
// K per pipeline stage: two quantization groups; 128 fp8 bytes is one 128-byte swizzle row.
constexpr int kBlockK = 128;
constexpr int kGroup = 64;
constexpr int kStages = 4;
constexpr int kProducerThreads = 128;
constexpr int kThreads = kProducerThreads + 128 * kConsumerWarpgroups;
// 128*32 + 384*160 = 65536 (what the CTA gets at launch; setmaxnreg only moves registers between
// its warpgroups): the consumers hold 2x64 accumulators plus scales and descriptors, and after
// the mainloop the epilogue's operand addresses; the producer's 40 let it load a stage's four
// packed rows before converting any (32 serialized them; ptxas 13.0 spills nothing at 40/152).
constexpr uint32_t kProducerRegs = 40;
constexpr uint32_t kConsumerRegs = 152;

constexpr int kActTileBytes = kBlockM * kBlockK;        // fp8 codes, 128-byte swizzle
constexpr int kWTileBytes = kBlockN * kBlockK;          // fp8 codes, 128-byte swizzle
constexpr int kWPackedTileBytes = kBlockN * kBlockK / 2;  // int4, as stored in global memory
constexpr int kWScaleRowBytes = kBlockN * 2;                // one group's 16-bit weight scales of a tile

struct alignas(1024) SharedStorage {
  uint8_t act[kStages][kActTileBytes];
  uint8_t w[kStages][kWTileBytes];
  uint8_t w_packed[kStages][kWPackedTileBytes];
  uint16_t wscale_in[kStages][kBlockK / kGroup][kBlockN];  // bf16/fp16 as stored, lands with w_packed
  float wscale[kStages][kBlockK / kGroup][kBlockN];        // fp32, written by the producer
  float ascale[kStages][kBlockK / kGroup][kBlockM];
  uint16_t bias[kBlockN];    // this tile's bias (out dtype), staged for the epilogue
  uint64_t full[kStages];    // producer -> consumers: act (TMA), scales (bulk), unpacked weights
  uint64_t empty[kStages];   // consumers -> producer: stage may be overwritten
  uint64_t packed[kStages];  // bulk copies of the packed weights and their scales landed (producer-internal)
  uint64_t epilogue_full;    // the epilogue's operands landed (see stage_epilogue_operands)
};

// The epilogue's operands are staged in shared memory the mainloop no longer needs: lora_up's
// 128 x R tile in the packed-weight ring (producer-only, free after the last unpack: 32 KB holds
// R <= 128), lora_act's 192 x R rows in activation slots, act_rows_per_slot(R) rows a slot, in the
// slots the stages after the last one would use (released as the consumers finish the last stages).
constexpr int kMaxRank = 128;
static_assert(kBlockN * kMaxRank * 2 <= kStages * kWPackedTileBytes, "lora_up tile must fit the packed ring");
__host__ __device__ constexpr int act_rows_per_slot(int rank) { return kActTileBytes / (rank * 4); }
// The activation slot that holds piece `piece` (rows piece * act_rows_per_slot(R) onwards) of
// lora_act: the slot of virtual stage KT + piece. The producer fills it, the epilogue reads it.
__host__ __device__ constexpr int act_slot_of_piece(int KT, int piece) { return (KT + piece) % kStages; }
static_assert((kBlockM + act_rows_per_slot(kMaxRank) - 1) / act_rows_per_slot(kMaxRank) <= kStages,
              "lora_act rows must fit the activation slots");

constexpr int kSmemBytes = sizeof(SharedStorage);

}  // namespace nunchaku::w4a4::sm90

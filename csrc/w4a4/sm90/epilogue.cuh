// Epilogue of the sm_90 W4A4 GEMM: each consumer warp's 16 x 128 slice of the wgmma
// accumulator goes through the shared low-rank + bias + store epilogue (../lowrank_epilogue.cuh),
// reading lora_act, lora_up and bias from where the producer staged them in shared memory
// (stage_epilogue_operands in gemm_mainloop.cuh).
#pragma once

#include "../lowrank_epilogue.cuh"
#include "config.cuh"

namespace nunchaku::w4a4::sm90 {

struct SharedEpilogueOperands {
  const SharedStorage& sm;
  int m0, n0, M, R, KT;
  __device__ __forceinline__ const float* lora_act_row(int row) const {
    if (row >= M) return nullptr;
    const int local = row - m0, per_slot = act_rows_per_slot(R);
    const int piece = local / per_slot;
    return reinterpret_cast<const float*>(sm.act[act_slot_of_piece(KT, piece)]) + (local - piece * per_slot) * R;
  }
  __device__ __forceinline__ float2 lora_act_pair(const float* row, int r) const {
    return *reinterpret_cast<const float2*>(row + r);
  }
  __device__ __forceinline__ uint32_t lora_up_pair(int n, int r) const {
    // The lora_up tile spans the whole packed ring, viewed as one flat byte array.
    const uint8_t* ring = reinterpret_cast<const uint8_t*>(sm.w_packed);
    return *reinterpret_cast<const uint32_t*>(ring + ((n - n0) * R + r) * 2);
  }
  __device__ __forceinline__ uint32_t bias_pair(int n) const {
    return *reinterpret_cast<const uint32_t*>(&sm.bias[n - n0]);
  }
};

template <bool kBf16>
__device__ __forceinline__ void epilogue(const SharedStorage& sm, const EpilogueParams& p, int m0, int n0, int KT,
                                         int wg, float (&acc)[64]) {
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  ptx::mbar_wait(&sm.epilogue_full, 0);
  const SharedEpilogueOperands src{sm, m0, n0, p.M, p.R, KT};
  lowrank_bias_store<kBf16, kBlockN / 8>(p, src, m0 + wg * 64 + warp * 16 + lane / 4, n0, acc);
}

}  // namespace nunchaku::w4a4::sm90

// Epilogue of the sm_90 W4A4 GEMM: each consumer warp's 16 x 128 slice of the wgmma
// accumulator goes through the shared low-rank + bias + store epilogue (../lowrank_epilogue.cuh).
#pragma once

#include "../lowrank_epilogue.cuh"
#include "config.cuh"

namespace nunchaku::w4a4::sm90 {

template <bool kBf16>
__device__ __forceinline__ void epilogue(const EpilogueParams& p, int m0, int n0, int wg, float (&acc)[64]) {
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  lowrank_bias_store<kBf16, kBlockN / 8>(p, m0 + wg * 64 + warp * 16 + lane / 4, n0, acc);
}

}  // namespace nunchaku::w4a4::sm90

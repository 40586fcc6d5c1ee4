// 16-bit activation dtypes (bf16 / fp16) seen as packed pairs in 32-bit registers, which is
// how the mma.sync fragments and the 4-byte global accesses of the W4A4 kernels hold them.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace nunchaku {

template <bool kBf16>
struct Half2;

template <>
struct Half2<true> {
  __device__ __forceinline__ static float2 to_float2(uint32_t u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xFFFF0000u));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float round_trip(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

template <>
struct Half2<false> {
  __device__ __forceinline__ static float2 to_float2(uint32_t u) {
    __half2 h = *reinterpret_cast<__half2*>(&u);
    return __half22float2(h);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float round_trip(float v) { return __half2float(__float2half_rn(v)); }
};

}  // namespace nunchaku

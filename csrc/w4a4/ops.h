// Host entry points of the W4A4 ops; bindings.cpp registers them with the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

namespace nunchaku::w4a4 {

// Hopper path; see nunchaku/ops/sm90_layout.py for the dtype / shape / layout of every tensor.
void quantize_act_sm90(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                       bool act_unsigned, at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& lora_act);

// pow2 activation format (signed): e4m3 codes of q * 2^(e - t + 4), per-token scales 2^(t - 4) [M_pad].
void quantize_act_pow2_sm90(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                            at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& lora_act);

void gemm_sm90(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& wcodes_packed,
               const at::Tensor& wscales_packed, const at::Tensor& lora_act, const at::Tensor& lora_up,
               const at::Tensor& bias, int64_t gelu_from, at::Tensor& out);

// Ampere/Ada INT4 tensor-core path (runs on sm_80..sm_90); see nunchaku/ops/sm80_layout.py.
void quantize_act_sm80(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                       bool act_unsigned, at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& lora_act);

void gemm_sm80(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& wcodes,
               const at::Tensor& wscales, const at::Tensor& lora_act, const at::Tensor& lora_up,
               const at::Tensor& bias, bool act_unsigned, int64_t gelu_from, at::Tensor& out);

}  // namespace nunchaku::w4a4

// Host entry points of the W4A4 ops; bindings.cpp registers them with the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

namespace nunchaku::w4a4 {

// See nunchaku/ops/sm90_layout.py for the dtype / shape / layout of every tensor.
void quantize_act_sm90(const at::Tensor& x, const at::Tensor& smooth, const at::Tensor& lora_down,
                       bool act_unsigned, at::Tensor& act_codes, at::Tensor& act_scales, at::Tensor& lora_act);

void gemm_sm90(const at::Tensor& act_codes, const at::Tensor& act_scales, const at::Tensor& wcodes_packed,
               const at::Tensor& wscales_packed, const at::Tensor& lora_act, const at::Tensor& lora_up,
               const at::Tensor& bias, at::Tensor& out);

}  // namespace nunchaku::w4a4

// Registers the nunchaku ops with the PyTorch dispatcher. Outputs are caller-allocated and
// marked `Tensor!` (written in place), so the ops return nothing and torch.compile sees the
// mutation; the Python wrappers in nunchaku/ops/ allocate them.
#include <torch/extension.h>
#include <torch/library.h>

#include "w4a4/ops.h"

TORCH_LIBRARY(nunchaku, m) {
  m.def(
      "w4a4_quantize_act_sm90(Tensor x, Tensor smooth, Tensor lora_down, bool act_unsigned, "
      "Tensor(a!) act_codes, Tensor(b!) act_scales, Tensor(c!) lora_act) -> ()");
  m.def(
      "w4a4_quantize_act_pow2_sm90(Tensor x, Tensor smooth, Tensor lora_down, "
      "Tensor(a!) act_codes, Tensor(b!) act_scales, Tensor(c!) lora_act) -> ()");
  m.def(
      "w4a4_gemm_sm90(Tensor act_codes, Tensor act_scales, Tensor wcodes_packed, Tensor wscales_packed, "
      "Tensor lora_act, Tensor lora_up, Tensor bias, int gelu_from, Tensor(a!) out) -> ()");
  m.def(
      "w4a4_quantize_act_sm80(Tensor x, Tensor smooth, Tensor lora_down, bool act_unsigned, "
      "Tensor(a!) act_codes, Tensor(b!) act_scales, Tensor(c!) lora_act) -> ()");
  m.def(
      "w4a4_gemm_sm80(Tensor act_codes, Tensor act_scales, Tensor wcodes, Tensor wscales, "
      "Tensor lora_act, Tensor lora_up, Tensor bias, bool act_unsigned, int gelu_from, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(nunchaku, CUDA, m) {
  m.impl("w4a4_quantize_act_sm90", &nunchaku::w4a4::quantize_act_sm90);
  m.impl("w4a4_quantize_act_pow2_sm90", &nunchaku::w4a4::quantize_act_pow2_sm90);
  m.impl("w4a4_gemm_sm90", &nunchaku::w4a4::gemm_sm90);
  m.impl("w4a4_quantize_act_sm80", &nunchaku::w4a4::quantize_act_sm80);
  m.impl("w4a4_gemm_sm80", &nunchaku::w4a4::gemm_sm80);
}

// `import nunchaku._C` loads this library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "nunchaku CUDA kernels (ops live in torch.ops.nunchaku)"; }

"""The kernel boundary: one function per op.

Each function takes logical-layout tensors (nunchaku.quant.weights; weight codes nibble-packed)
and runs the reference implementation (nunchaku.ops.reference), which works on every device.
The CUDA kernels (csrc/, nunchaku.ops.sm90) plug in here once they pass their tests against
that reference; callers do not change.
"""

from __future__ import annotations

import torch

from . import reference


def w4a4_linear(
    x: torch.Tensor,
    qweight_packed: torch.Tensor,
    wscales: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor,
    act_unsigned: bool,
    group_size: int = 64,
) -> torch.Tensor:
    """SVDQuant W4A4 linear on x [M, K] -> [M, N] in x.dtype (see nunchaku.quant.svdquant)."""
    codes, scales, lora_act = reference.w4a4_quantize_act_fuse_lora(x, smooth, lora_down, act_unsigned, group_size)
    return reference.w4a4_gemm(codes, scales, qweight_packed, wscales, lora_act, lora_up, bias, x.dtype, group_size)


def w4a16_linear(
    x: torch.Tensor,
    qweight_packed: torch.Tensor,
    wscales: torch.Tensor,
    wzeros: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """Weight-only 4-bit linear on x [M, K] -> [M, N] in x.dtype."""
    return reference.w4a16_gemm(x, qweight_packed, wscales, wzeros, bias, group_size)

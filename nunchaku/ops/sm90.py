"""Python entry points of the Hopper (sm_90a) W4A4 kernels.

Thin wrappers: they allocate the outputs and call ``torch.ops.nunchaku.*`` (registered by the
``nunchaku._C`` extension, imported lazily so that the package imports without it). Each op has
a fake implementation right below its wrapper, for torch.compile / meta tensors. Tensor layouts
are documented in :mod:`nunchaku.ops.sm90_layout`.
"""

from __future__ import annotations

import torch

from nunchaku.ops.extension import (  # noqa: F401  (extension_available: re-exported for callers)
    extension_available,
    fake_for,
    load_extension,
    quantize_act_fake,
    run_quantize_act,
)
from nunchaku.ops.sm90_layout import GROUP, scale_rows_padded, with_aligned_rows


def w4a4_quantize_act_sm90(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, act_unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth + quantize x [M, K] per (token, 64-channel group), and compute x @ lora_down.

    Returns ``(act_codes uint8 [M, K] (e4m3 bytes), act_scales fp32 [K/64, M_pad], lora_act fp32 [M, R])``.
    """
    return run_quantize_act("w4a4_quantize_act_sm90", x, smooth, lora_down, act_unsigned,
                            codes_per_byte=1)


fake_for("nunchaku::w4a4_quantize_act_sm90")(quantize_act_fake(codes_per_byte=1))


def w4a4_quantize_act_pow2_sm90(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth + quantize x [M, K] in the pow2 format (signed; integers in [-16, 16] with a
    power-of-two scale per (token, 64-channel group), see nunchaku.ops.sm90_layout), and compute
    x @ lora_down.

    Returns ``(act_codes uint8 [M, K] (e4m3 bytes), act_scales fp32 [M_pad] (per token), lora_act fp32 [M, R])``.
    """
    load_extension()
    x = with_aligned_rows(x)
    m, k = x.shape
    act_codes = torch.empty((m, k), dtype=torch.uint8, device=x.device)
    act_scales = torch.empty((scale_rows_padded(m),), dtype=torch.float32, device=x.device)
    lora_act = torch.empty((m, lora_down.shape[1]), dtype=torch.float32, device=x.device)
    torch.ops.nunchaku.w4a4_quantize_act_pow2_sm90(x, smooth, lora_down, act_codes, act_scales, lora_act)
    return act_codes, act_scales, lora_act


@fake_for("nunchaku::w4a4_quantize_act_pow2_sm90")
def _w4a4_quantize_act_pow2_sm90_fake(x, smooth, lora_down, act_codes, act_scales, lora_act) -> None:
    torch._check(x.dim() == 2 and x.shape[1] % GROUP == 0)
    torch._check(act_codes.shape[0] == x.shape[0] and act_codes.shape[1] == x.shape[1])
    torch._check(act_scales.dim() == 1)
    torch._check(lora_act.shape[0] == x.shape[0] and lora_act.shape[1] == lora_down.shape[1])


def w4a4_gemm_sm90(
    act_codes: torch.Tensor,
    act_scales: torch.Tensor,
    wcodes_packed: torch.Tensor,
    wscales_packed: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor,
    gelu_from: int | None = None,
) -> torch.Tensor:
    """W4A4 GEMM with the low-rank up projection and bias fused into the epilogue, and GELU (tanh)
    on the output columns from ``gelu_from`` on (even; None: no GELU).

    Returns ``y [M, N]`` in lora_up's dtype (bf16 or fp16).
    """
    load_extension()
    n = lora_up.shape[0]
    out = torch.empty((act_codes.shape[0], n), dtype=lora_up.dtype, device=act_codes.device)
    torch.ops.nunchaku.w4a4_gemm_sm90(act_codes, act_scales, wcodes_packed, wscales_packed, lora_act, lora_up, bias,
                                      n if gelu_from is None else gelu_from, out)
    return out


@fake_for("nunchaku::w4a4_gemm_sm90")
def _w4a4_gemm_sm90_fake(act_codes, act_scales, wcodes_packed, wscales_packed, lora_act, lora_up, bias, gelu_from,
                         out) -> None:
    torch._check(out.shape[0] == act_codes.shape[0] and out.shape[1] == lora_up.shape[0])
    torch._check(0 <= gelu_from <= out.shape[1] and gelu_from % 2 == 0)
    torch._check(out.dtype == lora_up.dtype)


def w4a4_linear_sm90(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    wcodes_packed: torch.Tensor,
    wscales_packed: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor,
    act_unsigned: bool = False,
    gelu_from: int | None = None,
    pow2_activations: bool = False,
) -> torch.Tensor:
    """The whole SVDQuant W4A4 linear on sm_90: quantize (+ low-rank down) then GEMM (+ up, bias,
    GELU on the columns from gelu_from on). pow2_activations: quantize in the pow2 format instead
    of 4-bit codes (signed inputs only; see nunchaku.ops.Sm90Activations)."""
    if pow2_activations:
        if act_unsigned:
            raise ValueError("the pow2 activation format is signed only; unsigned (post-GELU) inputs use int4 codes")
        act_codes, act_scales, lora_act = w4a4_quantize_act_pow2_sm90(x, smooth, lora_down)
    else:
        act_codes, act_scales, lora_act = w4a4_quantize_act_sm90(x, smooth, lora_down, act_unsigned)
    return w4a4_gemm_sm90(act_codes, act_scales, wcodes_packed, wscales_packed, lora_act, lora_up, bias, gelu_from)

"""Pure-PyTorch reference of every op: runs on any device (CPU included) and defines the math
that the CUDA kernels must reproduce. Inputs are in logical layouts (see nunchaku.quant.weights);
weight codes arrive packed two per byte (nunchaku.quant.int4.pack_int4_nibbles)."""

from __future__ import annotations

import torch

from ..config import GELU_SHIFT
from ..quant.int4 import dequantize_int4, quantize_act_int4, unpack_int4_nibbles


def w4a4_quantize_act_fuse_lora(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, act_unsigned: bool, group_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One read of x float [M, K] gives both inputs of the W4A4 GEMM:
    codes int8 [M, K] (signed, -8..7) or uint8 [M, K] (unsigned, 0..15) of (x [+ GELU_SHIFT]) / smooth,
    scales float32 [M, K/G] (one per token and group),
    lora_act float32 [M, R] = x · lora_down (raw x: no smoothing, no shift)."""
    xf = x.float()
    v = (xf + GELU_SHIFT if act_unsigned else xf) / smooth.float()
    codes, scales = quantize_act_int4(v, group_size, act_unsigned)
    return codes, scales, xf @ lora_down.float()


def w4a4_gemm(
    act_codes: torch.Tensor,
    act_scales: torch.Tensor,
    qweight_packed: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor,
    out_dtype: torch.dtype,
    group_size: int = 64,
    gelu_from: int | None = None,
) -> torch.Tensor:
    """y [M, N] (out_dtype) = Σ_g act_scales[m,g]·wscales[n,g]·Σ_{k∈g} act[m,k]·w[n,k]
    + lora_act·lora_upᵀ + bias, accumulated in float32 and rounded once; then GELU (tanh) on the
    columns from gelu_from on (gelu_columns).
    qweight_packed uint8 [N, K/2] (nibble-packed signed codes), wscales [N, K/G],
    lora_act float32 [M, R], lora_up [N, R], bias [N]."""
    a = dequantize_int4(act_codes, act_scales, group_size)
    return _gemm_dequantized_act(a, qweight_packed, wscales, lora_act, lora_up, bias, out_dtype, group_size, gelu_from)


def _gemm_dequantized_act(a, qweight_packed, wscales, lora_act, lora_up, bias, out_dtype, group_size, gelu_from):
    """w4a4_gemm from the activations' values a float32 [M, K], whatever format they came from."""
    w = dequantize_int4(unpack_int4_nibbles(qweight_packed, signed=True), wscales, group_size)
    y = a @ w.T + lora_act.float() @ lora_up.float().T + bias.float()
    return gelu_columns(y.to(out_dtype), gelu_from)


def w4a4_linear_pow2(
    x: torch.Tensor,
    qweight_packed: torch.Tensor,
    wscales: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor,
    group_size: int = 64,
    gelu_from: int | None = None,
) -> torch.Tensor:
    """The W4A4 linear with the pow2 activation format (nunchaku.ops.Sm90Activations.POW2; signed
    layers): x / smooth quantized per (token, 64-channel group) to integers in [-16, 16] times a
    power of two, decoded from the e4m3 codes the Hopper kernels store
    (sm90_layout.reference_quantize_act_pow2_sm90: the same values bit for bit), then the GEMM of
    w4a4_gemm in float32. Any device: the format's numerics without a Hopper GPU."""
    from .sm90_layout import GROUP, dequantize_act_sm90, reference_quantize_act_pow2_codes

    if group_size != GROUP:
        raise ValueError(f"the pow2 activation format has groups of {GROUP} channels, the layer has {group_size}")
    a = dequantize_act_sm90(*reference_quantize_act_pow2_codes(x, smooth)).float()  # q * 2^e: exact in float32
    lora_act = x.float() @ lora_down.float()
    return _gemm_dequantized_act(a, qweight_packed, wscales, lora_act, lora_up, bias, x.dtype, group_size, gelu_from)


def check_gelu_from(gelu_from: int | None, n: int) -> None:
    """The GEMMs apply their epilogue GELU from an even column in [0, N] (they handle column pairs)."""
    if gelu_from is not None and not (0 <= gelu_from <= n and gelu_from % 2 == 0):
        raise ValueError(f"gelu_from = {gelu_from} must be an even column index in [0, {n}]")


def gelu_columns(y: torch.Tensor, gelu_from: int | None) -> torch.Tensor:
    """y [M, N] with GELU (approximate="tanh", in y's dtype, as PyTorch computes it) applied to
    the columns from gelu_from on: what the W4A4 GEMMs' epilogue does to their rounded output.
    None (or N): y unchanged."""
    check_gelu_from(gelu_from, y.shape[-1])
    if gelu_from is None or gelu_from == y.shape[-1]:
        return y
    if gelu_from == 0:
        return torch.nn.functional.gelu(y, approximate="tanh")
    return torch.cat([y[..., :gelu_from], torch.nn.functional.gelu(y[..., gelu_from:], approximate="tanh")], dim=-1)


def w4a16_gemm(
    x: torch.Tensor,
    qweight_packed: torch.Tensor,
    wscales: torch.Tensor,
    wzeros: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """y [M, N] (x.dtype) = x·Wᵀ + bias with W[n,k] = code·wscales[n,k/G] + wzeros[n,k/G],
    qweight_packed uint8 [N, K/2] (nibble-packed unsigned codes), float32 accumulation."""
    codes = unpack_int4_nibbles(qweight_packed, signed=False)
    g = wscales.shape[-1]
    w = (codes.float().reshape(codes.shape[0], g, group_size) * wscales.float()[..., None]
         + wzeros.float()[..., None]).reshape(codes.shape)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

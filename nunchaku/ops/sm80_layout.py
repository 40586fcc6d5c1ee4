"""Tensor layouts of the Ampere/Ada (sm_80/86/89) W4A4 kernels, which run on the INT4 tensor
cores (``mma.sync m16n8k64`` with 4-bit operands), and pure-PyTorch references of their two ops.

The H100 executes those instructions in emulation, so the GPU tests check these kernels there
too (slowly); their speed can only be measured on an Ampere or Ada GPU.

Notation as in :mod:`nunchaku.ops.sm90_layout` (``M`` tokens, ``K`` input channels with
``K % 64 == 0``, ``N`` output channels with ``N % 128 == 0``, ``R`` rank with ``R % 16 == 0``,
``G = K / 64``, ``M_pad`` = M rounded up to 384).

Kernel-side tensors
-------------------
``act_codes``  uint8 [M, K/2], row-major: two 4-bit activation codes per byte, channel ``2b``
               in the low nibble and ``2b + 1`` in the high one; two's complement (-8..7) for
               signed activations, plain 0..15 for the unsigned (post-GELU) ones. This is the
               order in which the 4-bit mma fragments read a 32-bit register, so ``ldmatrix``
               loads fragments straight from a row-major tile.
``act_scales`` float32 [G, M_pad], group-major, columns ``M..`` zero (same as the sm_90 path).
``lora_act``   float32 [M, R].
``wcodes``     uint8 [N, K/2]: the logical nibble layout (``nunchaku.quant.int4.pack_int4_nibbles``
               of signed codes), unchanged.
``wscales``    [G, N] in the output dtype: the logical [N, G] scales transposed, so that one
               group's scales of a 128-channel tile are 256 contiguous bytes.
``lora_up``    [N, R], ``bias`` [N], in the output dtype.
"""

from __future__ import annotations

import torch

from ..quant.int4 import pack_int4_nibbles, unpack_int4_nibbles
from .sm90_layout import GROUP, reference_quantize_act_sm90

BLOCK_N = 128


def pack_weights_sm80(wcodes_packed: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical W4A4 weights (uint8 [N, K/2] nibble-packed codes, scales [N, K/64] in bf16/fp16)
    -> the sm_80 kernel's (codes unchanged, scales [K/64, N])."""
    if wcodes_packed.dim() != 2 or wcodes_packed.dtype != torch.uint8:
        raise ValueError(f"wcodes_packed must be uint8 [N, K/2], got {wcodes_packed.dtype} {tuple(wcodes_packed.shape)}")
    n, half_k = wcodes_packed.shape
    k = 2 * half_k
    if n % BLOCK_N or k % GROUP:
        raise ValueError(f"need N % {BLOCK_N} == 0 and K % {GROUP} == 0, got N={n}, K={k}")
    if tuple(wscales.shape) != (n, k // GROUP):
        raise ValueError(f"wscales must be [N, K/64] = [{n}, {k // GROUP}], got {tuple(wscales.shape)}")
    if wscales.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"wscales must be bfloat16 or float16 (the layer's output dtype), got {wscales.dtype}")
    return wcodes_packed.contiguous(), wscales.t().contiguous()


def unpack_weights_sm80(wcodes: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_weights_sm80`: (int8 codes [N, K], scales [N, K/64])."""
    return unpack_int4_nibbles(wcodes, signed=True), wscales.t()


def reference_quantize_act_sm80(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, act_unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``nunchaku::w4a4_quantize_act_sm80``: the same codes, scales and lora_act as
    the sm_90 quantizer (bit for bit), with the codes packed as nibbles (uint8 [M, K/2])."""
    codes, scales, lora_act = reference_quantize_act_sm90(x, smooth, lora_down, act_unsigned)
    ints = codes.view(torch.float8_e4m3fn).to(torch.int8)
    return pack_int4_nibbles(ints), scales, lora_act


def reference_gemm_sm80(
    act_codes: torch.Tensor,
    act_scales: torch.Tensor,
    wcodes: torch.Tensor,
    wscales: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor,
    act_unsigned: bool,
    exact: bool = False,
) -> torch.Tensor:
    """Reference of ``nunchaku::w4a4_gemm_sm80`` in float64 (rounded once to lora_up's dtype,
    or returned in float64 when ``exact``)."""
    m = act_codes.shape[0]
    k = 2 * act_codes.shape[1]
    g = k // GROUP
    qa = unpack_int4_nibbles(act_codes, signed=not act_unsigned).to(torch.float64).view(m, g, GROUP)
    a = (qa * act_scales[:, :m].t().to(torch.float64)[..., None]).view(m, k)
    qw = unpack_int4_nibbles(wcodes, signed=True).to(torch.float64)
    n = qw.shape[0]
    w = (qw.view(n, g, GROUP) * wscales.t().to(torch.float64)[..., None]).view(n, k)
    y = a @ w.t() + lora_act.to(torch.float64) @ lora_up.to(torch.float64).t() + bias.to(torch.float64)
    return y if exact else y.to(lora_up.dtype)

"""Group-wise 4-bit integer quantization: the number formats of W4A4 and W4A16.

Conventions shared by everything in the package:
- groups run along the last axis (the input channels K) in blocks of `group_size` consecutive
  channels; a tensor [..., K] has scales [..., K/group_size];
- codes are stored one per int8 (signed, -8..7) or uint8 (unsigned, 0..15) element; packing two
  codes per byte is a storage concern handled by `nunchaku.formats`;
- rounding is round-half-to-even (torch.round), computed in float32.
"""

from __future__ import annotations

import torch

INT4_MIN, INT4_MAX = -8, 7
UINT4_MAX = 15


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    k = t.shape[-1]
    if k % group_size:
        raise ValueError(f"last dimension {k} is not a multiple of the group size {group_size}")
    return t.reshape(*t.shape[:-1], k // group_size, group_size)


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero group has no magnitude; scale 1 gives code 0 for every element, which is exact.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_weight_int4(
    weight: torch.Tensor,
    group_size: int = 64,
    clip_ratio: float | torch.Tensor = 1.0,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric signed int4 quantization of a weight, one scale per (row, group).

    weight: float [N, K]. clip_ratio scales the group max before computing the scale (a value
    below 1 clips outliers to shrink the step); a tensor must broadcast to [N, K/G].
    The scale is rounded to scale_dtype (the dtype a checkpoint stores it in) before the codes
    are computed, so dequantizing the stored pair reproduces exactly what was optimized.
    Returns codes int8 [N, K] in [-8, 7] and scales scale_dtype [N, K/G] (≈ clip*max|w|/7).
    """
    w = _grouped(weight.float(), group_size)
    scale = _safe_scale((w.abs().amax(dim=-1) * clip_ratio / INT4_MAX).to(scale_dtype).float())
    codes = torch.clamp(torch.round(w / scale[..., None]), INT4_MIN, INT4_MAX)
    return codes.reshape(weight.shape).to(torch.int8), scale.to(scale_dtype)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """codes int8/uint8 [..., K], scales [..., K/G] -> float32 [..., K]."""
    c = _grouped(codes.float(), group_size)
    return (c * scales.float()[..., None]).reshape(codes.shape)


def quantize_act_int4(
    v: torch.Tensor, group_size: int = 64, unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-group activation quantization.

    v: float [..., K], already smoothed (and shifted, for unsigned layers).
    signed:   scale = max|v|/7,  codes in [-8, 7]  (int8)
    unsigned: scale = max|v|/15, codes in [0, 15]  (uint8); v must be >= 0 up to rounding,
              negative values saturate to 0.
    Returns codes [..., K] and scales float32 [..., K/G].
    """
    g = _grouped(v.float(), group_size)
    qmax, qmin = (UINT4_MAX, 0) if unsigned else (INT4_MAX, INT4_MIN)
    scale = _safe_scale(g.abs().amax(dim=-1) / qmax)
    codes = torch.clamp(torch.round(g / scale[..., None]), qmin, qmax).reshape(v.shape)
    return codes.to(torch.uint8 if unsigned else torch.int8), scale


def fake_quantize_act_int4(v: torch.Tensor, group_size: int = 64, unsigned: bool = False) -> torch.Tensor:
    """quantize_act_int4 followed by dequantization, float32."""
    codes, scales = quantize_act_int4(v, group_size, unsigned)
    return dequantize_int4(codes, scales, group_size)


def quantize_weight_uint4_asym(
    weight: torch.Tensor, group_size: int, clip_ratio: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric unsigned 4-bit quantization (W4A16): w ≈ code * scale + zero.

    The [min, max] range of each group, shrunk towards its midpoint by clip_ratio, is mapped onto
    codes 0..15 with an integer zero point, so zero = -zero_point * scale and 0.0 stays exact.
    Returns codes uint8 [N, K], scales float32 [N, K/G], zeros float32 [N, K/G].
    """
    w = _grouped(weight.float(), group_size)
    wmax = w.amax(dim=-1).clamp(min=0) * clip_ratio
    wmin = w.amin(dim=-1).clamp(max=0) * clip_ratio
    scale = _safe_scale((wmax - wmin) / UINT4_MAX)
    zero_point = torch.clamp(torch.round(-wmin / scale), 0, UINT4_MAX)
    codes = torch.clamp(torch.round(w / scale[..., None]) + zero_point[..., None], 0, UINT4_MAX)
    return codes.reshape(weight.shape).to(torch.uint8), scale, -zero_point * scale


def pack_int4_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, little-endian: element 2i in the low nibble, 2i+1 in the high.

    codes: int8 (two's complement, -8..7) or uint8 (0..15), shape [..., 2M]; only the low 4
           bits of each element are kept.
    returns uint8 [..., M].
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of codes ({codes.shape[-1]}) into bytes")
    u = codes.contiguous().view(torch.uint8) if codes.dtype == torch.int8 else codes.to(torch.uint8)
    u = u & 0xF
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4_nibbles(packed: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """Inverse of pack_int4_nibbles.

    packed: uint8 or int8 [..., M] (any 1-byte integer view of the bytes).
    returns [..., 2M]: int8 codes in [-8, 7] when `signed` (two's-complement nibbles), else
            uint8 codes in [0, 15].
    """
    u = packed.contiguous().view(torch.uint8) if packed.dtype == torch.int8 else packed
    if u.dtype != torch.uint8:
        raise ValueError(f"unpack_int4_nibbles expects uint8/int8 bytes, got {packed.dtype}")
    if signed:
        # Arithmetic right shifts of the int8 view sign-extend each nibble in one step.
        lo, hi = (u << 4).view(torch.int8) >> 4, u.view(torch.int8) >> 4
    else:
        lo, hi = u & 0xF, u >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)

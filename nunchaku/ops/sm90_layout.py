"""Tensor layouts of the Hopper (sm_90a) W4A4 kernels, the weight repacker, and pure-PyTorch
references of the two sm_90 ops.

Everything here is plain tensor code (runs on any device, no extension needed). The GPU tests
compare ``torch.ops.nunchaku.w4a4_quantize_act_sm90`` / ``w4a4_gemm_sm90`` against
:func:`reference_quantize_act_sm90` / :func:`reference_gemm_sm90`.

Notation: ``M`` tokens, ``K`` input channels (``K % 64 == 0``), ``N`` output channels
(``N % 128 == 0``), ``R`` low-rank rank (``R % 16 == 0``), ``G = K / 64`` quantization groups,
``KT = ceil(K / 128)`` K tiles of the GEMM, ``M_pad = ceil(M / 384) * 384`` (384: a multiple of
both token tiles of the GEMM, 128 and 192), ``N_pad = ceil(N / 192) * 192`` (its wider channel
tile).

Kernel-side tensors
-------------------
``act_codes``       uint8 [M, K], row-major: the bytes of float8_e4m3fn values (read them with
                    ``.view(torch.float8_e4m3fn)``). 4-bit activation codes (signed -8..7 or
                    unsigned 0..15), one per byte as e4m3 (every such integer is exact in e4m3),
                    so the GEMM feeds them to the fp8 tensor cores through TMA unchanged. uint8
                    and not float8 storage: torch.library.opcheck and other generic utilities
                    have no float8 kernels.
``act_scales``      float32 [G, M_pad], group-major (a token tile of one group is contiguous:
                    one bulk copy). Columns ``M..M_pad-1`` hold 0.

The pow2 activation format (``w4a4_quantize_act_pow2_sm90``; signed inputs only) replaces the
two tensors above: each (token, group) is quantized to integers ``q`` in [-16, 16] with the scale
``2^e``, ``e`` the smallest integer (>= -100) with ``16 * 2^e >= max|v|``, so the step is at most
``max|v| / 8`` where the 4-bit format's is ``max|v| / 7``. With ``t`` the token's largest ``e``:

``act_codes``       uint8 [M, K]: the e4m3 bytes of ``q * 2^(e - t + 4)`` (at most 256; exact down to
                    ``e - t = -13``, rounded to nearest even below, i.e. in groups whose maximum is
                    under 2^-13 of the token's largest, with an error under 2^-17 of it).
``act_scales``      float32 [M_pad]: ``2^(t - 4)`` per token, 0 on rows ``M..M_pad-1``. The GEMM
                    takes a 1-D act_scales as this format.
A token with an infinite or NaN activation has undefined codes in this format (the op and the
reference differ there), as its output is non-finite in either format.
``lora_act``        float32 [M, R], row-major: ``x @ lora_down`` (raw x, no smoothing/shift).
``wcodes_packed``   uint8 [KT, N_pad/64, 64, 64]: for K tile ``kt`` and 64-channel block ``b``
                    one 4 KB block, in the order the GEMM's threads read their wgmma A fragments
                    (the weights are the A operand, widened to fp8 in registers); a CTA's
                    consecutive blocks of one K tile are one bulk copy. A block is [group gi
                    (2)][warp w (4)][lane (32)][4 words of 8 nibbles], and nibble ``i`` of word
                    ``j`` of that thread holds the code of channel ``n = 64*b + 16*w + lane//4 +
                    8*(i//4)`` at ``k = 128*kt + 64*gi + 32*(j//2) + 16*(j%2) + 4*(lane%4) +
                    i%4``; nibble ``i`` is bits ``4i..4i+3`` of the little-endian word, a
                    two's-complement int4. K is zero-padded to ``KT * 128``, N to ``N_pad``.
``wscales_packed``  [2*KT, N_pad] in the output dtype (bf16 or fp16, the dtype the scales are exact
                    in), group-major (row ``g`` = scales of group ``g`` for all N; rows
                    ``G..2*KT-1`` are 0). The kernel widens them to fp32 in registers.
``lora_up``         [N, R] in the output dtype, row-major (the logical tensor, unchanged).
``bias``            [N] in the output dtype.
"""

from __future__ import annotations

import torch

from ..config import GELU_SHIFT

GROUP = 64
# The GEMM's two tiles (tokens x channels): 192 x 128 (two consumer warpgroups) and 128 x 192
# (three); act_scales are padded for both, the weights for the wider channel tile.
SCALE_ROW_PAD = 384
CHANNEL_PAD = 192
CHANNEL_BLOCK = 64
BLOCK_K = 128


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def scale_rows_padded(m: int) -> int:
    """M_pad: the token count the act_scales tensor is padded to (a multiple of both token tiles)."""
    return _ceil_div(m, SCALE_ROW_PAD) * SCALE_ROW_PAD


def with_aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """x itself if the quantizers can read it (unit inner stride, rows starting at 16-byte
    aligned addresses: they copy x tiles in 16-byte pieces), else a contiguous copy. Under
    torch.compile data_ptr() cannot be read; the op's own check then names a misaligned x."""
    misaligned = not torch.compiler.is_compiling() and x.data_ptr() % 16
    if x.stride(-1) != 1 or x.stride(0) % 8 or misaligned:
        return x.contiguous()
    return x


def pack_weights_sm90(wcodes: torch.Tensor, wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack logical W4A4 weights into the sm_90 kernel layout (done once, at load time).

    Args:
        wcodes: int8 [N, K], signed int4 codes in [-8, 7] (any integer dtype accepted).
        wscales: [N, K/64] per (output channel, 64-wide input group) scale, bfloat16 or float16:
            the layer's output dtype, which the kernel requires of them.

    Returns:
        ``(wcodes_packed, wscales_packed)``: uint8 [KT, N_pad/64, 64, 64] and [2*KT, N_pad] in
        wscales' dtype, laid out as described in the module docstring.
    """
    if wcodes.dim() != 2:
        raise ValueError(f"wcodes must be 2-D [N, K], got shape {tuple(wcodes.shape)}")
    n, k = wcodes.shape
    if n % 128 or k % GROUP:
        raise ValueError(f"need N % 128 == 0 and K % {GROUP} == 0, got N={n}, K={k}")
    g = k // GROUP
    if tuple(wscales.shape) != (n, g):
        raise ValueError(f"wscales must be [N, K/64] = [{n}, {g}], got {tuple(wscales.shape)}")
    if wscales.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"wscales must be bfloat16 or float16 (the layer's output dtype), got {wscales.dtype}")
    codes = wcodes.to(torch.int16)
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("wcodes must lie in [-8, 7]")
    kt = _ceil_div(k, BLOCK_K)
    kp = kt * BLOCK_K
    n_pad = _ceil_div(n, CHANNEL_PAD) * CHANNEL_PAD
    nb = n_pad // CHANNEL_BLOCK
    nib = torch.nn.functional.pad(codes, (0, kp - k, 0, n_pad - n)) & 0xF
    # n = b*64 + w*16 + half*8 + row, k = kt*128 + gi*64 + q*32 + h*16 + t*4 + e
    nib = nib.view(nb, 4, 2, 8, kt, 2, 2, 2, 4, 4)
    # -> [kt, b, gi, w, row, t, q, h, half, e]: thread (w, lane = 4*row + t), word 2q + h,
    # nibble 4*half + e
    nib = nib.permute(4, 0, 5, 1, 3, 8, 6, 7, 2, 9).reshape(kt, nb, -1, 2)
    packed = (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8).view(kt, nb, CHANNEL_BLOCK, BLOCK_K // 2)
    ws = torch.nn.functional.pad(wscales, (0, 2 * kt - g, 0, n_pad - n)).t().contiguous()
    return packed, ws


def unpack_weights_sm90(wcodes_packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of the code part of :func:`pack_weights_sm90`: int8 [N, K] codes in [-8, 7]."""
    kt, nb, _, half_bk = wcodes_packed.shape
    p = wcodes_packed.to(torch.int16).reshape(kt, nb, -1)
    nib = torch.stack((p & 0xF, p >> 4), dim=-1)
    nib = torch.where(nib >= 8, nib - 16, nib)
    nib = nib.view(kt, nb, 2, 4, 8, 4, 2, 2, 2, 4)  # [kt, b, gi, w, row, t, q, h, half, e]
    codes = nib.permute(1, 3, 8, 4, 0, 2, 6, 7, 5, 9).reshape(nb * CHANNEL_BLOCK, kt * half_bk * 2)
    return codes[:n, :k].to(torch.int8)


def reference_quantize_act_sm90(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, act_unsigned: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``nunchaku::w4a4_quantize_act_sm90``.

    Args:
        x: [M, K] bf16/fp16 (any strides).
        smooth: [K], x's dtype; divides the activations.
        lora_down: [K, R], x's dtype.
        act_unsigned: quantize ``(x + 0.171875) / smooth`` to 0..15 (fc2 inputs) instead of
            ``x / smooth`` to -8..7.

    Returns:
        ``(act_codes, act_scales, lora_act)``: uint8 [M, K] (e4m3 bytes), float32 [K/64, M_pad],
        float32 [M, R]. Scales and codes follow the op's fp32 arithmetic exactly
        (``ascale = max|v| / qmax`` with 0 -> 1, ``code = round_half_even(v / ascale)``
        clamped); ``lora_act`` is computed in float64 and rounded to fp32.
    """
    m, k = x.shape
    g = k // GROUP
    qmax, qmin = (15.0, 0.0) if act_unsigned else (7.0, -8.0)
    xf = x.to(torch.float32)
    if act_unsigned:
        xf = xf + GELU_SHIFT
    v = (xf / smooth.to(torch.float32)).view(m, g, GROUP)
    amax = v.abs().amax(dim=-1)
    # Tensor / tensor: PyTorch computes tensor / python-scalar as a multiply by the reciprocal
    # (1 ulp off the IEEE quotient the kernel computes).
    scale = amax / torch.full_like(amax, qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(v / scale[..., None]).clamp(qmin, qmax)
    codes = q.view(m, k).to(torch.float8_e4m3fn).view(torch.uint8)
    scales = torch.zeros(g, scale_rows_padded(m), dtype=torch.float32, device=x.device)
    scales[:, :m] = scale.t()
    lora_act = (x.to(torch.float64) @ lora_down.to(torch.float64)).to(torch.float32)
    return codes, scales, lora_act


POW2_QMAX = 16
POW2_MIN_EXP = -100
# Codes are stored as q * 2^(e - t + 4): the largest, 16 * 2^4 = 256, still fits e4m3 (max 448),
# and every group down to 2^-13 of the token's largest stays exact.
POW2_CODE_SHIFT = 4


def pow2_group_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The pow2 format's exponent of a group with maximum ``amax`` (float32, >= 0): the smallest
    integer ``e >= -100`` with ``16 * 2^e >= amax``, i.e. ``ceil(log2(amax)) - 4`` (int32)."""
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    ceil_log2 = torch.where(mantissa == 0.5, exponent - 1, exponent)
    e = torch.where(amax == 0, torch.full_like(exponent, POW2_MIN_EXP), ceil_log2 - 4)
    return e.clamp(min=POW2_MIN_EXP).to(torch.int32)


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """2^e (float32, exact) for integer e, built from the exponent bits; 0 where e < -126."""
    e = e.to(torch.int32)
    bits = ((e.clamp(-126, 127) + 127) << 23).view(torch.float32)
    return torch.where(e < -126, torch.zeros_like(bits), bits)


def reference_quantize_act_pow2_sm90(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``nunchaku::w4a4_quantize_act_pow2_sm90`` (the pow2 format, see the module
    docstring): ``(act_codes uint8 [M, K], act_scales float32 [M_pad], lora_act float32 [M, R])``,
    bit for bit what the op computes (lora_act in float64, rounded to fp32)."""
    codes, scales = reference_quantize_act_pow2_codes(x, smooth)
    lora_act = (x.to(torch.float64) @ lora_down.to(torch.float64)).to(torch.float32)
    return codes, scales, lora_act


def reference_quantize_act_pow2_codes(x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantization part of reference_quantize_act_pow2_sm90: ``(act_codes, act_scales)``."""
    m, k = x.shape
    g = k // GROUP
    v = (x.to(torch.float32) / smooth.to(torch.float32)).view(m, g, GROUP)
    e = pow2_group_exponent(v.abs().amax(dim=-1))
    q = torch.round(v * exp2_int(-e)[..., None]).clamp(-POW2_QMAX, POW2_QMAX)
    q = torch.where(q == 0, torch.zeros_like(q), q)  # +0 for -0: the op's codes pass through int8
    t = e.amax(dim=-1)
    shift = POW2_CODE_SHIFT
    codes = (q * exp2_int(e - t[:, None] + shift)[..., None]).view(m, k).to(torch.float8_e4m3fn).view(torch.uint8)
    scales = torch.zeros(scale_rows_padded(m), dtype=torch.float32, device=x.device)
    scales[:m] = exp2_int(t - shift)
    return codes, scales


def dequantize_act_sm90(act_codes: torch.Tensor, act_scales: torch.Tensor) -> torch.Tensor:
    """The activations [M, K] (float64) the codes stand for, in either format: act_scales
    [G, M_pad] per (group, token), or [M_pad] per token (pow2)."""
    m, k = act_codes.shape
    q = act_codes.view(torch.float8_e4m3fn).to(torch.float64)
    if act_scales.dim() == 1:
        return q * act_scales[:m].to(torch.float64)[:, None]
    g = k // GROUP
    return (q.view(m, g, GROUP) * act_scales[:, :m].t().to(torch.float64)[..., None]).view(m, k)


def reference_gemm_sm90(
    act_codes: torch.Tensor,
    act_scales: torch.Tensor,
    wcodes_packed: torch.Tensor,
    wscales_packed: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor,
    exact: bool = False,
) -> torch.Tensor:
    """Reference of ``nunchaku::w4a4_gemm_sm90``, computed in float64.

    ``y[m, n] = sum_g ascale[g, m] * wscale[g, n] * sum_{k in g} qa[m, k] * qw[n, k]
    + lora_act[m] . lora_up[n] + bias[n]`` (with a 1-D act_scales, the pow2 format, ascale[m] for
    every group); returned rounded once to lora_up's dtype, or in float64 when ``exact``.
    """
    m, k = act_codes.shape
    g = k // GROUP
    a = dequantize_act_sm90(act_codes, act_scales)
    n = lora_up.shape[0]
    qw = unpack_weights_sm90(wcodes_packed, n, k).to(torch.float64)
    w = (qw.view(n, g, GROUP) * wscales_packed[:g, :n].t().to(torch.float64)[..., None]).view(n, k)
    y = a @ w.t() + lora_act.to(torch.float64) @ lora_up.to(torch.float64).t() + bias.to(torch.float64)
    return y if exact else y.to(lora_up.dtype)

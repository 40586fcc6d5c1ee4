"""Byte layouts of SVDQuant / Nunchaku checkpoints, as pure tensor permutations.

Every packer here turns a logical, row-major tensor (the form held by
`nunchaku.quant.weights.W4A4Weights` / `W4A16Weights`) into the exact on-disk tensor of the
official checkpoints, and every unpacker inverts it. The layouts are the ones documented in
`testdata/nunchaku_formats/README.md` section 4 (shared folder); section numbers below refer to it.

All layouts are fixed permutations of small tiles, so each one is written as a `reshape` of the
logical tensor into its index digits (e.g. n = n1*128 + a*16 + h*8 + q*2 + b) followed by a
`permute` into storage order. That is the index formula of the README read digit by digit, with
no Python loop over elements. Packed integer tensors are produced and read through byte views,
which assumes a little-endian host (safetensors is little-endian; every platform torch ships for
is too).

Padding (section 4.6): packers pad N and K up to multiples of 128 (rank to 16) with the values
the DeepCompressor converter writes; unpackers take the logical sizes and slice the padding off.
"""

from __future__ import annotations

import sys

import torch

from ..quant.int4 import pack_int4_nibbles as pack_nibbles
from ..quant.int4 import unpack_int4_nibbles as unpack_nibbles

__all__ = [
    "ADANORM_SCALE_CHUNKS",
    "adanorm_deinterleave",
    "adanorm_interleave",
    "pack_adanorm_bias",
    "awq_group_rows",
    "pack_awq_qweight",
    "pack_awq_scales",
    "pack_lora_down",
    "pack_lora_up",
    "pack_nibbles",
    "pack_nvfp4_wscales",
    "pack_scale_vector",
    "pack_w4a4_qweight",
    "pack_w4a4_wscales",
    "round_up",
    "unpack_adanorm_bias",
    "unpack_awq_qweight",
    "unpack_awq_scales",
    "unpack_lora_down",
    "unpack_lora_up",
    "unpack_nibbles",
    "unpack_nvfp4_wscales",
    "unpack_scale_vector",
    "unpack_w4a4_qweight",
    "unpack_w4a4_wscales",
]

if sys.byteorder != "little":  # pragma: no cover - no such torch platform today
    raise ImportError("nunchaku.formats.packing assumes a little-endian host (the safetensors byte order)")

# W4A4 tiles are 128 output rows (the MMA warp tile) by 128 input columns (two 64-groups).
W4A4_N_TILE = 128
W4A4_K_TILE = 128
LORA_TILE = 16
AWQ_N_TILE = 4
AWQ_K_TILE = 64

# Chunks of the AdaNorm modulation output that are scales (the runtime uses 1 + scale, and the
# checkpoints bake the 1 into the bias): S=6 -> scale_msa, scale_mlp; S=3 -> scale.
ADANORM_SCALE_CHUNKS: dict[int, tuple[int, ...]] = {6: (1, 4), 3: (1,)}


def round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {list(t.shape)}")


def _pad2d(t: torch.Tensor, rows: int, cols: int, value: float) -> torch.Tensor:
    """t [r, c] -> [rows, cols] filled with `value` outside the original extent (any dtype,
    float8 included, which F.pad does not support)."""
    r, c = t.shape
    if (r, c) == (rows, cols):
        return t.contiguous()
    if rows < r or cols < c:
        raise ValueError(f"cannot pad shape {[r, c]} to the smaller shape {[rows, cols]}")
    out = torch.full((rows, cols), value, dtype=torch.float32, device=t.device).to(t.dtype)
    out[:r, :c] = t
    return out


# --------------------------------------------------------------------------------------------
# 4.1 W4A4 qweight


def pack_w4a4_qweight(codes: torch.Tensor) -> torch.Tensor:
    """Logical 4-bit weight codes -> the official W4A4 `qweight` (README 4.1).

    codes: int8 [N, K] signed INT4 codes in [-8, 7], or uint8 [N, K] NVFP4 E2M1 codes 0..15;
           K % 64 == 0 is not required (padding is added).
    returns int8 [N_pad, K_pad/2], N_pad = round_up(N, 128), K_pad = round_up(K, 128), padding
            filled with code 0. Memory order, as nested digits: row tile n//128, K tile k//64,
            (n%128)//16, n%8, (k%32)//8, (n%16)//8, (k%64)//32, k%8; consecutive k%8 share a
            little-endian 32-bit word, lowest k in the lowest nibble (the m16n8k64 MMA B
            fragment: one lane's four words per 16x64 sub-tile).
    """
    _check_2d("qweight codes", codes)
    if codes.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"qweight codes must be int8 or uint8, got {codes.dtype}")
    n, k = codes.shape
    n_pad, k_pad = round_up(n, W4A4_N_TILE), round_up(k, W4A4_K_TILE)
    c = _pad2d(codes, n_pad, k_pad, 0)
    # digits: n = n1*128 + n2*16 + n3*8 + n4 ; k = k1*64 + k2*32 + k3*8 + k4
    c = c.reshape(n_pad // 128, 8, 2, 8, k_pad // 64, 2, 4, 8)
    #            n1          n2 n3 n4 k1           k2 k3 k4
    c = c.permute(0, 4, 1, 3, 6, 2, 5, 7).reshape(-1)
    return pack_nibbles(c).view(torch.int8).reshape(n_pad, k_pad // 2)


def unpack_w4a4_qweight(
    packed: torch.Tensor, n: int | None = None, k: int | None = None, signed: bool = True
) -> torch.Tensor:
    """Official W4A4 `qweight` -> logical codes; inverse of `pack_w4a4_qweight`.

    packed: int8 [N_pad, K_pad/2] (README 4.1 layout), N_pad and K_pad multiples of 128.
    n, k: logical sizes to keep (default: the padded sizes).
    returns int8 [n, k] codes in [-8, 7] when `signed` (INT4), else uint8 [n, k] codes 0..15
            (NVFP4 E2M1).
    """
    _check_2d("qweight", packed)
    n_pad, k_pad = packed.shape[0], packed.shape[1] * 2
    if n_pad % W4A4_N_TILE or k_pad % W4A4_K_TILE:
        raise ValueError(f"packed qweight shape {list(packed.shape)} is not [N_pad, K_pad/2] with 128-multiples")
    n = n_pad if n is None else n
    k = k_pad if k is None else k
    if not (0 < n <= n_pad and 0 < k <= k_pad):
        raise ValueError(f"logical size {[n, k]} does not fit the padded qweight [{n_pad}, {k_pad}]")
    c = unpack_nibbles(packed.reshape(-1), signed=signed)
    c = c.reshape(n_pad // 128, k_pad // 64, 8, 8, 4, 2, 2, 8)
    #            n1           k1           n2 n4 k3 n3 k2 k4
    c = c.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n_pad, k_pad)
    return c[:n, :k].contiguous()


# --------------------------------------------------------------------------------------------
# 4.2 scale-like vectors (wscales, bias, smooth, smooth_orig, wcscales)


def pack_w4a4_wscales(scales: torch.Tensor, pad_value: float = 1.0) -> torch.Tensor:
    """Logical per-group scales -> the official packed `wscales` (README 4.2).

    scales: float [N, G], G = K/64 groups per output row.
    returns same dtype, nominal shape [G_pad, N_pad] with G_pad = round_up(G, 2) (K_pad/64) and
            N_pad = round_up(N, 128), padding = `pad_value` (1.0 as DeepCompressor writes).
            Memory order is [N_pad/128][G_pad][128 permuted] (so a stored "row" is a group only
            when N_pad == 128); inside each 128-block, position
            ((n%128)//16)*16 + ((n%8)//2)*4 + ((n%16)//8)*2 + n%2, matching the MMA
            accumulator fragment the GEMM epilogue multiplies.
    """
    _check_2d("wscales", scales)
    n, g = scales.shape
    n_pad, g_pad = round_up(n, W4A4_N_TILE), round_up(g, 2)
    s = _pad2d(scales, n_pad, g_pad, pad_value)
    return _permute_scales(s).reshape(g_pad, n_pad)


def unpack_w4a4_wscales(packed: torch.Tensor, n: int | None = None, g: int | None = None) -> torch.Tensor:
    """Inverse of `pack_w4a4_wscales`.

    packed: float [G_pad, N_pad] (README 4.2 layout).
    returns float [n, g] (same dtype), default the padded sizes.
    """
    _check_2d("wscales", packed)
    g_pad, n_pad = packed.shape
    if n_pad % W4A4_N_TILE:
        raise ValueError(f"packed wscales shape {list(packed.shape)}: N_pad is not a multiple of 128")
    n = n_pad if n is None else n
    g = g_pad if g is None else g
    if not (0 < n <= n_pad and 0 < g <= g_pad):
        raise ValueError(f"logical size {[n, g]} does not fit the padded wscales [{n_pad}, {g_pad}]")
    return _unpermute_scales(packed.reshape(-1), n_pad, g_pad)[:n, :g].contiguous()


def pack_scale_vector(v: torch.Tensor, pad_value: float = 1.0) -> torch.Tensor:
    """One value per output (or input) channel -> packed vector (README 4.2 with G = 1).

    Used for `bias` (over N), `smooth` / `smooth_orig` (over K) and NVFP4 `wcscales` (over N).
    v: float [L].
    returns same dtype [L_pad], L_pad = round_up(L, 128), padding = `pad_value` (DeepCompressor
            pads all of these with 1.0); position within each 128-block as in `pack_w4a4_wscales`.
    """
    if v.dim() != 1:
        raise ValueError(f"scale vector: expected 1-D, got shape {list(v.shape)}")
    l_pad = round_up(v.shape[0], W4A4_N_TILE)
    s = _pad2d(v[:, None], l_pad, 1, pad_value)
    return _permute_scales(s).reshape(l_pad)


def unpack_scale_vector(packed: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Inverse of `pack_scale_vector`: float [L_pad] -> float [length] (default L_pad)."""
    if packed.dim() != 1 or packed.shape[0] % W4A4_N_TILE:
        raise ValueError(f"packed vector shape {list(packed.shape)} is not [L_pad] with L_pad % 128 == 0")
    l_pad = packed.shape[0]
    length = l_pad if length is None else length
    if not 0 < length <= l_pad:
        raise ValueError(f"logical length {length} does not fit the padded vector [{l_pad}]")
    return _unpermute_scales(packed, l_pad, 1)[:length, 0].contiguous()


def _permute_scales(s: torch.Tensor) -> torch.Tensor:
    n_pad, g = s.shape
    # digits: n = n1*128 + a*16 + h*8 + q*2 + b
    s = s.reshape(n_pad // 128, 8, 2, 4, 2, g)
    #            n1            a  h  q  b  g
    return s.permute(0, 5, 1, 3, 2, 4).contiguous()


def _unpermute_scales(flat: torch.Tensor, n_pad: int, g: int) -> torch.Tensor:
    s = flat.reshape(n_pad // 128, g, 8, 4, 2, 2)
    #               n1           g  a  q  h  b
    return s.permute(0, 2, 4, 3, 5, 1).reshape(n_pad, g)


# --------------------------------------------------------------------------------------------
# 4.3 NVFP4 micro scales


def pack_nvfp4_wscales(scales: torch.Tensor, pad_value: float = 1.0) -> torch.Tensor:
    """NVFP4 per-16 micro scales -> packed `wscales` (README 4.3).

    scales: float8_e4m3fn (or any dtype) [N, G16], G16 = K/16.
    returns same dtype, nominal [G16_pad, N_pad], G16_pad = round_up(G16, 8) (K_pad/16),
            N_pad = round_up(N, 128); memory order [n//128][g//4][m%8][(m%32)//8][m//32][g%4]
            with m = n%128: one MMA lane owns 16 bytes, 4 row groups x 4 consecutive k-groups.
            The padding value is not fixed by any reference vector; 1.0 is used.
    """
    _check_2d("nvfp4 wscales", scales)
    n, g = scales.shape
    n_pad, g_pad = round_up(n, W4A4_N_TILE), round_up(g, W4A4_K_TILE // 16)
    s = _pad2d(scales, n_pad, g_pad, pad_value)
    # digits: n = n1*128 + r*32 + c*8 + d ; g = g1*4 + g2
    s = s.reshape(n_pad // 128, 4, 4, 8, g_pad // 4, 4)
    #            n1            r  c  d  g1          g2
    return s.permute(0, 4, 3, 2, 1, 5).contiguous().reshape(g_pad, n_pad)


def unpack_nvfp4_wscales(packed: torch.Tensor, n: int | None = None, g: int | None = None) -> torch.Tensor:
    """Inverse of `pack_nvfp4_wscales`: [G16_pad, N_pad] -> [n, g] (same dtype)."""
    _check_2d("nvfp4 wscales", packed)
    g_pad, n_pad = packed.shape
    if n_pad % W4A4_N_TILE or g_pad % 4:
        raise ValueError(f"packed NVFP4 wscales shape {list(packed.shape)} is not [G16_pad, N_pad]")
    n = n_pad if n is None else n
    g = g_pad if g is None else g
    s = packed.reshape(n_pad // 128, g_pad // 4, 8, 4, 4, 4)
    #                 n1            g1          d  c  r  g2
    s = s.permute(0, 4, 3, 2, 1, 5).reshape(n_pad, g_pad)
    return s[:n, :g].contiguous()


# --------------------------------------------------------------------------------------------
# 4.4 low-rank branch


def _check_lora(name: str, t: torch.Tensor) -> None:
    _check_2d(name, t)
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor, got {t.dtype}")


def pack_lora_down(lora_down: torch.Tensor) -> torch.Tensor:
    """Logical low-rank down projection -> packed `lora_down` (README 4.4).

    lora_down: float [K, R] (x @ lora_down, raw input space).
    returns same dtype, nominal [K_pad, R_pad] (K_pad = round_up(K, 128), R_pad = round_up(R, 16),
            zero padding). Memory: 16x16 tiles of 256 contiguous elements, tile (k//16, j//16)
            in row-major tile order; inside a tile the rank index j plays the MMA row role:
            (j%8)*32 + ((k%8)//2)*8 + ((j%16)//8)*4 + ((k%16)//8)*2 + k%2.
    """
    _check_lora("lora_down", lora_down)
    k, r = lora_down.shape
    k_pad, r_pad = round_up(k, W4A4_K_TILE), round_up(r, LORA_TILE)
    t = _pad2d(lora_down, k_pad, r_pad, 0.0)
    # digits: k = k1*16 + b1*8 + b2*2 + b0 ; j = j1*16 + a1*8 + a0
    t = t.reshape(k_pad // 16, 2, 4, 2, r_pad // 16, 2, 8)
    #            k1           b1 b2 b0 j1           a1 a0
    return t.permute(0, 4, 6, 2, 5, 1, 3).contiguous().reshape(k_pad, r_pad)


def unpack_lora_down(packed: torch.Tensor, k: int | None = None, rank: int | None = None) -> torch.Tensor:
    """Inverse of `pack_lora_down`: float [K_pad, R_pad] -> float [k, rank] (same dtype)."""
    _check_lora("lora_down", packed)
    k_pad, r_pad = packed.shape
    if k_pad % LORA_TILE or r_pad % LORA_TILE:
        raise ValueError(f"packed lora_down shape {list(packed.shape)} is not a multiple of 16x16 tiles")
    k = k_pad if k is None else k
    rank = r_pad if rank is None else rank
    t = packed.reshape(k_pad // 16, r_pad // 16, 8, 4, 2, 2, 2)
    #                 k1           j1           a0 b2 a1 b1 b0
    t = t.permute(0, 5, 3, 6, 1, 4, 2).reshape(k_pad, r_pad)
    return t[:k, :rank].contiguous()


def pack_lora_up(lora_up: torch.Tensor) -> torch.Tensor:
    """Logical low-rank up projection -> packed `lora_up` (README 4.4).

    lora_up: float [N, R] ((x @ lora_down) @ lora_up^T).
    returns same dtype, nominal [N_pad, R_pad] (N_pad = round_up(N, 128), R_pad = round_up(R, 16),
            zero padding). Memory: 16x16 tiles, tile (n//16, j//16) in row-major tile order; inside
            a tile (n%8)*32 + ((j%8)//2)*8 + ((n%16)//8)*4 + ((j%16)//8)*2 + j%2.
    """
    _check_lora("lora_up", lora_up)
    n, r = lora_up.shape
    n_pad, r_pad = round_up(n, W4A4_N_TILE), round_up(r, LORA_TILE)
    t = _pad2d(lora_up, n_pad, r_pad, 0.0)
    # digits: n = n1*16 + a1*8 + a0 ; j = j1*16 + b1*8 + b2*2 + b0
    t = t.reshape(n_pad // 16, 2, 8, r_pad // 16, 2, 4, 2)
    #            n1           a1 a0 j1           b1 b2 b0
    return t.permute(0, 3, 2, 5, 1, 4, 6).contiguous().reshape(n_pad, r_pad)


def unpack_lora_up(packed: torch.Tensor, n: int | None = None, rank: int | None = None) -> torch.Tensor:
    """Inverse of `pack_lora_up`: float [N_pad, R_pad] -> float [n, rank] (same dtype)."""
    _check_lora("lora_up", packed)
    n_pad, r_pad = packed.shape
    if n_pad % LORA_TILE or r_pad % LORA_TILE:
        raise ValueError(f"packed lora_up shape {list(packed.shape)} is not a multiple of 16x16 tiles")
    n = n_pad if n is None else n
    rank = r_pad if rank is None else rank
    t = packed.reshape(n_pad // 16, r_pad // 16, 8, 4, 2, 2, 2)
    #                 n1           j1           a0 b2 a1 b1 b0
    t = t.permute(0, 4, 2, 1, 5, 3, 6).reshape(n_pad, r_pad)
    return t[:n, :rank].contiguous()


# --------------------------------------------------------------------------------------------
# 4.5 AWQ / TinyChat W4A16


def pack_awq_qweight(codes: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Unsigned 4-bit codes -> AWQ/TinyChat `qweight` (README 4.5).

    codes: uint8 [N, K], values 0..15, N % 4 == 0, K % 64 == 0 (no padding is defined).
    dtype: torch.int32 -> [N/4, K/2] (Nunchaku AdaNorm / nunchaku_lite, group 64);
           torch.int16 -> [N/4, K] (TinyChat T5 files, group 128). Same bytes either way.
    Memory order of the nibbles (word = little-endian unit, lowest nibble first): n//4, k//64,
    n%4, (k%64)//32, (k%8)//2, k%2, (k%32)//8 -- each 4-row x 64-column block is 128
    contiguous bytes and one 16-bit unit holds k, k+8, k+16, k+24 (the TinyChat GEMV order,
    which Nunchaku's AWQ kernels and nunchaku_lite read as is).
    """
    _check_2d("awq codes", codes)
    if dtype not in (torch.int32, torch.int16):
        raise ValueError(f"AWQ qweight dtype must be int32 or int16, got {dtype}")
    n, k = codes.shape
    if n % AWQ_N_TILE or k % AWQ_K_TILE:
        raise ValueError(f"AWQ packing needs N % 4 == 0 and K % 64 == 0, got [N, K] = {[n, k]}")
    c = codes.to(torch.uint8)
    # digits: n = n1*4 + n0 ; k = k1*64 + k2*32 + k3*8 + k4h*2 + k4l
    c = c.reshape(n // 4, 4, k // 64, 2, 4, 4, 2)
    #            n1     n0 k1      k2 k3 k4h k4l
    c = c.permute(0, 2, 1, 3, 5, 6, 4).reshape(-1)
    per_elem = dtype.itemsize * 2
    return pack_nibbles(c).view(dtype).reshape(n // 4, k * 4 // per_elem)


def unpack_awq_qweight(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_awq_qweight`.

    packed: int32 [N/4, K/2] or int16 [N/4, K].
    returns uint8 [N, K] codes 0..15.
    """
    _check_2d("awq qweight", packed)
    if packed.dtype not in (torch.int32, torch.int16):
        raise ValueError(f"AWQ qweight must be int32 or int16, got {packed.dtype}")
    rows, cols = packed.shape
    n, k = rows * 4, cols * packed.dtype.itemsize * 2 // 4
    if k % AWQ_K_TILE:
        raise ValueError(f"AWQ qweight shape {list(packed.shape)} gives K = {k}, not a multiple of 64")
    c = unpack_nibbles(packed.contiguous().view(torch.uint8).reshape(-1))
    c = c.reshape(n // 4, k // 64, 4, 2, 4, 2, 4)
    #            n1      k1       n0 k2 k4h k4l k3
    return c.permute(0, 2, 1, 3, 6, 4, 5).reshape(n, k).contiguous()


def awq_group_rows(k: int, group_size: int) -> tuple[int, int]:
    """(exact, converter-padded) number of group rows of AWQ wscales/wzeros for K inputs: the
    Nunchaku loaders expect ceil(K/G); the DeepCompressor/TinyChat converter pads to a multiple
    of 16 (G=64) or 8 (G=128) groups (README 3.6)."""
    g = -(-k // group_size)
    return g, round_up(g, 16 if group_size == 64 else 8)


def pack_awq_scales(scales: torch.Tensor, group_rows: int | None = None) -> torch.Tensor:
    """AWQ `wscales` / `wzeros` / `scales` / `scaled_zeros`: a plain transpose, group-major.

    scales: float [N, G].
    group_rows: rows to write (default G, what the Nunchaku loaders expect); a larger count
            pads with zero rows, as the DeepCompressor converter does (see `awq_group_rows`).
    returns same dtype [group_rows, N].
    """
    _check_2d("awq scales", scales)
    t = scales.t().contiguous()
    if group_rows is not None and group_rows != t.shape[0]:
        t = _pad2d(t, group_rows, t.shape[1], 0.0)
    return t


def unpack_awq_scales(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of `pack_awq_scales`: [G or G_pad, N] -> [N, groups]; rows past `groups` are the
    converter's zero padding and are ignored."""
    _check_2d("awq scales", packed)
    if packed.shape[0] < groups:
        raise ValueError(f"AWQ scales have {packed.shape[0]} group rows, need {groups}")
    return packed[:groups].t().contiguous()


# --------------------------------------------------------------------------------------------
# 3.5 AdaNorm modulation


def _split_count(name: str, rows: int, splits: int) -> int:
    if splits not in ADANORM_SCALE_CHUNKS:
        raise ValueError(f"AdaNorm split count must be 3 or 6, got {splits}")
    if rows % splits:
        raise ValueError(f"{name}: {rows} rows are not divisible into {splits} AdaNorm chunks")
    return rows // splits


def adanorm_interleave(t: torch.Tensor, splits: int) -> torch.Tensor:
    """Original diffusers row order -> checkpoint order: stored row c*S + s = original row s*C + c.

    t: any dtype [S*C, ...] (weight codes [N, K], scales [N, G] or bias [N]).
    returns same dtype and shape, rows reordered so the modulation output reshapes as [C, S].
    """
    c = _split_count("adanorm", t.shape[0], splits)
    return t.reshape(splits, c, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def adanorm_deinterleave(t: torch.Tensor, splits: int) -> torch.Tensor:
    """Inverse of `adanorm_interleave` (checkpoint order -> original diffusers order)."""
    c = _split_count("adanorm", t.shape[0], splits)
    return t.reshape(c, splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _scale_row_mask(n: int, splits: int, device) -> torch.Tensor:
    """bool [n] in checkpoint (interleaved) order: True on rows of the scale chunks."""
    s = torch.arange(n, device=device) % splits
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    for chunk in ADANORM_SCALE_CHUNKS[splits]:
        mask |= s == chunk
    return mask


def pack_adanorm_bias(bias: torch.Tensor, splits: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Original-order modulation bias -> checkpoint bias: interleaved, +1.0 on the scale chunks.

    bias: float [S*C] in diffusers order (any float dtype).
    dtype: checkpoint dtype (default: bias.dtype).
    returns dtype [S*C], interleaved (README 3.5). The +1 is added exactly (float64) and
            rounded once to `dtype`. For a bias already in `dtype` that equals the reference
            converter's addition in the checkpoint dtype; for the float32 bias that
            `unpack_adanorm_bias` returns it restores the stored bytes exactly.
    """
    if bias.dim() != 1:
        raise ValueError(f"AdaNorm bias: expected 1-D, got shape {list(bias.shape)}")
    dtype = bias.dtype if dtype is None else dtype
    b = adanorm_interleave(bias, splits).double()
    b = b + _scale_row_mask(b.shape[0], splits, b.device).double()
    return b.to(dtype)


def unpack_adanorm_bias(packed: torch.Tensor, splits: int) -> torch.Tensor:
    """Checkpoint AdaNorm bias -> float32 [S*C] bias in diffusers order without the +1.

    float32 because (b + 1) - 1 is exact there for a bf16/fp16 b+1, so packing it again gives
    the stored bytes back.
    """
    if packed.dim() != 1:
        raise ValueError(f"AdaNorm bias: expected 1-D, got shape {list(packed.shape)}")
    b = packed.float() - _scale_row_mask(packed.shape[0], splits, packed.device).float()
    return adanorm_deinterleave(b, splits)

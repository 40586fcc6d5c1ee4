"""Per-layer conversion between logical weights and the packed tensors every format shares.

Official checkpoints and nunchaku_lite store a W4A4 or W4A16 layer with the same byte layouts
and differ only in key suffixes (`lora_down` vs `proj_down`, ...) and in which layers get the
AdaNorm reordering, so both go through the functions here with canonical suffixes:

W4A4 (README 4.1-4.4, 4.6), N_pad = round_up(N, 128), K_pad = round_up(K, 128):
    qweight   int8  [N_pad, K_pad/2]   4.1
    wscales   float [K_pad/64, N_pad]  4.2 (memory [N_pad/128][K_pad/64][128 permuted])
    bias      float [N_pad]            4.2, G = 1
    smooth    float [K_pad]            4.2, G = 1
    lora_down float [K_pad, R]         4.4
    lora_up   float [N_pad, R]         4.4
W4A16 AWQ g64 (README 4.5, 3.6), N % 4 == 0, K % 64 == 0:
    qweight   int32 [N/4, K/2]
    wscales   float [G, N] (G = K/64; readers also accept the converter's padding to 16k rows)
    wzeros    float [G, N]
    bias      float [N]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..quant.weights import W4A4Weights, W4A16Weights, WeightShapeError
from . import packing as P
from .errors import CheckpointError, describe, mismatch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
W4A4_SUFFIXES = ("qweight", "wscales", "bias", "smooth", "lora_down", "lora_up")
W4A16_SUFFIXES = ("qweight", "wscales", "wzeros", "bias")
W4A4_GROUP = 64
W4A16_GROUP = 64


def pack_w4a4(w: W4A4Weights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """W4A4Weights -> packed tensors under canonical suffixes, float tensors cast to `dtype`."""
    if w.group_size != W4A4_GROUP:
        raise ValueError(f"only INT4 group size {W4A4_GROUP} can be written, got {w.group_size}")
    return {
        "qweight": P.pack_w4a4_qweight(w.qweight),
        "wscales": P.pack_w4a4_wscales(w.wscales.to(dtype)),
        "bias": P.pack_scale_vector(w.bias.to(dtype)),
        "smooth": P.pack_scale_vector(w.smooth.to(dtype)),
        "lora_down": P.pack_lora_down(w.lora_down.to(dtype)),
        "lora_up": P.pack_lora_up(w.lora_up.to(dtype)),
    }


def pack_w4a16(w: W4A16Weights, dtype: torch.dtype, adanorm_splits: int | None = None) -> dict[str, torch.Tensor]:
    """W4A16Weights (original row order) -> AWQ g64 tensors; with `adanorm_splits` the rows are
    interleaved and the scale chunks' bias gets +1 (README 3.5)."""
    if w.group_size != W4A16_GROUP:
        raise ValueError(f"only W4A16 group size {W4A16_GROUP} (int32 AWQ layout) can be written, got {w.group_size}")
    q, s, z = w.qweight, w.wscales.to(dtype), w.wzeros.to(dtype)
    bias = w.bias
    if adanorm_splits is not None:
        q, s, z = (P.adanorm_interleave(t, adanorm_splits) for t in (q, s, z))
        if bias is None:
            bias = torch.zeros(w.out_features, dtype=torch.float32)
        bias = P.pack_adanorm_bias(bias, adanorm_splits, dtype)
    out = {
        "qweight": P.pack_awq_qweight(q, torch.int32),
        "wscales": P.pack_awq_scales(s),
        "wzeros": P.pack_awq_scales(z),
    }
    if bias is not None:
        out["bias"] = bias.to(dtype)
    return out


class LayerTensors:
    """The tensors of one layer in one file, with checks that name the file and the full key."""

    def __init__(self, file, prefix: str, tensors: Mapping[str, torch.Tensor], key_of: Mapping[str, str]):
        self.file = file
        self.prefix = prefix
        self.tensors = tensors
        self.key_of = key_of  # canonical suffix -> suffix used by this format

    def key(self, suffix: str) -> str:
        return f"{self.prefix}.{self.key_of.get(suffix, suffix)}"

    def has(self, suffix: str) -> bool:
        return self.key(suffix) in self.tensors

    def get(self, suffix: str, shape: tuple[int, ...] | None, dtypes: tuple[torch.dtype, ...], why: str = ""):
        key = self.key(suffix)
        if key not in self.tensors:
            expected = describe(shape, dtypes[0]) if shape is not None else f"a {describe(None, dtypes[0])} tensor"
            raise CheckpointError(f"missing key: expected {expected}", file=self.file, key=key)
        t = self.tensors[key]
        if (shape is not None and tuple(t.shape) != tuple(shape)) or t.dtype not in dtypes:
            exp_dtype = dtypes[0] if t.dtype not in dtypes else t.dtype
            raise mismatch(self.file, key, shape if shape is not None else t.shape, exp_dtype, t.shape, t.dtype, why)
        return t


def _packed_extent(layer: LayerTensors, qweight: torch.Tensor, what: str) -> tuple[int, int]:
    if qweight.dim() != 2 or qweight.shape[0] % 128 or (2 * qweight.shape[1]) % 128:
        raise CheckpointError(
            f"expected int8 [N_pad, K_pad/2] with N_pad and K_pad multiples of 128 ({what}), "
            f"found {list(qweight.shape)}",
            file=layer.file,
            key=layer.key("qweight"),
        )
    return qweight.shape[0], qweight.shape[1] * 2


def unpack_w4a4(
    layer: LayerTensors,
    *,
    true_shape: tuple[int, int] | None,
    rank: int | None,
    act_unsigned: bool,
) -> W4A4Weights:
    """Checks every packed tensor of a W4A4 INT4 layer against the shapes implied by its qweight
    (and `rank` when given) and unpacks to logical tensors of the true [N, K]
    (`true_shape`, default the padded extent)."""
    qweight = layer.get("qweight", None, (torch.int8,))
    n_pad, k_pad = _packed_extent(layer, qweight, "W4A4 INT4 qweight")
    n, k = true_shape if true_shape is not None else (n_pad, k_pad)
    if P.round_up(n, 128) != n_pad or P.round_up(k, 128) != k_pad or k % W4A4_GROUP:
        raise mismatch(
            layer.file, layer.key("qweight"), [P.round_up(n, 128), P.round_up(k, 128) // 2], torch.int8,
            qweight.shape, qweight.dtype, f"logical [N, K] = {[n, k]} from the model config",
        )  # fmt: skip
    lora_down = layer.get("lora_down", None if layer.has("lora_down") else (k_pad, rank or "R"), FLOAT_DTYPES)
    r = rank if rank is not None else (lora_down.shape[1] if lora_down.dim() == 2 else 0)
    if r <= 0 or r % 16:
        raise mismatch(layer.file, layer.key("lora_down"), [k_pad, "R (multiple of 16)"], None, lora_down.shape, None)
    lora_down = layer.get("lora_down", (k_pad, r), FLOAT_DTYPES)
    dtype = lora_down.dtype
    wscales = layer.get("wscales", (k_pad // W4A4_GROUP, n_pad), (dtype,))
    bias = layer.get("bias", (n_pad,), (dtype,))
    smooth = layer.get("smooth", (k_pad,), (dtype,))
    lora_up = layer.get("lora_up", (n_pad, r), (dtype,))
    if layer.has("smooth_orig"):
        layer.get("smooth_orig", (k_pad,), (dtype,))
    try:
        return W4A4Weights(
            qweight=P.unpack_w4a4_qweight(qweight, n, k),
            wscales=P.unpack_w4a4_wscales(wscales, n, k // W4A4_GROUP),
            smooth=P.unpack_scale_vector(smooth, k),
            lora_down=P.unpack_lora_down(lora_down, k, r),
            lora_up=P.unpack_lora_up(lora_up, n, r),
            bias=P.unpack_scale_vector(bias, n),
            act_unsigned=act_unsigned,
            group_size=W4A4_GROUP,
        )
    except (ValueError, WeightShapeError) as e:
        raise CheckpointError(str(e), file=layer.file, key=f"{layer.prefix}.*") from e


def unpack_w4a16(
    layer: LayerTensors,
    *,
    true_shape: tuple[int, int] | None,
    adanorm_splits: int | None,
    bias_required: bool = True,
) -> W4A16Weights:
    """Checks and unpacks an AWQ g64 layer (int32 qweight). AdaNorm layers come back in the
    original diffusers row order with the +1 removed from a float32 bias."""
    qweight = layer.get("qweight", None, (torch.int32,))
    if qweight.dim() != 2:
        raise mismatch(layer.file, layer.key("qweight"), ["N/4", "K/2"], torch.int32, qweight.shape, qweight.dtype)
    n, k = qweight.shape[0] * 4, qweight.shape[1] * 2
    if k % W4A16_GROUP:
        raise mismatch(
            layer.file, layer.key("qweight"), ["N/4", "K/2"], torch.int32, qweight.shape, qweight.dtype,
            "K = 2 * columns must be a multiple of 64",
        )  # fmt: skip
    if true_shape is not None and tuple(true_shape) != (n, k):
        raise mismatch(
            layer.file, layer.key("qweight"), [true_shape[0] // 4, true_shape[1] // 2], torch.int32,
            qweight.shape, qweight.dtype, f"logical [N, K] = {list(true_shape)} from the model config",
        )  # fmt: skip
    groups, padded = P.awq_group_rows(k, W4A16_GROUP)
    wscales = layer.get("wscales", None, FLOAT_DTYPES)
    dtype = wscales.dtype
    rows = wscales.shape[0] if wscales.dim() == 2 and wscales.shape[0] in (groups, padded) else groups
    why = f"{groups} group rows, or {padded} as the converter pads" if padded != groups else ""
    wscales = layer.get("wscales", (rows, n), (dtype,), why)
    wzeros = layer.get("wzeros", (rows, n), (dtype,), why)
    bias = layer.get("bias", (n,), (dtype,)) if bias_required or layer.has("bias") else None
    q = P.unpack_awq_qweight(qweight)
    s = P.unpack_awq_scales(wscales, groups)
    z = P.unpack_awq_scales(wzeros, groups)
    if adanorm_splits is not None:
        if n % adanorm_splits:
            raise CheckpointError(
                f"AdaNorm layer with N = {n} rows cannot hold {adanorm_splits} chunks",
                file=layer.file,
                key=layer.key("qweight"),
            )
        q, s, z = (P.adanorm_deinterleave(t, adanorm_splits) for t in (q, s, z))
        if bias is not None:
            bias = P.unpack_adanorm_bias(bias, adanorm_splits)
    try:
        return W4A16Weights(qweight=q, wscales=s, wzeros=z, bias=bias, group_size=W4A16_GROUP)
    except (ValueError, WeightShapeError) as e:
        raise CheckpointError(str(e), file=layer.file, key=f"{layer.prefix}.*") from e

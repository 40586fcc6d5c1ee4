"""Quantized linear modules. They hold packed weights as buffers and call nunchaku.ops."""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..quant.int4 import pack_int4_nibbles, unpack_int4_nibbles
from ..quant.weights import W4A4Weights, W4A16Weights


def _check_input(module: nn.Module, x: torch.Tensor) -> None:
    if x.shape[-1] != module.in_features:
        raise ValueError(
            f"{type(module).__name__}: input has {x.shape[-1]} features, the layer expects {module.in_features}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{type(module).__name__}: input must be a floating-point tensor, got {x.dtype}")


class SVDQW4A4Linear(nn.Module):
    """SVDQuant W4A4 linear: y = Q4(x/smooth)·Q4(R)ᵀ + (x·lora_down)·lora_upᵀ + bias.

    Buffers (dtype = the compute dtype unless noted):
      qweight   uint8 [N, K/2]  int4 codes of R, two per byte (even k in the low nibble)
      wscales         [N, K/G]  per (row, group) scale of R
      smooth          [K]       divides x before activation quantization
      lora_down       [K, r]    reads the raw x
      lora_up         [N, r]
      bias            [N]
    act_unsigned: the input is post-GELU; it is shifted by GELU_SHIFT and quantized to 0..15
    (the bias holds the compensation).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 32,
        group_size: int = 64,
        act_unsigned: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} must be a multiple of the group size {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.group_size, self.act_unsigned = rank, group_size, act_unsigned
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw))
        self.register_buffer("wscales", torch.ones(out_features, in_features // group_size, dtype=dtype, **kw))
        self.register_buffer("smooth", torch.ones(in_features, dtype=dtype, **kw))
        self.register_buffer("lora_down", torch.zeros(in_features, rank, dtype=dtype, **kw))
        self.register_buffer("lora_up", torch.zeros(out_features, rank, dtype=dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw))

    @classmethod
    def from_weights(cls, w: W4A4Weights, dtype: torch.dtype = torch.bfloat16) -> SVDQW4A4Linear:
        m = cls(w.in_features, w.out_features, w.rank, w.group_size, w.act_unsigned, dtype, w.qweight.device)
        m.load_weights(w)
        return m

    def load_weights(self, w: W4A4Weights) -> None:
        w.validate(prefix=f"{type(self).__name__}.")
        if (w.out_features, w.in_features, w.rank, w.group_size) != (
            self.out_features, self.in_features, self.rank, self.group_size
        ):
            raise ValueError(
                f"weights of shape N={w.out_features}, K={w.in_features}, rank={w.rank}, group={w.group_size} "
                f"do not fit a layer with N={self.out_features}, K={self.in_features}, rank={self.rank}, "
                f"group={self.group_size}"
            )
        self.act_unsigned = w.act_unsigned
        with torch.no_grad():
            self.qweight.copy_(pack_int4_nibbles(w.qweight))
            for name in ("wscales", "smooth", "lora_down", "lora_up", "bias"):
                getattr(self, name).copy_(getattr(w, name))

    def to_weights(self) -> W4A4Weights:
        return W4A4Weights(
            qweight=unpack_int4_nibbles(self.qweight, signed=True),
            wscales=self.wscales, smooth=self.smooth, lora_down=self.lora_down, lora_up=self.lora_up,
            bias=self.bias, act_unsigned=self.act_unsigned, group_size=self.group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        lead = x.shape[:-1]
        y = ops.w4a4_linear(
            x.reshape(-1, self.in_features), self.qweight, self.wscales, self.smooth,
            self.lora_down, self.lora_up, self.bias, self.act_unsigned, self.group_size,
        )
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"group_size={self.group_size}, act_unsigned={self.act_unsigned}")


class AWQW4A16Linear(nn.Module):
    """Weight-only 4-bit linear: W[n,k] = code·wscales[n,k/G] + wzeros[n,k/G].

    Buffers: qweight uint8 [N, K/2] (unsigned codes, two per byte, even k low nibble);
    wscales, wzeros [N, K/G]; bias [N] (absent when the layer has none).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} must be a multiple of the group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        g = in_features // group_size
        kw = {"device": device}
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw))
        self.register_buffer("wscales", torch.ones(out_features, g, dtype=dtype, **kw))
        self.register_buffer("wzeros", torch.zeros(out_features, g, dtype=dtype, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @classmethod
    def from_weights(cls, w: W4A16Weights, dtype: torch.dtype = torch.bfloat16) -> AWQW4A16Linear:
        m = cls(w.in_features, w.out_features, w.bias is not None, w.group_size, dtype, w.qweight.device)
        m.load_weights(w)
        return m

    def load_weights(self, w: W4A16Weights) -> None:
        w.validate(prefix=f"{type(self).__name__}.")
        if (w.out_features, w.in_features, w.group_size) != (self.out_features, self.in_features, self.group_size):
            raise ValueError(
                f"weights of shape N={w.out_features}, K={w.in_features}, group={w.group_size} do not fit a "
                f"layer with N={self.out_features}, K={self.in_features}, group={self.group_size}"
            )
        if (w.bias is None) != (self.bias is None):
            raise ValueError("bias presence of the weights does not match the layer")
        with torch.no_grad():
            self.qweight.copy_(pack_int4_nibbles(w.qweight))
            self.wscales.copy_(w.wscales)
            self.wzeros.copy_(w.wzeros)
            if self.bias is not None:
                self.bias.copy_(w.bias)

    def to_weights(self) -> W4A16Weights:
        return W4A16Weights(
            qweight=unpack_int4_nibbles(self.qweight, signed=False), wscales=self.wscales,
            wzeros=self.wzeros, bias=self.bias, group_size=self.group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        lead = x.shape[:-1]
        y = ops.w4a16_linear(x.reshape(-1, self.in_features), self.qweight, self.wscales, self.wzeros,
                             self.bias, self.group_size)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

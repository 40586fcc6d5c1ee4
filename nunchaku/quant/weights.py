"""Logical (unpacked) tensors of one quantized linear layer.

These containers are the meeting point of the quantizer, the checkpoint formats and the
modules. Every tensor here is in plain row-major logical order; packed on-disk layouts and
kernel layouts are converted to and from this form in `nunchaku.formats` and `nunchaku.ops`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class WeightShapeError(ValueError):
    """A tensor of a quantized layer has the wrong shape or dtype."""


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]):
    if not isinstance(t, torch.Tensor):
        raise WeightShapeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise WeightShapeError(f"{name}: expected shape {list(shape)}, found {list(t.shape)}")
    if t.dtype not in dtypes:
        raise WeightShapeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, found {t.dtype}")


_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


class _LayerWeights:
    """Shared behaviour of the per-layer containers (subclasses are dataclasses with a `qweight`
    [N, K] of codes and a `group_size`)."""

    def __post_init__(self):
        self.validate()

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    def _codes_shape(self, prefix: str) -> tuple[int, int]:
        if self.qweight.dim() != 2:
            raise WeightShapeError(f"{prefix}qweight: expected 2-D [N, K], found {list(self.qweight.shape)}")
        n, k = self.qweight.shape
        if k % self.group_size:
            raise WeightShapeError(
                f"{prefix}qweight: in_features {k} is not a multiple of the group size {self.group_size}"
            )
        return n, k

    def to(self, *args, **kwargs):
        """Moves/casts the float tensors; integer codes only move."""
        return _moved(self, args, kwargs)


@dataclass
class W4A4Weights(_LayerWeights):
    """One SVDQuant W4A4 linear, y = Q4(x/smooth)·(qweight*wscales)ᵀ + (x·lora_down)·lora_upᵀ + bias.

    qweight:   int8  [N, K]     signed int4 codes in [-8, 7], row n = output channel n
    wscales:   float [N, K/G]   scale of codes qweight[n, g*G:(g+1)*G] (G = group_size)
    smooth:    float [K]        activations are divided by it before quantization
    lora_down: float [K, R]     applied to the raw (un-smoothed) input
    lora_up:   float [N, R]
    bias:      float [N]        zeros for layers without a bias
    act_unsigned: inputs are post-GELU: quantize (x + GELU_SHIFT)/smooth to codes 0..15, and the
                  bias already holds -GELU_SHIFT * (row sums of the dense main-branch weight).
    """

    qweight: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    lora_down: torch.Tensor
    lora_up: torch.Tensor
    bias: torch.Tensor
    act_unsigned: bool = False
    group_size: int = 64

    @property
    def rank(self) -> int:
        return self.lora_down.shape[1]

    def validate(self, prefix: str = "") -> None:
        n, k = self._codes_shape(prefix)
        if self.lora_down.dim() != 2:
            raise WeightShapeError(f"{prefix}lora_down: expected 2-D [K, R], found {list(self.lora_down.shape)}")
        r = self.lora_down.shape[1]
        _expect(prefix + "qweight", self.qweight, (n, k), (torch.int8,))
        _expect(prefix + "wscales", self.wscales, (n, k // self.group_size), _FLOAT_DTYPES)
        _expect(prefix + "smooth", self.smooth, (k,), _FLOAT_DTYPES)
        _expect(prefix + "lora_down", self.lora_down, (k, r), _FLOAT_DTYPES)
        _expect(prefix + "lora_up", self.lora_up, (n, r), _FLOAT_DTYPES)
        _expect(prefix + "bias", self.bias, (n,), _FLOAT_DTYPES)

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 [N, K] weight in raw input space (what the layer computes without
        activation quantization): q*s/smooth + lora_up·lora_downᵀ."""
        main = self.qweight.float() * self.wscales.float().repeat_interleave(self.group_size, dim=1)
        return main / self.smooth.float()[None, :] + self.lora_up.float() @ self.lora_down.float().T


@dataclass
class W4A16Weights(_LayerWeights):
    """One weight-only 4-bit linear (AWQ/TinyChat style), y = x·Wᵀ + bias with
    W[n, k] = qweight[n, k] * wscales[n, k//G] + wzeros[n, k//G].

    qweight: uint8 [N, K]    unsigned codes 0..15
    wscales: float [N, K/G]
    wzeros:  float [N, K/G]  the additive zero term (= -zero_point * scale)
    bias:    float [N] or None
    """

    qweight: torch.Tensor
    wscales: torch.Tensor
    wzeros: torch.Tensor
    bias: torch.Tensor | None
    group_size: int = 64

    def validate(self, prefix: str = "") -> None:
        n, k = self._codes_shape(prefix)
        g = k // self.group_size
        _expect(prefix + "qweight", self.qweight, (n, k), (torch.uint8,))
        _expect(prefix + "wscales", self.wscales, (n, g), _FLOAT_DTYPES)
        _expect(prefix + "wzeros", self.wzeros, (n, g), _FLOAT_DTYPES)
        if self.bias is not None:
            _expect(prefix + "bias", self.bias, (n,), _FLOAT_DTYPES)

    def dequantize(self) -> torch.Tensor:
        """Dense fp32 [N, K] weight."""
        s = self.wscales.float().repeat_interleave(self.group_size, dim=1)
        z = self.wzeros.float().repeat_interleave(self.group_size, dim=1)
        return self.qweight.float() * s + z


def _moved(weights, args, kwargs):
    device = kwargs.get("device")
    for a in args:
        if isinstance(a, (torch.device, str)):
            device = torch.device(a)
    moved = {}
    for f in fields(weights):
        v = getattr(weights, f.name)
        if isinstance(v, torch.Tensor):
            v = v.to(*args, **kwargs) if v.is_floating_point() else v.to(device=device)
        moved[f.name] = v
    return type(weights)(**moved)


def concat_w4a4_outputs(parts: list[W4A4Weights]) -> W4A4Weights:
    """Stacks W4A4 layers that read the same input into one layer along N.

    All parts must share K, the group size, the signedness and the smoothing vector (the
    activation is quantized once for all of them). Their low-rank branches are kept exact by
    concatenating along the rank: lora_down = [d_1 | d_2 | ...] [K, Σr], and lora_up is block
    diagonal [ΣN, Σr], so part i's outputs only see part i's ranks.
    """
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        if (p.in_features, p.group_size, p.act_unsigned) != (first.in_features, first.group_size, first.act_unsigned):
            raise WeightShapeError(
                f"part {i} (K={p.in_features}, group={p.group_size}, unsigned={p.act_unsigned}) cannot share an "
                f"input with part 0 (K={first.in_features}, group={first.group_size}, unsigned={first.act_unsigned})"
            )
        if not torch.equal(p.smooth, first.smooth):
            raise WeightShapeError(f"part {i} has a different smoothing vector than part 0; they cannot share an input")
    dtype = first.lora_up.dtype
    lora_up = torch.zeros(sum(p.out_features for p in parts), sum(p.rank for p in parts), dtype=dtype,
                          device=first.lora_up.device)
    row = col = 0
    for p in parts:
        lora_up[row:row + p.out_features, col:col + p.rank] = p.lora_up
        row, col = row + p.out_features, col + p.rank
    return W4A4Weights(
        qweight=torch.cat([p.qweight for p in parts]),
        wscales=torch.cat([p.wscales for p in parts]),
        smooth=first.smooth,
        lora_down=torch.cat([p.lora_down for p in parts], dim=1),
        lora_up=lora_up,
        bias=torch.cat([p.bias for p in parts]),
        act_unsigned=first.act_unsigned,
        group_size=first.group_size,
    )

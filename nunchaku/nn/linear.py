"""Quantized linear modules. They hold packed weights as buffers and call nunchaku.ops."""

from __future__ import annotations

import enum

import torch
from torch import nn

from .. import ops
from ..quant.int4 import pack_int4_nibbles, unpack_int4_nibbles
from ..quant.weights import W4A4Weights, W4A16Weights

_state_generation = 0


def state_generation() -> int:
    """A counter that moves whenever a quantized module of this package replaces tensors its
    forward reads (an adapter set, re-weighted or removed, a weight-layout change, a device or
    dtype move). A CUDA graph of a forward (nunchaku.cuda_graph) records tensor addresses, so it
    keys its graphs on this and recaptures when it moves."""
    return _state_generation


def _tensors_replaced() -> None:
    global _state_generation
    _state_generation += 1


class LowRankAdapters:
    """Extra low-rank branches (LoRAs) on a quantized linear, each with its own strength.

    An adapter is down [K, r] (reads the raw input x), up [N, r] and a strength s; the layer adds
    s·(x·down)·upᵀ. For W4A4 layers the adapters become extra ranks of the 16-bit low-rank branch
    (no requantization). Factors are non-persistent buffers: they move with .to() but are not
    part of the checkpoint. Strengths are applied as a per-rank scale of the up-projection, so
    changing one recomputes a small concatenation and reloads nothing.
    """

    def _init_adapters(self) -> None:
        self._adapter_names: list[str] = []
        self._adapter_strengths: dict[str, float] = {}
        self._lowrank_cache = None

    def _drop_lowrank_cache(self) -> None:
        self._lowrank_cache = None
        _tensors_replaced()

    def set_adapter(self, name: str, down: torch.Tensor, up: torch.Tensor, strength: float = 1.0) -> None:
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != up.shape[1]:
            raise ValueError(f"adapter {name!r}: expected down [K, r] and up [N, r], got {list(down.shape)} and "
                             f"{list(up.shape)}")
        if down.shape[0] != self.in_features or up.shape[0] != self.out_features:
            raise ValueError(
                f"adapter {name!r} is [K={down.shape[0]}, N={up.shape[0]}], the layer is "
                f"[K={self.in_features}, N={self.out_features}]"
            )
        dtype, device = self.compute_dtype, self.qweight.device
        self.register_buffer(f"adapter_down_{name}", down.to(device, dtype), persistent=False)
        self.register_buffer(f"adapter_up_{name}", up.to(device, dtype), persistent=False)
        if name not in self._adapter_names:
            self._adapter_names.append(name)
        self._adapter_strengths[name] = float(strength)
        self._drop_lowrank_cache()

    def set_adapter_strength(self, name: str, strength: float) -> None:
        if name not in self._adapter_strengths:
            raise KeyError(f"no adapter named {name!r} on this layer (have {self._adapter_names})")
        self._adapter_strengths[name] = float(strength)
        self._drop_lowrank_cache()

    def remove_adapter(self, name: str) -> None:
        if name not in self._adapter_strengths:
            raise KeyError(f"no adapter named {name!r} on this layer (have {self._adapter_names})")
        self._adapter_names.remove(name)
        del self._adapter_strengths[name]
        delattr(self, f"adapter_down_{name}")
        delattr(self, f"adapter_up_{name}")
        self._drop_lowrank_cache()

    @property
    def adapter_names(self) -> list[str]:
        return list(self._adapter_names)

    def _adapter_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All active adapters as one (down [K, Σr], up·strength [N, Σr]), or None when none is
        active. Adapters at strength 0 are left out, so the layer is then exactly the base layer."""
        active = [n for n in self._adapter_names if self._adapter_strengths[n] != 0.0]
        if not active:
            return None
        downs = [getattr(self, f"adapter_down_{n}") for n in active]
        ups = [getattr(self, f"adapter_up_{n}") * self._adapter_strengths[n] for n in active]
        return torch.cat(downs, dim=1), torch.cat(ups, dim=1)

    def _apply(self, fn, *args, **kwargs):
        self._drop_lowrank_cache()  # .to()/.cuda() move the buffers the cache was built from
        return super()._apply(fn, *args, **kwargs)


def _check_input(module: nn.Module, x: torch.Tensor) -> None:
    if x.shape[-1] != module.in_features:
        raise ValueError(
            f"{type(module).__name__}: input has {x.shape[-1]} features, the layer expects {module.in_features}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{type(module).__name__}: input must be a floating-point tensor, got {x.dtype}")


class WeightLayout(str, enum.Enum):
    """How a SVDQW4A4Linear holds its int4 weights (only one copy is ever kept)."""

    NIBBLES = "nibbles"  # qweight uint8 [N, K/2], wscales [N, K/G]: the reference path's layout
    SM90 = "sm90"  # qweight / wscales in the Hopper kernels' layout (nunchaku.ops.sm90_layout)
    SM80 = "sm80"  # qweight as NIBBLES, wscales transposed [K/G, N] (nunchaku.ops.sm80_layout)


_LAYOUT_OF_KERNELS = {ops.W4A4Kernels.SM90: WeightLayout.SM90, ops.W4A4Kernels.SM80: WeightLayout.SM80}


class SVDQW4A4Linear(LowRankAdapters, nn.Module):
    """SVDQuant W4A4 linear: y = Q4(x/smooth)·Q4(R)ᵀ + (x·lora_down)·lora_upᵀ + bias.

    Buffers (dtype = the compute dtype unless noted):
      qweight   uint8 [N, K/2]  int4 codes of R, two per byte (even k in the low nibble)
      wscales         [N, K/G]  per (row, group) scale of R
      (in WeightLayout.SM90 / SM80 these two hold a kernel family's layout instead: the module
       repacks itself when moved to a GPU those kernels support, and back when moved away)
      smooth          [K]       divides x before activation quantization
      lora_down       [K, r]    reads the raw x
      lora_up         [N, r]
      bias            [N]
    act_unsigned: the input is post-GELU; it is shifted by GELU_SHIFT and quantized to 0..15
    (the bias holds the compensation).
    sm90_activations: the activation format (nunchaku.ops.Sm90Activations; taken from
    NUNCHAKU_SM90_ACTIVATIONS when the module is created, and may be set directly): POW2 runs on
    the Hopper kernels and the reference path, not on the Ampere/Ada kernels (an error there);
    unsigned layers and layers whose group size is not 64 always run INT4
    (uses_pow2_activations).
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
        self.weight_layout = WeightLayout.NIBBLES
        self.sm90_activations = ops.requested_sm90_activations()
        self._init_adapters()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.sync_weight_layout()
        return self

    def sync_weight_layout(self) -> None:
        """Puts the weights in the layout of the path that runs on the module's device (a CUDA
        kernel family or the reference; see nunchaku.ops.w4a4_kernels_for). Called on every
        .to()/.cuda() and at creation."""
        kernels = ops.w4a4_kernels_for(self.qweight.device, self.out_features, self.in_features, self.rank,
                                       self.compute_dtype, self.group_size)
        want = WeightLayout.NIBBLES if kernels is None else _LAYOUT_OF_KERNELS[kernels]
        if want is not self.weight_layout:
            self._set_layout(want)

    def _set_layout(self, layout: WeightLayout) -> None:
        from ..ops.sm80_layout import pack_weights_sm80
        from ..ops.sm90_layout import pack_weights_sm90

        codes, scales = self._logical_codes_and_scales()
        if layout is WeightLayout.SM90:
            self.qweight, self.wscales = pack_weights_sm90(codes, scales)
        elif layout is WeightLayout.SM80:
            self.qweight, self.wscales = pack_weights_sm80(pack_int4_nibbles(codes), scales.to(self.bias.dtype))
        else:
            self.qweight, self.wscales = pack_int4_nibbles(codes), scales.to(self.bias.dtype)
        self.weight_layout = layout
        _tensors_replaced()

    def _logical_codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes [N, K] and scales [N, K/G] whatever the current layout."""
        if self.weight_layout is WeightLayout.NIBBLES:
            return unpack_int4_nibbles(self.qweight, signed=True), self.wscales
        if self.weight_layout is WeightLayout.SM80:
            from ..ops.sm80_layout import unpack_weights_sm80

            return unpack_weights_sm80(self.qweight, self.wscales)
        from ..ops.sm90_layout import unpack_weights_sm90

        g = self.in_features // self.group_size
        scales = self.wscales[:g, : self.out_features].t().to(self.bias.dtype)
        return unpack_weights_sm90(self.qweight, self.out_features, self.in_features), scales

    @classmethod
    def from_weights(cls, w: W4A4Weights, dtype: torch.dtype = torch.bfloat16) -> SVDQW4A4Linear:
        m = cls(w.in_features, w.out_features, w.rank, w.group_size, w.act_unsigned, dtype, w.qweight.device)
        m.load_weights(w)
        m.sync_weight_layout()
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
        layout = self.weight_layout
        if layout is not WeightLayout.NIBBLES:
            self._set_layout(WeightLayout.NIBBLES)
        with torch.no_grad():
            self.qweight.copy_(pack_int4_nibbles(w.qweight))
            for name in ("wscales", "smooth", "lora_down", "lora_up", "bias"):
                getattr(self, name).copy_(getattr(w, name))
        if layout is not WeightLayout.NIBBLES:
            self._set_layout(layout)

    def to_weights(self) -> W4A4Weights:
        codes, scales = self._logical_codes_and_scales()
        return W4A4Weights(
            qweight=codes,
            wscales=scales, smooth=self.smooth, lora_down=self.lora_down, lora_up=self.lora_up,
            bias=self.bias, act_unsigned=self.act_unsigned, group_size=self.group_size,
        )

    @property
    def uses_pow2_activations(self) -> bool:
        """Whether forward quantizes the activations in the pow2 format: set to POW2, signed, and
        in groups of 64 channels (the format's; other layers keep int4, as unsigned ones do)."""
        return (self.sm90_activations is ops.Sm90Activations.POW2 and not self.act_unsigned
                and self.group_size == 64)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.lora_up.dtype

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The branch the kernels run: the quantization's own rank-r part followed by every
        adapter (strength folded into up), zero-padded to a multiple of 16 ranks for the kernels."""
        if self._lowrank_cache is None:
            extra = self._adapter_factors()
            if extra is None:
                self._lowrank_cache = (self.lora_down, self.lora_up)
            else:
                down = torch.cat([self.lora_down, extra[0]], dim=1)
                up = torch.cat([self.lora_up, extra[1]], dim=1)
                pad = -down.shape[1] % 16
                if pad:
                    down = torch.nn.functional.pad(down, (0, pad))
                    up = torch.nn.functional.pad(up, (0, pad))
                self._lowrank_cache = (down, up)
        return self._lowrank_cache

    def forward(self, x: torch.Tensor, gelu_from: int | None = None) -> torch.Tensor:
        """gelu_from: apply GELU (approximate="tanh") to the output columns from this one on, in the
        kernels' epilogue (an MLP up-projection followed by its activation, in one pass; even)."""
        _check_input(self, x)
        ops.reference.check_gelu_from(gelu_from, self.out_features)
        lead = x.shape[:-1]
        lora_down, lora_up = self.lowrank_factors()
        x2 = x.reshape(-1, self.in_features)
        pow2 = self.uses_pow2_activations
        if pow2 and self.weight_layout is WeightLayout.SM80:
            raise RuntimeError("this layer is set to the pow2 activation format (sm90_activations), which the "
                               "Ampere/Ada (sm80) W4A4 kernels do not implement; set it to 'int4' "
                               "(nunchaku.nn.set_sm90_activations(model, 'int4') or NUNCHAKU_SM90_ACTIVATIONS=int4), "
                               "or run the reference path (NUNCHAKU_BACKEND=reference)")
        if self.weight_layout is not WeightLayout.NIBBLES:
            from ..ops import sm80, sm90

            # The epilogue's GELU works in the compute dtype; for an input in another dtype it is
            # applied after the cast, in x's dtype, as the reference path does.
            in_epilogue = x.dtype == self.compute_dtype
            args = (x2.to(self.bias.dtype), self.smooth, lora_down, self.qweight, self.wscales, lora_up, self.bias,
                    self.act_unsigned, gelu_from if in_epilogue else None)
            if self.weight_layout is WeightLayout.SM90:
                y = sm90.w4a4_linear_sm90(*args, pow2_activations=pow2)
            else:
                y = sm80.w4a4_linear_sm80(*args)
            y = y.to(x.dtype)
            if not in_epilogue:
                y = ops.reference.gelu_columns(y, gelu_from)
        else:
            y = ops.w4a4_linear(
                x2, self.qweight, self.wscales, self.smooth,
                lora_down, lora_up, self.bias, self.act_unsigned, self.group_size, gelu_from, pow2,
            )
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        extra = f", sm90_activations={self.sm90_activations.value}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"group_size={self.group_size}, act_unsigned={self.act_unsigned}{extra}")


def set_sm90_activations(model: nn.Module, activations: ops.Sm90Activations | str) -> int:
    """Sets the activation format (nunchaku.ops.Sm90Activations, or its value "int4" / "pow2") of
    every SVDQW4A4Linear in `model`; returns how many layers it set. Unsigned (post-GELU) layers
    and layers with groups other than 64 keep int4 whatever the setting; pow2 runs on the Hopper
    kernels and the reference path."""
    activations = ops.Sm90Activations(activations)
    count = 0
    for module in model.modules():
        if isinstance(module, SVDQW4A4Linear):
            module.sm90_activations = activations
            count += 1
    return count


class AWQW4A16Linear(LowRankAdapters, nn.Module):
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
        self._init_adapters()

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

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.wscales.dtype

    def to_weights(self) -> W4A16Weights:
        return W4A16Weights(
            qweight=unpack_int4_nibbles(self.qweight, signed=False), wscales=self.wscales,
            wzeros=self.wzeros, bias=self.bias, group_size=self.group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = ops.w4a16_linear(x2, self.qweight, self.wscales, self.wzeros, self.bias, self.group_size)
        if self._adapter_names:
            if self._lowrank_cache is None:
                self._lowrank_cache = self._adapter_factors() or ()
            if self._lowrank_cache:
                down, up = self._lowrank_cache
                y = y + ((x2.float() @ down.float()) @ up.float().T).to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

"""Typed, versioned quantization configs.

A config says what a checkpoint holds ("these layers are W4A4 INT4, group 64, rank 32"); it
does not say how a layer runs (that is the modules' and ops' business). Configs round-trip
through JSON with a format version so a checkpoint written today can be read, or refused with
a clear message, by a later release.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

CONFIG_VERSION = 1

# Post-GELU activations are >= -0.17; adding this shift makes them non-negative so fc2's
# activations can use all 16 unsigned codes instead of wasting the negative half.
GELU_SHIFT = 0.171875


class ConfigError(ValueError):
    """A quantization config is malformed, inconsistent or from an unknown version."""


class Precision(str, enum.Enum):
    """4-bit number format of weights and activations in a W4A4 layer."""

    INT4 = "int4"
    NVFP4 = "nvfp4"  # accepted by the config so checkpoints can name it; no runtime path yet


class ComputeDtype(str, enum.Enum):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    def to_torch(self):
        import torch

        return {ComputeDtype.BFLOAT16: torch.bfloat16, ComputeDtype.FLOAT16: torch.float16}[self]

    @classmethod
    def from_torch(cls, dtype) -> ComputeDtype:
        import torch

        mapping = {torch.bfloat16: cls.BFLOAT16, torch.float16: cls.FLOAT16}
        if dtype not in mapping:
            raise ConfigError(f"compute dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        return mapping[dtype]


def _check_positive_multiple(name: str, value: int, multiple: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0 or value % multiple:
        raise ConfigError(f"{name} must be a positive multiple of {multiple}, got {value}")


@dataclass(frozen=True)
class W4A4Config:
    """SVDQuant W4A4 layers: 4-bit weights and activations plus a 16-bit low-rank branch.

    group_size: input channels sharing one weight scale (per output row) and one activation
        scale (per token). 64 for INT4, 16 for NVFP4.
    rank: rank of the low-rank branch; a multiple of 16 (the kernels tile it by 16).
    unsigned_act_layers: module names whose inputs are post-GELU and are quantized unsigned
        (codes 0..15) after adding GELU_SHIFT.
    """

    precision: Precision = Precision.INT4
    group_size: int = 64
    rank: int = 32
    targets: tuple[str, ...] = ()
    unsigned_act_layers: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "precision", Precision(self.precision))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "unsigned_act_layers", tuple(self.unsigned_act_layers))
        expected_group = {Precision.INT4: 64, Precision.NVFP4: 16}[self.precision]
        if self.group_size != expected_group:
            raise ConfigError(
                f"W4A4 {self.precision.value} needs group_size {expected_group}, got {self.group_size}"
            )
        _check_positive_multiple("W4A4 rank", self.rank, 16)
        unknown = set(self.unsigned_act_layers) - set(self.targets)
        if self.targets and unknown:
            raise ConfigError(f"unsigned_act_layers not among targets: {sorted(unknown)}")


@dataclass(frozen=True)
class W4A16Config:
    """AWQ-style weight-only 4-bit layers (AdaLN modulation linears, T5 encoder).

    Unsigned codes 0..15 with a per-group scale and zero: w = code * scale + zero.
    """

    group_size: int = 64
    targets: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.group_size not in (64, 128):
            raise ConfigError(f"W4A16 group_size must be 64 or 128, got {self.group_size}")


@dataclass(frozen=True)
class QuantizationConfig:
    """Everything a checkpoint says about how its layers are quantized."""

    w4a4: W4A4Config = field(default_factory=W4A4Config)
    w4a16: W4A16Config | None = field(default_factory=W4A16Config)
    compute_dtype: ComputeDtype = ComputeDtype.BFLOAT16
    version: int = CONFIG_VERSION

    def __post_init__(self):
        object.__setattr__(self, "compute_dtype", ComputeDtype(self.compute_dtype))
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"quantization config version {self.version} is not supported "
                f"(this nunchaku reads version {CONFIG_VERSION})"
            )
        if self.w4a16 is not None:
            overlap = set(self.w4a4.targets) & set(self.w4a16.targets)
            if overlap:
                raise ConfigError(f"layers listed as both W4A4 and W4A16: {sorted(overlap)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["w4a4"]["precision"] = self.w4a4.precision.value
        d["w4a4"]["targets"] = list(self.w4a4.targets)
        d["w4a4"]["unsigned_act_layers"] = list(self.w4a4.unsigned_act_layers)
        if self.w4a16 is not None:
            d["w4a16"]["targets"] = list(self.w4a16.targets)
        d["compute_dtype"] = self.compute_dtype.value
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizationConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"quantization config must be a JSON object, got {type(d).__name__}")
        known = {"w4a4", "w4a16", "compute_dtype", "version"}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"unknown quantization config fields: {sorted(extra)}")
        if "version" not in d:
            raise ConfigError("quantization config has no 'version' field")
        try:
            w4a4 = W4A4Config(**d.get("w4a4", {}))
            w4a16 = None if d.get("w4a16") is None else W4A16Config(**d["w4a16"])
        except TypeError as e:
            raise ConfigError(f"malformed quantization config: {e}") from None
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"malformed quantization config: {e}") from None
        try:
            compute_dtype = ComputeDtype(d.get("compute_dtype", ComputeDtype.BFLOAT16.value))
        except ValueError:
            raise ConfigError(f"unknown compute_dtype {d.get('compute_dtype')!r}") from None
        return cls(w4a4=w4a4, w4a16=w4a16, compute_dtype=compute_dtype, version=d["version"])

    @classmethod
    def from_json(cls, text: str) -> QuantizationConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"quantization config is not valid JSON: {e}") from None
        return cls.from_dict(d)

"""Our checkpoints: the diffusers `nunchaku_lite` layout (README section 2).

A checkpoint is an ordinary diffusers model folder:

    config.json                           transformer config + "quantization_config" (below)
    diffusion_pytorch_model.safetensors   every tensor (a sharded *.safetensors.index.json is
                                          also read, never written)

    "quantization_config": {
        "quant_method": "nunchaku_lite",
        "compute_dtype": "bfloat16" | "float16",
        "svdq_w4a4": {"precision": "int4", "group_size": 64, "rank": R, "targets": [modules]},
        "awq_w4a16": {"precision": "int4", "group_size": 64, "targets": [modules]},
        "nunchaku": {"version": 1, "unsigned_act_targets": [modules]}      <- our extension
    }

Per target module `<m>` (the model's own module names, written as given):
    W4A4:  <m>.qweight       int8  [N, K/2]       README 4.1
           <m>.wscales       float [K/64, N]      README 4.2 (memory [N/128][K/64][128 permuted])
           <m>.bias          float [N]            README 4.2, G = 1
           <m>.smooth_factor float [K]            README 4.2, G = 1 (divides the input)
           <m>.proj_down     float [K, R]         README 4.4 (raw, un-smoothed input)
           <m>.proj_up       float [N, R]         README 4.4
    W4A16: <m>.qweight       int32 [N/4, K/2]     README 4.5 (AWQ, group 64)
           <m>.wscales       float [K/64, N]      plain transpose
           <m>.wzeros        float [K/64, N]      plain transpose (w = code * wscales + wzeros)
           <m>.bias          float [N]            only when the module has a bias
Float tensors of quantized modules are stored in the compute dtype; other (plain) parameters are
stored under their own names and dtypes. N and K must be multiples of 128 (W4A4): unlike the
official converter, nunchaku_lite has no padding, the module shapes are the tensor shapes.
W4A16 modules keep the module's own row order (no AdaNorm interleave, no +1 on the bias): the
diffusers runtime runs them as plain linears.

Unsigned activations: our fc2 layers may be quantized with unsigned, GELU-shifted activations
(README 3.2; `W4A4Weights.act_unsigned`, bias carrying the shift compensation). diffusers' own
nunchaku_lite runtime always quantizes activations signed, without the shift, so such a layer
would compute wrong outputs there. They are listed in "nunchaku.unsigned_act_targets"; a
checkpoint meant for pure diffusers must be quantized with signed fc2 and written with
`diffusers_compatible=True`, which refuses unsigned layers and leaves the "nunchaku" extension out.
"""

from __future__ import annotations

from collections import Counter

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ComputeDtype, ConfigError, QuantizationConfig, W4A4Config, W4A16Config
from ..quant.weights import W4A4Weights, W4A16Weights
from ._layers import LayerTensors, pack_w4a4, pack_w4a16, unpack_w4a4, unpack_w4a16
from .errors import CheckpointError
from .safetensors_io import read_safetensors, write_safetensors

__all__ = ["LITE_CONFIG", "LITE_WEIGHTS", "LiteCheckpoint", "load_lite", "save_lite"]

LITE_CONFIG = "config.json"
LITE_WEIGHTS = "diffusion_pytorch_model.safetensors"
EXTENSION_VERSION = 1
# canonical suffix -> nunchaku_lite suffix (the v1 module-level names, README 3.8)
W4A4_LITE_KEYS = {"smooth": "smooth_factor", "lora_down": "proj_down", "lora_up": "proj_up"}
W4A4_SUFFIXES = ("qweight", "wscales", "bias", "smooth_factor", "proj_down", "proj_up")
W4A16_SUFFIXES = ("qweight", "wscales", "wzeros", "bias")
# suffixes that only quantized modules have (not `bias`, which plain modules have too)
_QUANT_ONLY_SUFFIXES = frozenset(W4A4_SUFFIXES + W4A16_SUFFIXES + ("wcscales", "wtscale")) - {"bias"}


@dataclass
class LiteCheckpoint:
    """A nunchaku_lite checkpoint in logical form; module names as in the file."""

    w4a4: dict[str, W4A4Weights]
    w4a16: dict[str, W4A16Weights]
    plain: dict[str, torch.Tensor]
    transformer_config: dict
    rank: int
    quantization_config: QuantizationConfig

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.quantization_config.compute_dtype.to_torch()


def _compute_dtype(value) -> ComputeDtype:
    if isinstance(value, torch.dtype):
        return ComputeDtype.from_torch(value)
    return ComputeDtype(value)


def save_lite(
    folder: str | os.PathLike,
    transformer_config: dict,
    w4a4: dict[str, W4A4Weights],
    w4a16: dict[str, W4A16Weights],
    plain: dict[str, torch.Tensor],
    compute_dtype: torch.dtype | str = torch.bfloat16,
    diffusers_compatible: bool = False,
) -> Path:
    """Writes a nunchaku_lite model folder (config.json + diffusion_pytorch_model.safetensors).

    transformer_config: the diffusers transformer config; any "quantization_config" in it is
        replaced.
    diffusers_compatible: refuse layers with unsigned activations (diffusers' runtime would run
        them signed) and leave our "nunchaku" config extension out.
    Raises ValueError for weights that cannot be written in this layout.
    """
    folder = Path(folder)
    cdtype = _compute_dtype(compute_dtype)
    dtype = cdtype.to_torch()
    rank_counts = Counter(w.rank for w in w4a4.values())
    main_rank = rank_counts.most_common(1)[0][0] if rank_counts else 32
    rank_overrides = {name: w.rank for name, w in sorted(w4a4.items()) if w.rank != main_rank}
    if diffusers_compatible and rank_overrides:
        raise ValueError(
            f"diffusers_compatible=True, but nunchaku_lite has one rank per checkpoint and these layers differ "
            f"from rank {main_rank}: {rank_overrides}"
        )
    unsigned = sorted(name for name, w in w4a4.items() if w.act_unsigned)
    if diffusers_compatible and unsigned:
        raise ValueError(
            "diffusers_compatible=True, but these layers use unsigned (GELU-shifted) activations, which "
            f"diffusers' nunchaku_lite runtime does not implement: {unsigned}. Quantize them with signed "
            "activations (act_unsigned=False) for a checkpoint meant for pure diffusers."
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, w in w4a4.items():
        if w.out_features % 128 or w.in_features % 128:
            raise ValueError(
                f"{name}: nunchaku_lite stores unpadded W4A4 tensors, so N and K must be multiples of 128; "
                f"got [N, K] = {[w.out_features, w.in_features]}"
            )
        for k, v in pack_w4a4(w, dtype).items():
            tensors[f"{name}.{W4A4_LITE_KEYS.get(k, k)}"] = v
    for name, w in w4a16.items():
        if w.out_features % 4:
            raise ValueError(f"{name}: AWQ W4A16 needs N % 4 == 0, got N = {w.out_features}")
        for k, v in pack_w4a16(w, dtype).items():
            tensors[f"{name}.{k}"] = v
    clash = sorted(set(tensors) & set(plain))
    if clash:
        raise ValueError(f"plain tensors collide with quantized module keys: {clash[:5]}")
    tensors.update(plain)

    qc: dict = {
        "quant_method": "nunchaku_lite",
        "compute_dtype": cdtype.value,
        "svdq_w4a4": {"precision": "int4", "group_size": 64, "rank": main_rank, "targets": sorted(w4a4)},
        "awq_w4a16": {"precision": "int4", "group_size": 64, "targets": sorted(w4a16)},
    }
    if not diffusers_compatible:
        qc["nunchaku"] = {"version": EXTENSION_VERSION, "unsigned_act_targets": unsigned}
        if rank_overrides:
            # Our extension: layers whose low-rank branch differs from the checkpoint rank, e.g. an
            # official single block's q/k/v and MLP up-projection fused with both branches kept.
            qc["nunchaku"]["rank_overrides"] = rank_overrides
    config = {k: v for k, v in transformer_config.items() if k != "quantization_config"}
    config["quantization_config"] = qc
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / LITE_WEIGHTS, tensors, {"format": "pt"})
    tmp = folder / f".{LITE_CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, folder / LITE_CONFIG)
    return folder


# ------------------------------------------------------------------------------------------
# Reading


def _field(cfg_path: Path, section: dict, name: str, where: str, kind, expected=None):
    key = f"quantization_config.{where}{name}"
    if name not in section:
        raise CheckpointError(
            f"missing field: expected {expected if expected is not None else kind.__name__}", file=cfg_path, key=key
        )
    value = section[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"expected a {kind.__name__}, found {value!r}", file=cfg_path, key=key)
    if expected is not None and value != expected:
        raise CheckpointError(f"expected {expected!r}, found {value!r}", file=cfg_path, key=key)
    return value


def _targets(cfg_path: Path, section: dict, where: str) -> list[str]:
    targets = section.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(
            f"expected a list of module names, found {targets!r}",
            file=cfg_path,
            key=f"quantization_config.{where}targets",
        )
    return targets


def _parse_config(cfg_path: Path) -> tuple[dict, QuantizationConfig, dict[str, int]]:
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError("not a nunchaku_lite folder: config.json is missing", file=cfg_path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"config is not readable JSON: {e}", file=cfg_path) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"config must be a JSON object, found a JSON {type(config).__name__}", file=cfg_path)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"expected a JSON object, found {qc!r}", file=cfg_path, key="quantization_config")
    _field(cfg_path, qc, "quant_method", "", str, "nunchaku_lite")
    dtype_name = _field(cfg_path, qc, "compute_dtype", "", str)
    try:
        cdtype = ComputeDtype(dtype_name)
    except ValueError:
        raise CheckpointError(
            f"expected 'bfloat16' or 'float16', found {dtype_name!r}",
            file=cfg_path,
            key="quantization_config.compute_dtype",
        ) from None

    known = {"quant_method", "compute_dtype", "svdq_w4a4", "awq_w4a16", "nunchaku"}
    extra = sorted(set(qc) - known)
    if extra:
        raise CheckpointError(
            f"unknown fields {extra}; expected only {sorted(known)}", file=cfg_path, key="quantization_config"
        )

    svdq = qc.get("svdq_w4a4", {})
    if not isinstance(svdq, dict):
        raise CheckpointError(
            f"expected a JSON object, found {svdq!r}", file=cfg_path, key="quantization_config.svdq_w4a4"
        )
    w4a4_targets: list[str] = []
    rank = 32
    if svdq:
        precision = _field(cfg_path, svdq, "precision", "svdq_w4a4.", str)
        if precision == "nvfp4":
            raise CheckpointError(
                "NVFP4 checkpoints are not supported yet (only INT4 nunchaku_lite checkpoints can be read)",
                file=cfg_path,
                key="quantization_config.svdq_w4a4.precision",
            )
        _field(cfg_path, svdq, "precision", "svdq_w4a4.", str, "int4")
        _field(cfg_path, svdq, "group_size", "svdq_w4a4.", int, 64)
        rank = _field(cfg_path, svdq, "rank", "svdq_w4a4.", int)
        w4a4_targets = _targets(cfg_path, svdq, "svdq_w4a4.")

    awq = qc.get("awq_w4a16")
    w4a16_cfg = None
    if awq is not None:
        if not isinstance(awq, dict):
            raise CheckpointError(
                f"expected a JSON object, found {awq!r}", file=cfg_path, key="quantization_config.awq_w4a16"
            )
        _field(cfg_path, awq, "precision", "awq_w4a16.", str, "int4")
        _field(cfg_path, awq, "group_size", "awq_w4a16.", int, 64)
        w4a16_targets = _targets(cfg_path, awq, "awq_w4a16.")
        w4a16_cfg = (64, w4a16_targets)

    unsigned: list[str] = []
    rank_overrides: dict[str, int] = {}
    ext = qc.get("nunchaku")
    if ext is not None:
        if not isinstance(ext, dict):
            raise CheckpointError(
                f"expected a JSON object, found {ext!r}", file=cfg_path, key="quantization_config.nunchaku"
            )
        _field(cfg_path, ext, "version", "nunchaku.", int, EXTENSION_VERSION)
        unsigned = ext.get("unsigned_act_targets", [])
        if not isinstance(unsigned, list) or not all(isinstance(t, str) for t in unsigned):
            raise CheckpointError(
                f"expected a list of module names, found {unsigned!r}",
                file=cfg_path,
                key="quantization_config.nunchaku.unsigned_act_targets",
            )
        rank_overrides = ext.get("rank_overrides", {})
        if not isinstance(rank_overrides, dict) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r > 0 and r % 16 == 0 for r in rank_overrides.values()
        ):
            raise CheckpointError(
                f"expected an object of module name -> positive multiple of 16, found {rank_overrides!r}",
                file=cfg_path,
                key="quantization_config.nunchaku.rank_overrides",
            )
        for field_name, names in (("unsigned_act_targets", unsigned), ("rank_overrides", rank_overrides)):
            stray = sorted(set(names) - set(w4a4_targets))
            if stray:
                raise CheckpointError(
                    f"modules not among svdq_w4a4.targets: {stray}",
                    file=cfg_path,
                    key=f"quantization_config.nunchaku.{field_name}",
                )
    try:
        quant = QuantizationConfig(
            w4a4=W4A4Config(group_size=64, rank=rank, targets=tuple(w4a4_targets), unsigned_act_layers=tuple(unsigned)),
            w4a16=None if w4a16_cfg is None else W4A16Config(group_size=w4a16_cfg[0], targets=tuple(w4a16_cfg[1])),
            compute_dtype=cdtype,
        )
    except ConfigError as e:
        raise CheckpointError(str(e), file=cfg_path, key="quantization_config") from None
    transformer_config = {k: v for k, v in config.items() if k != "quantization_config"}
    return transformer_config, quant, rank_overrides


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    single = folder / LITE_WEIGHTS
    index = folder / f"{LITE_WEIGHTS}.index.json"
    if single.is_file():
        tensors, _ = read_safetensors(single)
        return tensors, dict.fromkeys(tensors, single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"malformed shard index: {e}", file=index) from None
        tensors, origin = {}, {}
        for shard in shards:
            part, _ = read_safetensors(folder / shard)
            for k, t in part.items():
                if weight_map.get(k) != shard:
                    raise CheckpointError(f"key not mapped to this shard by {index.name}", file=folder / shard, key=k)
                tensors[k] = t
                origin[k] = folder / shard
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"keys listed in the index but absent from the shards: {missing[:5]}", file=index)
        return tensors, origin
    raise CheckpointError(f"not a nunchaku_lite folder: {LITE_WEIGHTS} is missing", file=folder)


def load_lite(folder: str | os.PathLike) -> LiteCheckpoint:
    """Reads a nunchaku_lite model folder, strictly: every target must have all its keys with
    the shapes its qweight implies (and the config's rank), no key under a target may be
    unknown, and no quantized tensor may belong to a module that is not a target. Raises
    CheckpointError naming the file, the key and expected vs found shape/dtype."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError("not a nunchaku_lite folder (expected a diffusers model folder)", file=folder)
    transformer_config, quant, rank_overrides = _parse_config(folder / LITE_CONFIG)
    tensors, origin = _read_weights(folder)
    w4a4_targets = set(quant.w4a4.targets)
    w4a16_targets = set(quant.w4a16.targets) if quant.w4a16 is not None else set()
    unsigned = set(quant.w4a4.unsigned_act_layers)

    consumed: set[str] = set()
    for key in tensors:
        name, _, suffix = key.rpartition(".")
        if name in w4a4_targets or name in w4a16_targets:
            allowed = W4A4_SUFFIXES if name in w4a4_targets else W4A16_SUFFIXES
            if suffix not in allowed:
                raise CheckpointError(
                    f"unexpected key for quantized module {name!r}: expected only {[f'{name}.{s}' for s in allowed]}",
                    file=origin[key],
                    key=key,
                )
            consumed.add(key)
        elif suffix in _QUANT_ONLY_SUFFIXES:
            raise CheckpointError(
                f"unexpected key: quantized tensors for module {name!r}, "
                "which is not among the quantization_config targets",
                file=origin[key],
                key=key,
            )

    def layer(name: str, keys) -> LayerTensors:
        qkey = f"{name}.qweight"
        return LayerTensors(origin.get(qkey, folder / LITE_WEIGHTS), name, tensors, keys)

    w4a4 = {
        name: unpack_w4a4(
            layer(name, W4A4_LITE_KEYS),
            true_shape=None,
            rank=rank_overrides.get(name, quant.w4a4.rank),
            act_unsigned=name in unsigned,
        )
        for name in quant.w4a4.targets
    }
    w4a16 = {
        name: unpack_w4a16(layer(name, {}), true_shape=None, adanorm_splits=None, bias_required=False)
        for name in (quant.w4a16.targets if quant.w4a16 is not None else ())
    }
    plain = {k: t for k, t in tensors.items() if k not in consumed}
    return LiteCheckpoint(
        w4a4=w4a4,
        w4a16=w4a16,
        plain=plain,
        transformer_config=transformer_config,
        rank=quant.w4a4.rank,
        quantization_config=quant,
    )

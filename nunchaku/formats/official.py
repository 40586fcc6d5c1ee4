"""Official SVDQuant INT4 checkpoints for FLUX.1: reading all three generations, writing them.

Generations (README section 2), detected from what is present:

- `Generation.V01`: one safetensors file, no header metadata, transformer blocks only
  (`svdq-int4-flux.1-*.safetensors` of Nov 2024). W4A4 layers have no `smooth_orig`.
- `Generation.TWO_FILE`: a folder with `transformer_blocks.safetensors` (converted blocks),
  `unquantized_layers.safetensors` (every other parameter, diffusers names) and usually
  `config.json` (the diffusers transformer config). W4A4 layers carry `smooth_orig`.
- `Generation.V1`: one file = the two files merged, plus header metadata `config` (transformer
  config JSON), `quantization_config` (JSON, method "svdquant") and `model_class`.

Layer names in the result are the block-level file names without the tensor suffix
("transformer_blocks.0.qkv_proj", "single_transformer_blocks.3.mlp_fc2",
"transformer_blocks.0.norm1.linear"); `plain` holds every other tensor under its key.

Semantics applied on read:
- `mlp_fc2` / `mlp_context_fc2` are `act_unsigned=True` (the official INT4 runtime decides this
  by name; their bias already holds the GELU-shift compensation, README 3.2). All other W4A4
  layers are signed. The writer enforces the same rule.
- AdaNorm W4A16 layers (`norm1.linear`, `norm1_context.linear`: 6 chunks; single-block
  `norm.linear`: 3 chunks) come back in diffusers row order with the +1 removed from a float32
  bias (README 3.5).
- `smooth_orig` is checked for shape and dropped: no runtime reads it (README 3.3). The writer
  stores `smooth` again as `smooth_orig`, since the logical weights do not keep a folded factor.
- True layer sizes: packed W4A4 tensors are padded to multiples of 128 (README 4.6) and the file
  does not record the logical N, K. When the transformer config is known (V1 metadata, two-file
  config.json, or the `transformer_config` argument) the FLUX sizes follow from
  `num_attention_heads * attention_head_dim` (inner) and the MLP ratio 4 (`mlp_ratio` if the
  config has one): qkv N = 3*inner, mlp_fc1 N = 4*inner, mlp_fc2 K = 4*inner, all other extents
  inner. Otherwise the padded extents are taken as the logical ones, which is exact for every
  real FLUX.1 checkpoint (3072, 9216, 12288, 18432 are multiples of 128).
- Only INT4 is supported; an NVFP4 file (fp8 `wscales`, `wcscales`/`wtscale`, or an fp4
  quantization_config) raises CheckpointError after detection.
"""

from __future__ import annotations

import enum
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..quant.weights import W4A4Weights, W4A16Weights
from ._layers import FLOAT_DTYPES, LayerTensors, pack_w4a4, pack_w4a16, unpack_w4a4, unpack_w4a16
from .errors import CheckpointError, mismatch
from .safetensors_io import inspect_safetensors, read_safetensors, write_safetensors

__all__ = [
    "Generation",
    "MODEL_CLASS",
    "OfficialCheckpoint",
    "adanorm_splits_for",
    "flux_layer_sizes",
    "is_unsigned_act_layer",
    "read_official",
    "write_official",
    "write_two_file",
    "write_v01",
    "write_v1",
]

MODEL_CLASS = "NunchakuFluxTransformer2dModel"
TWO_FILE_BLOCKS = "transformer_blocks.safetensors"
TWO_FILE_UNQUANTIZED = "unquantized_layers.safetensors"
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")

W4A4_KEYS = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up")
W4A16_KEYS = ("qweight", "wscales", "wzeros", "bias")
NVFP4_ONLY_KEYS = ("wcscales", "wtscale")
UNSIGNED_ACT_LAYERS = ("mlp_fc2", "mlp_context_fc2")
# suffixes that only quantized layers have (not `bias`, which plain layers have too)
_QUANT_ONLY_KEYS = frozenset(W4A4_KEYS + W4A16_KEYS + NVFP4_ONLY_KEYS) - {"bias"}

_INT4_QUANT_CONFIG = {
    "method": "svdquant",
    "weight": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
    "activation": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
}
_NVFP4_MESSAGE = "NVFP4 checkpoints are not supported yet (only SVDQuant INT4 checkpoints can be read)"


class Generation(str, enum.Enum):
    V01 = "v0.1"
    TWO_FILE = "two-file"
    V1 = "v1"


@dataclass
class OfficialCheckpoint:
    """An official checkpoint in logical form (see the module docstring for naming)."""

    generation: Generation
    w4a4: dict[str, W4A4Weights]
    w4a16: dict[str, W4A16Weights]
    plain: dict[str, torch.Tensor]
    transformer_config: dict | None
    rank: int
    dtype: torch.dtype = torch.bfloat16
    metadata: dict[str, str] = field(default_factory=dict)


def is_unsigned_act_layer(name: str) -> bool:
    """True for the official layers whose input is post-GELU and quantized unsigned (INT4)."""
    return name.startswith(BLOCK_PREFIXES) and name.rsplit(".", 1)[-1] in UNSIGNED_ACT_LAYERS


def adanorm_splits_for(name: str) -> int | None:
    """Chunk count S of an official AdaNorm modulation layer name, None for other layers."""
    if name.startswith("transformer_blocks.") and name.endswith((".norm1.linear", ".norm1_context.linear")):
        return 6
    if name.startswith("single_transformer_blocks.") and name.endswith(".norm.linear"):
        return 3
    return None


def flux_layer_sizes(config: dict | None) -> dict[tuple[str, str], tuple[int, int]]:
    """(block kind, layer suffix) -> logical [N, K] of FLUX layers, from a diffusers config."""
    if not config:
        return {}
    try:
        inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        mlp = int(inner * float(config.get("mlp_ratio", 4.0)))
    except (KeyError, TypeError, ValueError):
        return {}
    double = {
        "qkv_proj": (3 * inner, inner),
        "qkv_proj_context": (3 * inner, inner),
        "out_proj": (inner, inner),
        "out_proj_context": (inner, inner),
        "mlp_fc1": (mlp, inner),
        "mlp_context_fc1": (mlp, inner),
        "mlp_fc2": (inner, mlp),
        "mlp_context_fc2": (inner, mlp),
        "norm1.linear": (6 * inner, inner),
        "norm1_context.linear": (6 * inner, inner),
    }
    single = {
        "qkv_proj": (3 * inner, inner),
        "mlp_fc1": (mlp, inner),
        "out_proj": (inner, inner),
        "mlp_fc2": (inner, mlp),
        "norm.linear": (3 * inner, inner),
    }
    sizes = {("transformer_blocks", k): v for k, v in double.items()}
    sizes.update({("single_transformer_blocks", k): v for k, v in single.items()})
    return sizes


_LAYER_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.(.+)$")


def _true_shape(sizes, name: str) -> tuple[int, int] | None:
    m = _LAYER_RE.match(name)
    return sizes.get((m.group(1), m.group(2))) if m else None


# ------------------------------------------------------------------------------------------
# Reading


def _load_json_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"config is not readable JSON: {e}", file=path) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"config must be a JSON object, found a JSON {type(data).__name__}", file=path)
    return data


def _metadata_json(path: Path, metadata: dict[str, str], key: str) -> dict | None:
    if key not in metadata:
        return None
    try:
        data = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"header metadata is not valid JSON: {e}", file=path, key=f"__metadata__.{key}") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"header metadata must be a JSON object, found a JSON {type(data).__name__}",
            file=path,
            key=f"__metadata__.{key}",
        )
    return data


def _check_quant_config(path: Path, qc: dict) -> int | None:
    """Validates a v1 `quantization_config`; returns its optional rank."""
    key = "__metadata__.quantization_config"
    weight = qc.get("weight") if isinstance(qc.get("weight"), dict) else {}
    wdtype = weight.get("dtype")
    if isinstance(wdtype, str) and "fp4" in wdtype:
        raise CheckpointError(f"{_NVFP4_MESSAGE}; weight dtype {wdtype!r}", file=path, key=key)
    found = {"method": qc.get("method"), "weight.dtype": wdtype, "weight.group_size": weight.get("group_size")}
    expected = {"method": "svdquant", "weight.dtype": "int4", "weight.group_size": 64}
    if found != expected:
        raise CheckpointError(
            f"unsupported quantization config: expected {expected}, found {found}", file=path, key=key
        )
    rank = qc.get("rank")
    if rank is not None and (not isinstance(rank, int) or rank <= 0 or rank % 16):
        raise CheckpointError(f"rank must be a positive multiple of 16, found {rank!r}", file=path, key=key)
    return rank


def _detect(path: Path) -> tuple[Generation, Path]:
    if path.is_dir():
        if (path / TWO_FILE_BLOCKS).is_file():
            return Generation.TWO_FILE, path
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(
                f"unknown checkpoint generation: folder has no {TWO_FILE_BLOCKS} and "
                f"{len(files)} .safetensors files ({[f.name for f in files][:8]}); pass the file itself",
                file=path,
            )
        path = files[0]
    if not path.is_file():
        raise CheckpointError("no such checkpoint file or folder", file=path)
    if path.name == TWO_FILE_BLOCKS and (path.parent / TWO_FILE_UNQUANTIZED).is_file():
        return Generation.TWO_FILE, path.parent
    metadata = inspect_safetensors(path).metadata
    if any(k in metadata for k in ("config", "quantization_config", "model_class")):
        return Generation.V1, path
    return Generation.V01, path


def read_official(
    path: str | os.PathLike, transformer_config: dict | None = None, *, strict: bool = True
) -> OfficialCheckpoint:
    """Reads an official SVDQuant INT4 FLUX.1 checkpoint of any generation (auto-detected).

    path: a single .safetensors file (v0.1 or v1), a two-file folder, or a folder holding exactly
        one .safetensors file.
    transformer_config: the diffusers transformer config, used for the true layer sizes when the
        checkpoint carries none (v0.1, or a two-file folder without config.json).
    strict: unknown keys under a quantized layer (e.g. `...qkv_proj.weight`) are errors.
    Raises CheckpointError for anything that does not match the format.
    """
    generation, path = _detect(Path(path))
    metadata: dict[str, str] = {}
    config = None
    quant_rank = None
    if generation is Generation.TWO_FILE:
        blocks_path, unq_path = path / TWO_FILE_BLOCKS, path / TWO_FILE_UNQUANTIZED
        if not unq_path.is_file():
            raise CheckpointError(f"two-file checkpoint without {TWO_FILE_UNQUANTIZED}", file=path)
        tensors, _ = read_safetensors(blocks_path)
        origin = dict.fromkeys(tensors, blocks_path)
        unquantized, _ = read_safetensors(unq_path)
        for key, t in unquantized.items():
            if key in tensors:
                raise CheckpointError(
                    f"key present in both {TWO_FILE_BLOCKS} and {TWO_FILE_UNQUANTIZED}", file=unq_path, key=key
                )
            tensors[key] = t
            origin[key] = unq_path
        if (path / "config.json").is_file():
            config = _load_json_file(path / "config.json")
    else:
        tensors, metadata = read_safetensors(path)
        origin = dict.fromkeys(tensors, path)
        if generation is Generation.V1:
            model_class = metadata.get("model_class")
            if model_class is not None and model_class != MODEL_CLASS:
                raise CheckpointError(
                    f"unsupported model class: expected {MODEL_CLASS!r}, found {model_class!r}",
                    file=path,
                    key="__metadata__.model_class",
                )
            config = _metadata_json(path, metadata, "config")
            qc = _metadata_json(path, metadata, "quantization_config")
            if qc is not None:
                quant_rank = _check_quant_config(path, qc)
    if config is None:
        config = transformer_config

    layers = _group_layers(tensors, origin, path, strict)
    if not layers:
        raise CheckpointError(
            "unknown checkpoint generation: no quantized layers (transformer_blocks.*.qweight or "
            "single_transformer_blocks.*.qweight) found",
            file=path,
        )
    consumed: set[str] = set()
    sizes = flux_layer_sizes(config)
    w4a4: dict[str, W4A4Weights] = {}
    w4a16: dict[str, W4A16Weights] = {}
    rank = quant_rank
    dtype = None
    for name, (kind, keys) in layers.items():
        consumed.update(keys)
        layer = LayerTensors(origin[f"{name}.qweight"], name, tensors, {})
        if kind == "w4a4":
            if rank is None:
                lora_down = layer.get("lora_down", None, FLOAT_DTYPES)
                rank = lora_down.shape[1] if lora_down.dim() == 2 else None
            # every later layer is checked against this rank (one rank per checkpoint)
            w = unpack_w4a4(
                layer, true_shape=_true_shape(sizes, name), rank=rank, act_unsigned=is_unsigned_act_layer(name)
            )
            w4a4[name] = w
            dtype = dtype or w.lora_down.dtype
        else:
            w4a16[name] = unpack_w4a16(
                layer, true_shape=_true_shape(sizes, name), adanorm_splits=adanorm_splits_for(name)
            )
            dtype = dtype or w4a16[name].wscales.dtype
    plain = {k: t for k, t in tensors.items() if k not in consumed}
    return OfficialCheckpoint(
        generation=generation,
        w4a4=w4a4,
        w4a16=w4a16,
        plain=plain,
        transformer_config=config,
        rank=rank or 0,
        dtype=dtype or torch.bfloat16,
        metadata=metadata,
    )


def _group_layers(tensors: dict[str, torch.Tensor], origin, path: Path, strict: bool):
    """layer name -> ("w4a4" | "w4a16", its keys); raises on NVFP4 and, when strict, on keys
    under a quantized layer that no format defines."""
    layers: dict[str, tuple[str, list[str]]] = {}
    for key, t in tensors.items():
        if not key.endswith(".qweight") or not key.startswith(BLOCK_PREFIXES):
            continue
        name = key[: -len(".qweight")]
        if t.dtype == torch.int8:
            layers[name] = ("w4a4", [])
        elif t.dtype == torch.int32:
            layers[name] = ("w4a16", [])
        else:
            raise mismatch(origin[key], key, None, "int8 (W4A4) or int32 (W4A16 AWQ)", t.shape, t.dtype)
    for key, t in tensors.items():
        name, _, suffix = key.rpartition(".")
        if name not in layers:
            if strict and suffix in _QUANT_ONLY_KEYS and key.startswith(BLOCK_PREFIXES):
                raise CheckpointError(
                    f"missing key {name + '.qweight'!r}: {suffix} of a quantized layer without its qweight",
                    file=origin[key],
                    key=key,
                )
            continue
        kind, keys = layers[name]
        if suffix in NVFP4_ONLY_KEYS or (suffix == "wscales" and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)):
            raise CheckpointError(
                f"{_NVFP4_MESSAGE}; found {suffix} {t.dtype}".replace("torch.", ""), file=origin[key], key=key
            )
        allowed = W4A4_KEYS if kind == "w4a4" else W4A16_KEYS
        if suffix not in allowed:
            if strict:
                raise CheckpointError(
                    f"unexpected key in {'W4A4' if kind == 'w4a4' else 'W4A16'} layer {name!r}: expected only "
                    f"{list(allowed)}",
                    file=origin[key],
                    key=key,
                )
            continue
        keys.append(key)
    return layers


# ------------------------------------------------------------------------------------------
# Writing


def _packed_layers(
    w4a4: dict[str, W4A4Weights], w4a16: dict[str, W4A16Weights], dtype: torch.dtype, smooth_orig: bool
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    ranks = {w.rank for w in w4a4.values()}
    if len(ranks) > 1:
        raise ValueError(f"official checkpoints have one rank for all layers, got {sorted(ranks)}")
    for name, w in w4a4.items():
        if not name.startswith(BLOCK_PREFIXES):
            raise ValueError(f"{name}: official checkpoints quantize only transformer block layers")
        if w.act_unsigned != is_unsigned_act_layer(name):
            raise ValueError(
                f"{name}: act_unsigned={w.act_unsigned}, but official INT4 runtimes treat "
                f"{'mlp_fc2/mlp_context_fc2 as unsigned' if is_unsigned_act_layer(name) else 'this layer as signed'}"
            )
        packed = pack_w4a4(w, dtype)
        if smooth_orig:
            packed["smooth_orig"] = packed["smooth"]
        out.update({f"{name}.{k}": v for k, v in packed.items()})
    for name, w in w4a16.items():
        if not name.startswith(BLOCK_PREFIXES):
            raise ValueError(f"{name}: official checkpoints quantize only transformer block layers")
        out.update({f"{name}.{k}": v for k, v in pack_w4a16(w, dtype, adanorm_splits_for(name)).items()})
    return out


def write_official(
    path: str | os.PathLike,
    w4a4: dict[str, W4A4Weights],
    w4a16: dict[str, W4A16Weights],
    plain: dict[str, torch.Tensor] | None = None,
    transformer_config: dict | None = None,
    *,
    generation: Generation = Generation.V1,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Writes logical weights as an official INT4 checkpoint of `generation`.

    Float tensors of quantized layers are cast to `dtype`; `plain` tensors are written as given.
    V1: one file at `path` with metadata config / quantization_config (with "rank") /
        model_class; `transformer_config` is required (the official loader builds the model from it).
    TWO_FILE: folder `path` with transformer_blocks.safetensors (everything under the blocks),
        unquantized_layers.safetensors (the rest of `plain`) and config.json when a config is given.
    V01: one file, blocks only, no metadata, no smooth_orig; `plain` must be block tensors only.
    Returns the written file or folder.
    """
    generation = Generation(generation)
    plain = dict(plain or {})
    if dtype not in FLOAT_DTYPES[:2]:
        raise ValueError(f"checkpoint dtype must be bfloat16 or float16, got {dtype}")
    layers = _packed_layers(w4a4, w4a16, dtype, smooth_orig=generation is not Generation.V01)
    clash = sorted(set(layers) & set(plain))
    if clash:
        raise ValueError(f"plain tensors collide with quantized layer keys: {clash[:5]}")
    path = Path(path)
    if generation is Generation.V1:
        if transformer_config is None:
            raise ValueError("a v1 single-file checkpoint needs the transformer config (header metadata 'config')")
        rank = next(iter(w4a4.values())).rank if w4a4 else 32
        metadata = {
            "config": json.dumps(transformer_config),
            "model_class": MODEL_CLASS,
            "quantization_config": json.dumps({**_INT4_QUANT_CONFIG, "rank": rank}),
        }
        write_safetensors(path, {**layers, **plain}, metadata)
    elif generation is Generation.TWO_FILE:
        blocks = {**layers, **{k: v for k, v in plain.items() if k.startswith(BLOCK_PREFIXES)}}
        rest = {k: v for k, v in plain.items() if not k.startswith(BLOCK_PREFIXES)}
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / TWO_FILE_BLOCKS, blocks)
        write_safetensors(path / TWO_FILE_UNQUANTIZED, rest)
        if transformer_config is not None:
            (path / "config.json").write_text(json.dumps(transformer_config, indent=2))
    else:
        outside = sorted(k for k in plain if not k.startswith(BLOCK_PREFIXES))
        if outside:
            raise ValueError(f"v0.1 checkpoints hold transformer blocks only; got {outside[:5]}")
        write_safetensors(path, {**layers, **plain})
    return path


def write_v1(
    path: str | os.PathLike,
    w4a4: dict[str, W4A4Weights],
    w4a16: dict[str, W4A16Weights],
    plain: dict[str, torch.Tensor] | None,
    transformer_config: dict,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """`write_official(..., generation=Generation.V1)`."""
    return write_official(path, w4a4, w4a16, plain, transformer_config, generation=Generation.V1, dtype=dtype)


def write_two_file(
    folder: str | os.PathLike,
    w4a4: dict[str, W4A4Weights],
    w4a16: dict[str, W4A16Weights],
    plain: dict[str, torch.Tensor] | None,
    transformer_config: dict | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """`write_official(..., generation=Generation.TWO_FILE)`."""
    return write_official(folder, w4a4, w4a16, plain, transformer_config, generation=Generation.TWO_FILE, dtype=dtype)


def write_v01(
    path: str | os.PathLike,
    w4a4: dict[str, W4A4Weights],
    w4a16: dict[str, W4A16Weights],
    plain: dict[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """`write_official(..., generation=Generation.V01)`."""
    return write_official(path, w4a4, w4a16, plain, None, generation=Generation.V01, dtype=dtype)

"""Building a quantized FLUX transformer from a checkpoint: ours (nunchaku_lite layout) or an
official SVDQuant INT4 one (v0.1 single file, two-file folder, v1 single file).

The transformer is built on the meta device, put in the nunchaku layout, its quantized modules
are created from the checkpoint's logical weights and every other parameter is assigned from the
checkpoint (or, for v0.1 files which hold the blocks only, from the BF16 base model). Nothing is
materialized twice and nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from ..formats import CheckpointError, Generation, LiteCheckpoint, OfficialCheckpoint, load_lite, read_official
from ..quant.weights import W4A4Weights, W4A16Weights, concat_w4a4_outputs
from .flux import FluxLayoutError, apply_quantized_modules, to_nunchaku_layout

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


class MissingBaseModelError(CheckpointError):
    """The checkpoint needs the BF16 base model (for its config, or, in v0.1 files, which hold
    the transformer blocks only, for the other layers) and none was given."""

# official block-level layer name -> module path in the nunchaku layout (double blocks)
_DOUBLE_LAYERS = {
    "qkv_proj": "attn.to_qkv",
    "qkv_proj_context": "attn.to_added_qkv",
    "out_proj": "attn.to_out.0",
    "out_proj_context": "attn.to_add_out",
    "mlp_fc1": "ff.net.0.proj",
    "mlp_fc2": "ff.net.2",
    "mlp_context_fc1": "ff_context.net.0.proj",
    "mlp_context_fc2": "ff_context.net.2",
    "norm1.linear": "norm1.linear",
    "norm1_context.linear": "norm1_context.linear",
}
_SINGLE_LAYERS = {"out_proj": "attn_out", "mlp_fc2": "mlp_out", "norm.linear": "norm.linear"}
_PLAIN_RENAMES = {
    "norm_q.weight": "attn.norm_q.weight",
    "norm_k.weight": "attn.norm_k.weight",
    "norm_added_q.weight": "attn.norm_added_q.weight",
    "norm_added_k.weight": "attn.norm_added_k.weight",
}
_LAYER_RE = re.compile(r"^((?:single_)?transformer_blocks\.\d+)\.(.+)$")


def _split(name: str) -> tuple[str, str]:
    m = _LAYER_RE.match(name)
    if not m:
        raise CheckpointError(f"layer {name!r} is not inside a FLUX transformer block")
    return m.group(1), m.group(2)


def official_to_layout(ckpt: OfficialCheckpoint):
    """Renames an official checkpoint's layers to the nunchaku layout.

    Single blocks: the official files quantize q/k/v (`qkv_proj`) and the MLP up-projection
    (`mlp_fc1`) separately with one shared smoothing vector; here they become the one `qkv_mlp`
    layer (concat_w4a4_outputs keeps both low-rank branches exact, rank 2r).
    Returns (w4a4, w4a16, plain) dicts keyed by module / parameter names of the layout.
    """
    w4a4: dict[str, W4A4Weights] = {}
    w4a16: dict[str, W4A16Weights] = {}
    single_parts: dict[str, dict[str, W4A4Weights]] = {}
    for name, layer in ckpt.w4a4.items():
        block, local = _split(name)
        if block.startswith("single_"):
            if local in ("qkv_proj", "mlp_fc1"):
                single_parts.setdefault(block, {})[local] = layer
                continue
            table = _SINGLE_LAYERS
        else:
            table = _DOUBLE_LAYERS
        if local not in table:
            raise CheckpointError(f"unknown W4A4 layer {local!r} in {block}", key=name)
        w4a4[f"{block}.{table[local]}"] = layer
    for block, parts in single_parts.items():
        if set(parts) != {"qkv_proj", "mlp_fc1"}:
            missing = {"qkv_proj", "mlp_fc1"} - set(parts)
            raise CheckpointError(f"single block {block} lacks {sorted(missing)}", key=f"{block}.{sorted(missing)[0]}")
        try:
            w4a4[f"{block}.qkv_mlp"] = concat_w4a4_outputs([parts["qkv_proj"], parts["mlp_fc1"]])
        except ValueError as e:
            raise CheckpointError(f"{block}: qkv_proj and mlp_fc1 cannot be fused: {e}") from None
    for name, layer in ckpt.w4a16.items():
        block, local = _split(name)
        table = _SINGLE_LAYERS if block.startswith("single_") else _DOUBLE_LAYERS
        if local not in table:
            raise CheckpointError(f"unknown W4A16 layer {local!r} in {block}", key=name)
        w4a16[f"{block}.{table[local]}"] = layer
    plain = {}
    for key, t in ckpt.plain.items():
        if key.startswith(BLOCK_PREFIXES):
            block, local = _split(key)
            key = f"{block}.{_PLAIN_RENAMES.get(local, local)}"
        plain[key] = t
    return w4a4, w4a16, plain


def layout_to_official(w4a4: dict[str, W4A4Weights], w4a16: dict[str, W4A16Weights], plain: dict[str, torch.Tensor]):
    """The inverse of official_to_layout, for exporting to the official layouts.

    A single block's `qkv_mlp` splits by rows into `qkv_proj` and `mlp_fc1`; both keep the whole
    low-rank down-projection and their rows of the up-projection, which is exact.
    Returns (w4a4, w4a16, plain) with official block-level names.
    """
    double = {v: k for k, v in _DOUBLE_LAYERS.items()}
    single = {v: k for k, v in _SINGLE_LAYERS.items()}
    renames = {v: k for k, v in _PLAIN_RENAMES.items()}
    out4, out16, out_plain = {}, {}, {}
    for name, layer in w4a4.items():
        block, local = _split(name)
        if block.startswith("single_") and local == "qkv_mlp":
            n_qkv = 3 * layer.in_features  # q, k, v each have the inner width, which is K here
            for part, rows in (("qkv_proj", slice(0, n_qkv)), ("mlp_fc1", slice(n_qkv, None))):
                out4[f"{block}.{part}"] = W4A4Weights(
                    qweight=layer.qweight[rows], wscales=layer.wscales[rows], smooth=layer.smooth,
                    lora_down=layer.lora_down, lora_up=layer.lora_up[rows], bias=layer.bias[rows],
                    act_unsigned=layer.act_unsigned, group_size=layer.group_size,
                )
            continue
        table = single if block.startswith("single_") else double
        out4[f"{block}.{table[local]}"] = layer
    for name, layer in w4a16.items():
        block, local = _split(name)
        out16[f"{block}.{(single if block.startswith('single_') else double)[local]}"] = layer
    for key, t in plain.items():
        if key.startswith(BLOCK_PREFIXES):
            block, local = _split(key)
            key = f"{block}.{renames.get(local, local)}"
        out_plain[key] = t
    return out4, out16, out_plain


def quantized_layers(transformer: FluxTransformer2DModel):
    """(w4a4, w4a16, plain) logical weights of a quantized layout transformer."""
    from ..nn import AWQW4A16Linear, SVDQW4A4Linear

    w4a4, w4a16, prefixes = {}, {}, []
    for name, module in transformer.named_modules():
        if isinstance(module, SVDQW4A4Linear):
            w4a4[name] = module.to_weights()
        elif isinstance(module, AWQW4A16Linear):
            w4a16[name] = module.to_weights()
        else:
            continue
        prefixes.append(name + ".")
    if not w4a4:
        raise FluxLayoutError("the transformer has no quantized modules: quantize it first")
    plain = {k: v for k, v in transformer.state_dict().items() if not k.startswith(tuple(prefixes))}
    return w4a4, w4a16, plain


def _is_lite(path: Path) -> bool:
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "nunchaku_lite"


def read_flux_checkpoint(path: str | os.PathLike, transformer_config: dict | None = None):
    """Reads any supported checkpoint at a local path. Returns (checkpoint object, w4a4, w4a16,
    plain, transformer_config or None), names in the nunchaku layout."""
    path = Path(path)
    if _is_lite(path):
        ckpt: LiteCheckpoint = load_lite(path)
        return ckpt, ckpt.w4a4, ckpt.w4a16, ckpt.plain, ckpt.transformer_config
    ckpt = read_official(path, transformer_config)
    w4a4, w4a16, plain = official_to_layout(ckpt)
    return ckpt, w4a4, w4a16, plain, ckpt.transformer_config or transformer_config


def _base_transformer_tensors(base_transformer_dir: Path, keys_wanted) -> dict[str, torch.Tensor]:
    """Reads only the wanted (non-block) tensors of a diffusers transformer folder."""
    from safetensors import safe_open

    files = sorted(base_transformer_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError("no .safetensors weights in the base transformer folder", file=base_transformer_dir)
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                if keys_wanted(key):
                    out[key] = h.get_tensor(key)
    return out


def build_quantized_transformer(
    checkpoint: str | os.PathLike,
    torch_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    base_transformer_dir: str | os.PathLike | None = None,
    base_config: dict | None = None,
) -> FluxTransformer2DModel:
    """A FluxTransformer2DModel in the nunchaku layout with 4-bit modules, from a local checkpoint.

    base_transformer_dir: the BF16 model's `transformer/` folder, needed for v0.1 checkpoints
    (blocks only) to supply the embedders and final layers. base_config: the diffusers config
    for checkpoints that carry none.
    """
    ckpt, w4a4, w4a16, plain, config = read_flux_checkpoint(checkpoint, base_config)
    config = config or base_config
    if config is None:
        raise MissingBaseModelError("the checkpoint carries no transformer config; pass the base model",
                                    file=checkpoint)
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    to_nunchaku_layout(transformer)
    if isinstance(ckpt, OfficialCheckpoint) and ckpt.generation is Generation.V01:
        if base_transformer_dir is None:
            raise MissingBaseModelError(
                "a v0.1 checkpoint holds the transformer blocks only: the embedders and final layers come from "
                "the BF16 base model, so pass its transformer folder (from_pretrained does this)", file=checkpoint)
        plain = {**_base_transformer_tensors(Path(base_transformer_dir), lambda k: not k.startswith(BLOCK_PREFIXES)),
                 **plain}
    try:
        apply_quantized_modules(transformer, w4a4, w4a16, torch_dtype, device)
    except FluxLayoutError as e:
        raise CheckpointError(f"checkpoint does not fit the FLUX config: {e}", file=checkpoint) from None
    expected = {k: v for k, v in transformer.state_dict(keep_vars=True).items() if v.device.type == "meta"}
    missing = sorted(set(expected) - set(plain))
    unexpected = sorted(set(plain) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"unquantized tensors do not match the model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}", file=checkpoint)
    for key, t in plain.items():
        want = tuple(expected[key].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"expected shape {list(want)}, found {list(t.shape)}", file=checkpoint, key=key)
    transformer.load_state_dict(
        {k: t.to(device=device, dtype=torch_dtype if t.is_floating_point() else t.dtype) for k, t in plain.items()},
        strict=False, assign=True,
    )
    leftover = [n for n, p in (*transformer.named_parameters(), *transformer.named_buffers()) if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"tensors left unset after loading: {leftover[:5]}", file=checkpoint)
    return transformer.eval()


def save_quantized_transformer(
    folder: str | os.PathLike, transformer: FluxTransformer2DModel, diffusers_compatible: bool = False
) -> Path:
    """Writes a quantized layout transformer as a nunchaku_lite model folder (config.json +
    diffusion_pytorch_model.safetensors)."""
    from ..formats import save_lite

    w4a4, w4a16, plain = quantized_layers(transformer)
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    dtype = next(iter(w4a4.values())).lora_up.dtype
    return save_lite(folder, config, w4a4, w4a16, plain, compute_dtype=dtype, diffusers_compatible=diffusers_compatible)

"""LoRAs on a quantized FLUX transformer, without requantization.

A LoRA's factors become extra ranks of each W4A4 layer's 16-bit low-rank branch (and a 16-bit
side branch of the W4A16 modulation layers); LoRA parts on the layers that stay 16-bit
(embedders, norm_out, proj_out) are merged into their weights in 16 bits, from a kept copy of
the original so strengths can change any number of times without drift. Several LoRAs can be
active at once, each with its own strength, and each can be unloaded.

Accepted key formats (safetensors files or state dicts):
- diffusers / PEFT: `[transformer.]<diffusers module>.lora_A.weight` [r, K] and `.lora_B.weight`
  [N, r] (also `.lora_down.weight` / `.lora_up.weight`, `.lora.down.weight` / `.lora.up.weight`);
- BFL (the original FLUX code's module names): `[diffusion_model.]double_blocks.0.img_attn.qkv.
  lora_A.weight`, `single_blocks.3.linear1...`, `final_layer.adaLN_modulation.1...`, ...;
- kohya / ComfyUI: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`
  and `.alpha` (also `lora_transformer_<diffusers module with _>` as some trainers write).
A per-module `.alpha` scales the LoRA by alpha / r, as its trainers mean it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from .models.flux import is_nunchaku_layout
from .nn.linear import LowRankAdapters


class LoRAError(ValueError):
    """A LoRA file cannot be applied to this model."""


@dataclass
class LoRAFactor:
    """One LoRA'd linear of the original diffusers FLUX: ΔW = up·downᵀ (alpha/r already folded)."""

    down: torch.Tensor  # [K, r]
    up: torch.Tensor  # [N, r]


_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)

# BFL module name (after the block index) -> diffusers module name in the original layout
_BFL_DOUBLE = {
    "img_attn.qkv": "attn.to_qkv", "txt_attn.qkv": "attn.to_added_qkv",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
}
_BFL_SINGLE = {"linear1": "qkv_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear"}
_BFL_GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
}
# kohya writes the BFL module name with its dots as underscores
_KOHYA_GLOBAL = {name.replace(".", "_"): name for name in _BFL_GLOBAL}
_KOHYA_BFL = re.compile(
    r"^(?:double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)"
    r"|single_blocks_(\d+)_(linear1|linear2|modulation_lin)"
    r"|(img_in|txt_in|final_layer_linear|final_layer_adaLN_modulation_1"
    r"|(?:time_in|vector_in|guidance_in)_(?:in_layer|out_layer)))$"
)


def _bfl_to_diffusers(name: str) -> str | None:
    m = re.match(r"^double_blocks\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _BFL_DOUBLE:
        return f"transformer_blocks.{m.group(1)}.{_BFL_DOUBLE[m.group(2)]}"
    m = re.match(r"^single_blocks\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _BFL_SINGLE:
        return f"single_transformer_blocks.{m.group(1)}.{_BFL_SINGLE[m.group(2)]}"
    return _BFL_GLOBAL.get(name)


def _kohya_to_bfl(stem: str) -> str | None:
    m = _KOHYA_BFL.match(stem)
    if not m:
        return None
    if m.group(1) is not None:
        part = {"attn_qkv": "attn.qkv", "attn_proj": "attn.proj", "mlp_0": "mlp.0", "mlp_2": "mlp.2",
                "mod_lin": "mod.lin"}[m.group(3)]
        return f"double_blocks.{m.group(1)}.{m.group(2)}_{part}"
    if m.group(4) is not None:
        return f"single_blocks.{m.group(4)}.{m.group(5).replace('modulation_lin', 'modulation.lin')}"
    return _KOHYA_GLOBAL[m.group(6)]


def _original_linear_names(config: Mapping) -> frozenset[str]:
    """The nn.Linear module names of the original diffusers FLUX (built on the meta device)."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    return _linear_names_for(json.dumps(cfg, sort_keys=True, default=list))


@functools.lru_cache(maxsize=8)
def _linear_names_for(config_json: str) -> frozenset[str]:
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(json.loads(config_json))
    return frozenset(n for n, m in model.named_modules() if isinstance(m, nn.Linear))


def parse_lora(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, LoRAFactor]:
    """Any supported key format -> {module name: factor}; module names are diffusers names in the
    original layout, or fused names (`attn.to_qkv`, `attn.to_added_qkv`, `qkv_mlp`) for the BFL
    layers that are fused already. Raises LoRAError naming unknown or incomplete keys."""
    known = _original_linear_names(config)
    kohya_diffusers = {n.replace(".", "_"): n for n in known}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in state_dict.items():
        stem = part = None
        for down_sfx, up_sfx in _SUFFIXES:
            if key.endswith(down_sfx):
                stem, part = key[: -len(down_sfx)], "down"
            elif key.endswith(up_sfx):
                stem, part = key[: -len(up_sfx)], "up"
        if stem is None and key.endswith(".alpha"):
            stem, part = key[: -len(".alpha")], "alpha"
        if stem is None:
            unknown.append(key)
            continue
        pairs.setdefault(stem, {})[part] = t
    factors: dict[str, LoRAFactor] = {}
    for stem, parts in pairs.items():
        name = None
        if stem.startswith(("lora_te", "text_encoder")):
            raise LoRAError(f"text-encoder LoRA keys are not supported (only the transformer): {stem!r}")
        if stem.startswith("lora_unet_"):
            bfl = _kohya_to_bfl(stem[len("lora_unet_"):])
            name = _bfl_to_diffusers(bfl) if bfl else None
        elif stem.startswith("lora_transformer_"):
            name = kohya_diffusers.get(stem[len("lora_transformer_"):])
        else:
            plain = stem.removeprefix("transformer.").removeprefix("diffusion_model.")
            name = plain if plain in known else _bfl_to_diffusers(plain)
        if name is None:
            unknown.append(stem)
            continue
        if "down" not in parts or "up" not in parts:
            raise LoRAError(f"LoRA module {stem!r} lacks its {'up' if 'down' in parts else 'down'} matrix")
        down, up = parts["down"].float(), parts["up"].float()
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise LoRAError(f"LoRA module {stem!r}: down {list(down.shape)} and up {list(up.shape)} are not "
                            "[r, K] and [N, r]")
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        factors[name] = LoRAFactor(down=down.T.contiguous(), up=up * scale)
    if unknown:
        raise LoRAError(f"LoRA keys that match no FLUX transformer module: {sorted(unknown)[:6]}"
                        f"{' ...' if len(unknown) > 6 else ''} (is this a LoRA for another model?)")
    if not factors:
        raise LoRAError("the LoRA holds no module weights")
    return factors


@dataclass
class _Placement:
    module: str  # module name in the nunchaku layout
    rows: slice | None  # output rows of that module the factor writes
    cols: slice | None  # input columns of that module the factor reads


def _placements(name: str, transformer: FluxTransformer2DModel) -> list[tuple[_Placement, slice | None]]:
    """Where an original-layout LoRA module lands in the nunchaku layout: (placement, slice of
    the factor's own input rows it takes)."""
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    m = re.match(r"^(transformer_blocks\.\d+)\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)$", name)
    if m:
        fused = "attn.to_qkv" if m.group(2).startswith("to_") else "attn.to_added_qkv"
        i = "qkv".index(m.group(2)[-1] if m.group(2).startswith("to_") else m.group(2)[4])
        return [(_Placement(f"{m.group(1)}.{fused}", slice(i * inner, (i + 1) * inner), None), None)]
    m = re.match(r"^(single_transformer_blocks\.\d+)\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)$", name)
    if m:
        block, local = m.groups()
        if local == "proj_out":
            return [(_Placement(f"{block}.attn_out", None, None), slice(0, inner)),
                    (_Placement(f"{block}.mlp_out", None, None), slice(inner, None))]
        if local == "proj_mlp":
            return [(_Placement(f"{block}.qkv_mlp", slice(3 * inner, None), None), None)]
        i = "qkv".index(local[-1])
        return [(_Placement(f"{block}.qkv_mlp", slice(i * inner, (i + 1) * inner), None), None)]
    return [(_Placement(name, None, None), None)]


def _state(transformer) -> dict:
    if not hasattr(transformer, "_nunchaku_loras"):
        transformer._nunchaku_loras = {"strengths": {}, "merged": {}}
    return transformer._nunchaku_loras


def load_lora(
    transformer: FluxTransformer2DModel,
    lora: str | os.PathLike | Mapping[str, torch.Tensor],
    adapter_name: str,
    strength: float = 1.0,
) -> None:
    """Adds a LoRA (file path or state dict) to a nunchaku-layout transformer: extra ranks on its
    4-bit modules, a 16-bit merge on its nn.Linear ones (all of them, for a BF16 transformer put
    in the layout with to_nunchaku_layout)."""
    if not is_nunchaku_layout(transformer):
        raise LoRAError("load_lora needs a transformer in the nunchaku layout (nunchaku.models.flux."
                        "to_nunchaku_layout, or a quantized one); for plain diffusers models use diffusers' LoRA API")
    if not re.fullmatch(r"[A-Za-z0-9_]+", adapter_name):
        raise LoRAError(f"adapter name must be letters, digits and underscores, got {adapter_name!r}")
    state = _state(transformer)
    if adapter_name in state["strengths"]:
        raise LoRAError(f"a LoRA named {adapter_name!r} is loaded already; unload it first")
    if not isinstance(lora, Mapping):
        from .formats.safetensors_io import read_safetensors

        lora, _ = read_safetensors(Path(lora))
    # One host-to-device copy of the file's tensors; every later step runs where the model is.
    device = next(transformer.parameters()).device
    lora = {k: v.to(device, non_blocking=True) for k, v in lora.items()}
    factors = parse_lora(lora, transformer.config)

    per_module: dict[str, list[tuple[_Placement, torch.Tensor, torch.Tensor]]] = {}
    for name, f in factors.items():
        for place, k_slice in _placements(name, transformer):
            down = f.down if k_slice is None else f.down[k_slice]
            per_module.setdefault(place.module, []).append((place, down, f.up))
    plans = []
    for module_name, parts in per_module.items():
        try:
            module = transformer.get_submodule(module_name)
        except AttributeError:
            raise LoRAError(f"LoRA targets {module_name!r}, which this FLUX model does not have") from None
        n, k = module.out_features, module.in_features
        downs, ups = [], []
        for place, down, up in parts:
            rows = place.rows or slice(0, n)
            want_n = len(range(n)[rows])
            if down.shape[0] != k or up.shape[0] != want_n:
                raise LoRAError(
                    f"LoRA for {module_name} is [N={up.shape[0]}, K={down.shape[0]}], the model expects "
                    f"[N={want_n}, K={k}] (is this a LoRA for another model?)"
                )
            full_up = torch.zeros(n, up.shape[1], device=up.device)
            full_up[rows] = up
            downs.append(down)
            ups.append(full_up)
        plans.append((module_name, module, torch.cat(downs, 1), torch.cat(ups, 1)))
    # Validate everything before touching the model, so a bad LoRA leaves it unchanged.
    for module_name, module, down, up in plans:
        if isinstance(module, LowRankAdapters):
            module.set_adapter(adapter_name, down, up, strength)
        elif isinstance(module, nn.Linear):
            merged = state["merged"].setdefault(module_name, {"orig": module.weight.detach().clone(), "adapters": {}})
            merged["adapters"][adapter_name] = (down.to(module.weight.device), up.to(module.weight.device))
        else:
            raise LoRAError(f"cannot apply a LoRA to {module_name} ({type(module).__name__})")
    state["strengths"][adapter_name] = float(strength)
    _remerge(transformer)


def _remerge(transformer) -> None:
    state = _state(transformer)
    for module_name, merged in state["merged"].items():
        module = transformer.get_submodule(module_name)
        active = [(n, f) for n, f in merged["adapters"].items() if state["strengths"][n] != 0.0]
        with torch.no_grad():
            if not active:
                module.weight.copy_(merged["orig"])
                continue
            # One float32 GEMM for all adapters, added to the original and rounded once.
            down = torch.cat([f[0].float() for _, f in active], dim=1)
            up = torch.cat([f[1].float() * state["strengths"][n] for n, f in active], dim=1)
            module.weight.copy_(torch.addmm(merged["orig"].float(), up, down.T))


def set_lora_strength(transformer, adapter_name: str, strength: float) -> None:
    state = _state(transformer)
    if adapter_name not in state["strengths"]:
        raise LoRAError(f"no LoRA named {adapter_name!r} is loaded (have {sorted(state['strengths'])})")
    state["strengths"][adapter_name] = float(strength)
    for _, m in transformer.named_modules():
        if isinstance(m, LowRankAdapters) and adapter_name in m.adapter_names:
            m.set_adapter_strength(adapter_name, strength)
    _remerge(transformer)


def unload_lora(transformer, adapter_name: str) -> None:
    state = _state(transformer)
    if adapter_name not in state["strengths"]:
        raise LoRAError(f"no LoRA named {adapter_name!r} is loaded (have {sorted(state['strengths'])})")
    for _, m in transformer.named_modules():
        if isinstance(m, LowRankAdapters) and adapter_name in m.adapter_names:
            m.remove_adapter(adapter_name)
    for merged in state["merged"].values():
        merged["adapters"].pop(adapter_name, None)
    del state["strengths"][adapter_name]
    _remerge(transformer)
    state["merged"] = {k: v for k, v in state["merged"].items() if v["adapters"]}


def loaded_loras(transformer) -> dict[str, float]:
    return dict(_state(transformer)["strengths"])

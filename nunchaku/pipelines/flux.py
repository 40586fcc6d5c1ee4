"""Text-to-image FLUX.1 pipelines on the engine, with the diffusers API.

    from nunchaku.pipelines import flux as nunchaku_flux
    pipeline = nunchaku_flux.from_pretrained(
        "black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16,
        qmodel_path="mit-han-lab/svdquant-models/svdq-int4-flux.1-schnell.safetensors",
    ).to("cuda")
    image = pipeline("A cat holding a sign that says hello world", num_inference_steps=4, guidance_scale=0).images[0]

`qmodel_path` may be a local file, a local folder, or a Hub path "org/repo/file.safetensors"
(downloaded through huggingface_hub); it can be one of our nunchaku_lite checkpoints or an
official SVDQuant INT4 one of any generation. Without it the pipeline is the BF16 original, and
`with_transformer` builds the other variant around the same text encoders and VAE, for
side-by-side comparison without loading them twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import PIL.Image
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor

from ..formats import resolve_checkpoint
from ..models.flux_loading import BLOCK_PREFIXES, build_quantized_transformer


class DevicePilImageProcessor(VaeImageProcessor):
    """diffusers' VaeImageProcessor whose conversion to PIL images rounds to 8-bit pixels where the
    image is (the GPU), so a 1024x1024 image crosses to the host as 3 MB of uint8 instead of 12 MB
    of float32 and the CPU does no per-pixel arithmetic (benchmarks/vae_decode.py times both on
    the H100 machine). The same operations in the same dtypes as diffusers', so the same
    pixels; every other output type is diffusers' own."""

    def postprocess(self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None):
        if output_type != "pil" or not isinstance(image, torch.Tensor):
            return super().postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        if do_denormalize is None:
            image = self.denormalize(image) if self.config.do_normalize else image
        else:
            image = torch.stack([self.denormalize(image[i]) if do_denormalize[i] else image[i]
                                 for i in range(image.shape[0])])
        # Channels last before the copy: PIL would otherwise transpose a strided array on the CPU.
        pixels = (image.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        if pixels.shape[-1] == 1:
            return [PIL.Image.fromarray(p.squeeze(), mode="L") for p in pixels]
        return [PIL.Image.fromarray(p) for p in pixels]


def use_device_pil_images(pipeline) -> DevicePilImageProcessor:
    """Gives a diffusers FLUX pipeline (text-to-image or img2img) a DevicePilImageProcessor with its
    own processor's config, unless it has one already; returns it. (Not in __init__: diffusers
    reads a pipeline's expected components off __init__'s signature, which an override would
    have to copy.)"""
    if not isinstance(pipeline.image_processor, DevicePilImageProcessor):
        pipeline.image_processor = DevicePilImageProcessor.from_config(pipeline.image_processor.config)
    return pipeline.image_processor


class NunchakuFluxPipeline(FluxPipeline):
    """diffusers' FluxPipeline with input checks that fail early and clearly (diffusers would
    silently resize a height/width that is not a multiple of 16 and encode an empty prompt), and
    its PIL images made on the GPU (DevicePilImageProcessor)."""

    def check_inputs(self, prompt, prompt_2, height, width, *args, prompt_embeds=None, **kwargs):
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} pixels (the VAE downsamples by "
                f"{self.vae_scale_factor} and the transformer packs 2x2 latents), got {height}x{width}"
            )
        if prompt_embeds is None and prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise ValueError("prompt is empty: give a text prompt (or prompt_embeds)")
        return super().check_inputs(prompt, prompt_2, height, width, *args, prompt_embeds=prompt_embeds, **kwargs)

    def __call__(self, *args, max_sequence_length: int | None = None, **kwargs):
        # diffusers pads T5 prompts to 512 tokens; a model whose tokenizer is shorter (the tiny and
        # demo models) never saw that many, so default to what the tokenizer holds.
        if max_sequence_length is None:
            max_sequence_length = min(512, getattr(self.tokenizer_2, "model_max_length", 512))
        use_device_pil_images(self)
        return super().__call__(*args, max_sequence_length=max_sequence_length, **kwargs)

    # diffusers' LoRA API; on a quantized transformer the LoRA becomes extra low-rank ranks
    # (nunchaku.lora), on a BF16 one diffusers' own (PEFT) loading runs.

    def _quantized(self) -> bool:
        from ..models.flux import is_nunchaku_layout

        return is_nunchaku_layout(self.transformer)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        if not self._quantized():
            return super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name,
                                             **kwargs)
        from .. import lora

        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
            source = resolve_checkpoint(source)
        name = adapter_name or f"default_{len(lora.loaded_loras(self.transformer))}"
        lora.load_lora(self.transformer, source, name, kwargs.get("strength", 1.0))

    def set_adapters(self, adapter_names, adapter_weights=None):
        if not self._quantized():
            return super().set_adapters(adapter_names, adapter_weights)
        from .. import lora

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        active = set(names)
        for name in lora.loaded_loras(self.transformer):
            if name not in active:
                lora.set_lora_strength(self.transformer, name, 0.0)  # diffusers: unlisted adapters are off
        for name, w in zip(names, weights):
            lora.set_lora_strength(self.transformer, name, 1.0 if w is None else float(w))

    def delete_adapters(self, adapter_names):
        if not self._quantized():
            return super().delete_adapters(adapter_names)
        from .. import lora

        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            lora.unload_lora(self.transformer, name)

    def unload_lora_weights(self, *args, **kwargs):
        if not self._quantized():
            return super().unload_lora_weights(*args, **kwargs)
        from .. import lora

        for name in list(lora.loaded_loras(self.transformer)):
            lora.unload_lora(self.transformer, name)


def _transformer_config(model: str | os.PathLike, **hub_kwargs) -> dict:
    return dict(FluxTransformer2DModel.load_config(str(model), subfolder="transformer", **hub_kwargs))


def _base_transformer_dir(model: str | os.PathLike, **hub_kwargs) -> Path:
    """The base model's transformer folder, downloading from the Hub only the shards that hold
    tensors outside the transformer blocks (the embedders and final layers a v0.1 file lacks)."""
    local = Path(model) / "transformer"
    if local.is_dir():
        return local
    from huggingface_hub import hf_hub_download

    index_name = "transformer/diffusion_pytorch_model.safetensors.index.json"
    index_path = Path(hf_hub_download(str(model), index_name, **hub_kwargs))
    weight_map = json.loads(index_path.read_text())["weight_map"]
    shards = sorted({f for k, f in weight_map.items() if not k.startswith(BLOCK_PREFIXES)})
    for shard in shards:
        hf_hub_download(str(model), f"transformer/{shard}", **hub_kwargs)
    folder = index_path.parent
    return folder


def load_transformer(
    pretrained_model_name_or_path: str | os.PathLike | None,
    qmodel_path: str | os.PathLike,
    torch_dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    **hub_kwargs,
) -> FluxTransformer2DModel:
    """The 4-bit transformer alone, from a checkpoint (see the module docstring for paths).

    The base model may be None for checkpoints that carry their own config; one that needs it
    (no config, or a v0.1 file of transformer blocks only) then raises MissingBaseModelError."""
    checkpoint = resolve_checkpoint(qmodel_path)
    base_config = None
    if pretrained_model_name_or_path is not None:
        try:
            base_config = _transformer_config(pretrained_model_name_or_path, **hub_kwargs)
        except (OSError, ValueError, EnvironmentError):
            base_config = None  # a checkpoint with its own config does not need it
    base_dir = None
    if pretrained_model_name_or_path is not None and checkpoint.is_file() and _is_blocks_only(checkpoint):
        base_dir = _base_transformer_dir(pretrained_model_name_or_path, **hub_kwargs)
    return build_quantized_transformer(checkpoint, torch_dtype, device, base_dir, base_config)


def _is_blocks_only(path: Path) -> bool:
    from ..formats import inspect_safetensors

    header = inspect_safetensors(path)
    return not header.metadata.get("config") and all(k.startswith(BLOCK_PREFIXES) for k in header.tensors)


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    torch_dtype: torch.dtype = torch.bfloat16,
    qmodel_path: str | os.PathLike | None = None,
    qencoder_path: str | os.PathLike | None = None,
    **kwargs,
) -> NunchakuFluxPipeline:
    """A diffusers FluxPipeline (NunchakuFluxPipeline) whose transformer runs in 4 bits when
    qmodel_path is given, BF16 otherwise; with qencoder_path the T5 text encoder is a W4A16 one
    (see nunchaku.models.text_encoders, `nunchaku quantize-t5`). Other kwargs go to diffusers'
    from_pretrained."""
    if qmodel_path is not None:
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        kwargs["transformer"] = load_transformer(pretrained_model_name_or_path, qmodel_path, torch_dtype, **hub_kwargs)
    if qencoder_path is not None:
        from ..models.text_encoders import load_quantized_t5

        kwargs["text_encoder_2"] = load_quantized_t5(resolve_checkpoint(qencoder_path), torch_dtype=torch_dtype)
    return NunchakuFluxPipeline.from_pretrained(pretrained_model_name_or_path, torch_dtype=torch_dtype, **kwargs)


def with_transformer(pipeline: FluxPipeline, transformer: FluxTransformer2DModel) -> NunchakuFluxPipeline:
    """Another pipeline sharing `pipeline`'s text encoders, tokenizers, VAE and scheduler config
    (no copies), with the given transformer: e.g. a BF16 one next to a 4-bit one."""
    components = {**pipeline.components, "transformer": transformer}
    components["scheduler"] = pipeline.scheduler.__class__.from_config(pipeline.scheduler.config)
    return NunchakuFluxPipeline(**components)

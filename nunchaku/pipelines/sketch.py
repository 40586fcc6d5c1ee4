"""Sketch-to-image, two ways (SketchMode):

ONE_STEP_LORA (FLUX.1-schnell with a sketch LoRA, pix2pix-turbo style): the sketch is binarized
(dark strokes -> 1), mapped to [-1, 1] and VAE-encoded; its latent is mixed with Gaussian noise by
the sketch guidance g (z = g·z_sketch + (1 − g)·noise); the transformer, with the sketch LoRA, is
called once at t = 1 and predicts the flow velocity v; the image latent is z − v (the
flow-matching step from t = 1 to 0), which the VAE decodes. g = 1 follows the sketch closely,
g = 0 ignores it.

SDEDIT (any text-to-image FLUX model without a sketch LoRA, e.g. the embedded demo model): the
sketch, colors included, is the starting image of diffusers' FluxImg2ImgPipeline with strength
1 − g: it is noised to t = 1 − g and denoised from there with the prompt, so the result keeps the
sketch's layout and colors where g is high and redraws them where g is low. Several transformer
calls instead of one.
"""

from __future__ import annotations

import enum
import os

import numpy as np
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline
from PIL import Image

from ..models.flux import to_nunchaku_layout
from .flux import use_device_pil_images


def sketch_on_white(sketch: Image.Image) -> Image.Image:
    """RGB, with transparent pixels (an empty sketchpad layer) white."""
    if sketch.mode in ("RGBA", "LA", "P"):
        background = Image.new("RGBA", sketch.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, sketch.convert("RGBA")).convert("RGB")
    return sketch.convert("RGB")


def binarize_sketch(sketch: Image.Image, threshold: float = 0.5) -> torch.Tensor:
    """PIL image -> float [1, 3, H, W] in {-1, 1}: 1 where the sketch is darker than the
    threshold (the strokes), -1 on the background. Transparent pixels count as background."""
    gray = np.asarray(sketch_on_white(sketch).convert("L"), dtype=np.float32) / 255.0
    strokes = torch.from_numpy(gray < threshold).float()
    return (strokes * 2 - 1)[None, None].expand(1, 3, *strokes.shape).contiguous()


class SketchMode(str, enum.Enum):
    ONE_STEP_LORA = "one-step-lora"
    SDEDIT = "sdedit"


class SketchToImagePipeline:
    """Wraps a FluxPipeline: one-step generation through its sketch LoRA, or SDEdit (see the module
    docstring)."""

    def __init__(self, flux: FluxPipeline, threshold: float = 0.5, mode: SketchMode = SketchMode.ONE_STEP_LORA):
        self.flux = flux
        self.threshold = threshold
        self.mode = SketchMode(mode)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        lora_path: str | os.PathLike | None,
        torch_dtype: torch.dtype = torch.bfloat16,
        qmodel_path: str | os.PathLike | None = None,
        qencoder_path: str | os.PathLike | None = None,
        lora_strength: float = 1.0,
        **kwargs,
    ) -> SketchToImagePipeline:
        """FLUX.1-schnell (4-bit with qmodel_path) plus the sketch LoRA at lora_path."""
        from .. import lora as lora_mod
        from . import flux as nunchaku_flux

        pipe = nunchaku_flux.from_pretrained(pretrained_model_name_or_path, torch_dtype=torch_dtype,
                                             qmodel_path=qmodel_path, qencoder_path=qencoder_path, **kwargs)
        if lora_path is None:
            return cls(pipe, mode=SketchMode.SDEDIT)
        to_nunchaku_layout(pipe.transformer)  # a BF16 transformer gets the LoRA merged in 16 bits
        lora_mod.load_lora(pipe.transformer, lora_path, "sketch", lora_strength)
        return cls(pipe)

    def to(self, *args, **kwargs) -> SketchToImagePipeline:
        self.flux.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(
        self,
        sketch: Image.Image,
        prompt: str,
        sketch_guidance: float = 0.4,
        generator: torch.Generator | None = None,
        max_sequence_length: int | None = None,
        num_inference_steps: int = 20,
        true_cfg_scale: float = 1.0,
    ) -> Image.Image:
        """num_inference_steps and true_cfg_scale apply to SDEDIT (the one-step LoRA mode makes one
        call and has no CFG); max_sequence_length defaults to what the T5 tokenizer holds."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty: describe what the sketch should become")
        if not 0.0 <= sketch_guidance <= 1.0:
            raise ValueError(f"sketch_guidance must be in [0, 1], got {sketch_guidance}")
        pipe = self.flux
        width, height = sketch.size
        multiple = pipe.vae_scale_factor * 2
        if width % multiple or height % multiple:
            raise ValueError(f"sketch size must be a multiple of {multiple} pixels, got {width}x{height}")
        if max_sequence_length is None:
            max_sequence_length = min(256, getattr(pipe.tokenizer_2, "model_max_length", 256))
        if self.mode is SketchMode.SDEDIT:
            return self._sdedit(sketch, prompt, sketch_guidance, generator, max_sequence_length,
                                num_inference_steps, true_cfg_scale)
        device = pipe._execution_device
        vae = pipe.vae
        x = binarize_sketch(sketch, self.threshold).to(device, vae.dtype)
        z = vae.encode(x).latent_dist.mode()
        z = (z - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=generator, device="cpu" if generator is None else generator.device,
                            dtype=torch.float32).to(device, z.dtype)
        z_t = sketch_guidance * z + (1.0 - sketch_guidance) * noise

        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        b, c, h, w = z_t.shape
        packed = pipe._pack_latents(z_t, b, c, h, w)
        image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, z_t.dtype)
        transformer = pipe.transformer
        guidance = (torch.full((b,), 3.5, device=device, dtype=torch.float32)
                    if transformer.config.guidance_embeds else None)
        velocity = transformer(
            hidden_states=packed.to(transformer.dtype), timestep=torch.ones(b, device=device, dtype=z_t.dtype),
            guidance=guidance, pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]
        latent = pipe._unpack_latents(packed - velocity.to(packed.dtype), height, width, pipe.vae_scale_factor)
        latent = latent / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latent.to(vae.dtype), return_dict=False)[0]
        return use_device_pil_images(pipe).postprocess(image, output_type="pil")[0]

    def _sdedit(self, sketch: Image.Image, prompt: str, sketch_guidance: float, generator, max_sequence_length: int,
                steps: int, true_cfg_scale: float) -> Image.Image:
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
        img2img = FluxImg2ImgPipeline(**self.flux.components)
        use_device_pil_images(img2img)
        img2img.set_progress_bar_config(disable=True)
        width, height = sketch.size
        # At least one denoising step: strength below 1/steps would run none and return the sketch.
        strength = max(1.0 - sketch_guidance, 1.0 / steps)
        extra = {"true_cfg_scale": true_cfg_scale, "negative_prompt": ""} if true_cfg_scale > 1 else {}
        return img2img(prompt=prompt, image=sketch_on_white(sketch), strength=strength, num_inference_steps=steps,
                       guidance_scale=0.0, height=height, width=width, generator=generator,
                       max_sequence_length=max_sequence_length, **extra).images[0]

"""Shared pieces of the FLUX tests (a plain module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

from nunchaku.models.flux import quant_plan, quantize_transformer_in_place, to_nunchaku_layout
from nunchaku.quant.calibration import CalibrationCollector
from nunchaku.quant.quantizer import QuantizerOptions, quantize_model
from nunchaku.quant.svdquant import DecomposeOptions

GEN = dict(num_inference_steps=2, guidance_scale=0.0, height=64, width=64, max_sequence_length=32)
PROMPTS = ["a red circle above a blue square", "two green stars on a yellow background", "a cat holding a sign"]


def transformer_inputs(batch=1, height=64, width=64, text=32, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (height // 16) * (width // 16)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(height // 16.0), torch.arange(width // 16.0),
                                     indexing="ij"), -1).reshape(-1, 3)
    return dict(
        hidden_states=torch.randn(batch, s, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text, 64, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, 64, generator=g).to(dtype),
        timestep=torch.full((batch,), 0.6), img_ids=ids, txt_ids=torch.zeros(text, 3), return_dict=False,
    )


def quantize_pipeline(pipe, options=QuantizerOptions(decompose=DecomposeOptions(rank=32))):
    """Calibrates on a few prompts, quantizes in place; returns the per-layer reports."""
    transformer = to_nunchaku_layout(pipe.transformer)
    plan = quant_plan(transformer)
    with CalibrationCollector(transformer, plan.calibration_targets(), max_samples=128) as calib:
        pipe(PROMPTS, **GEN)
    result = quantize_model(transformer, plan, calib.stats(), options, progress=False)
    quantize_transformer_in_place(transformer, result)
    return result.reports


def with_outlier_channels(pipe, channels=4, factor=20.0):
    """Diffusion transformers carry a few residual-stream channels far larger than the rest
    (the SVDQuant paper's motivation); random weights do not, so plant some."""
    with torch.no_grad():
        for lin in (pipe.transformer.x_embedder, pipe.transformer.context_embedder):
            lin.weight[:channels] *= factor
            lin.bias[:channels] *= factor
    return pipe




def random_lora_file(transformer, path, rank: int, scale: float, prefix: str = "transformer_blocks", seed: int = 0):
    """A random PEFT-format LoRA on the linears under `prefix`, saved to `path`."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(prefix):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * scale
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * scale
    save_file(lora, str(path))
    return path


def save_tiny_flux_with_lora(root, lora_name: str, lora_rank: int, lora_scale: float):
    """root/base: a tiny BF16 FLUX pipeline; root/<lora_name>: a random LoRA for it; root/int4: its
    SVDQuant INT4 transformer. Returns root."""
    from nunchaku.models.flux_loading import save_quantized_transformer
    from nunchaku.models.tiny import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(torch_dtype=torch.bfloat16)
    pipe.save_pretrained(root / "base")
    random_lora_file(pipe.transformer, root / lora_name, rank=lora_rank, scale=lora_scale)
    quantize_pipeline(pipe)
    save_quantized_transformer(root / "int4", pipe.transformer)
    return root

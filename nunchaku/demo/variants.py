"""The demo model in several precisions, quantized by our own quantizer: what the INT4 checkpoint in
assets/demo/svdq-int4 is made with (`scripts/quantize_demo_model.py`) and what
`benchmarks/quality_demo.py` compares.

    SVDQUANT_INT4  the engine's method: smoothing searched per layer, rank-32 16-bit branch, W4A4
    SVDQUANT_POW2  the same quantized model with the pow2 activation format on its signed layers
                   (nunchaku.ops.Sm90Activations.POW2: what the Hopper kernels can run instead of
                   4-bit activations; the post-GELU layers keep int4)
    SVDQUANT_POW2_SIGNED  quantized with the post-GELU inputs signed (quant_plan(unsigned_fc2=False)),
                   so every layer runs pow2
    NAIVE_W4A4     round-to-nearest W4A4 with the same group size: no smoothing, no branch
    W4A16          every linear of the blocks in 4-bit weights, 16-bit activations (AWQ-style, g64)
    BF16           the trained model itself

Calibration draws captions of the training split (never a held-out one) and runs the sampler as
the demo samples, the unconditional branch of true CFG included, so the statistics cover both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.flux import quant_plan, quantize_transformer_in_place, quantized_module_specs, to_nunchaku_layout
from ..nn.linear import AWQW4A16Linear, set_sm90_activations
from ..ops import Sm90Activations
from ..nn.utils import set_submodule
from ..quant.calibration import CalibrationCollector
from ..quant.quantizer import LayerReport, QuantizerOptions, QuantPlan, W4A16Target, quantize_model
from ..quant.svdquant import DecomposeOptions
from .scenes import caption, scene_at


class DemoVariant(str, enum.Enum):
    BF16 = "bf16"
    SVDQUANT_INT4 = "svdquant-int4"
    SVDQUANT_POW2 = "svdquant-pow2"
    SVDQUANT_POW2_SIGNED = "svdquant-pow2-signed"
    NAIVE_W4A4 = "naive-w4a4"
    W4A16 = "w4a16"


@dataclass(frozen=True)
class DemoSampling:
    """How the demo model is sampled by default (the app, the benchmark, the calibration)."""

    steps: int = 20
    true_cfg_scale: float = 3.0  # diffusers' true CFG with the empty prompt as negative; 1 = off
    size: int = 128

    def pipeline_kwargs(self, batch: int) -> dict:
        kwargs = dict(num_inference_steps=self.steps, guidance_scale=0.0, height=self.size, width=self.size)
        if self.true_cfg_scale > 1:
            kwargs.update(true_cfg_scale=self.true_cfg_scale, negative_prompt=[""] * batch)
        return kwargs


POW2_VARIANTS = (DemoVariant.SVDQUANT_POW2, DemoVariant.SVDQUANT_POW2_SIGNED)

DEMO_SAMPLING = DemoSampling()
CALIBRATION_SEED = 1  # scenes of this seed; training used seed 0's, held-out captions are excluded either way


def calibration_prompts(n: int, seed: int = CALIBRATION_SEED) -> list[str]:
    return [caption(scene_at(seed, i, "train")) for i in range(n)]


def _plan_and_options(transformer, variant: DemoVariant, rank: int) -> tuple[QuantPlan, QuantizerOptions]:
    if variant in (DemoVariant.SVDQUANT_INT4, DemoVariant.SVDQUANT_POW2):
        return quant_plan(transformer), QuantizerOptions(decompose=DecomposeOptions(rank=rank))
    if variant is DemoVariant.SVDQUANT_POW2_SIGNED:
        return quant_plan(transformer, unsigned_fc2=False), QuantizerOptions(decompose=DecomposeOptions(rank=rank))
    if variant is DemoVariant.NAIVE_W4A4:
        return quant_plan(transformer), QuantizerOptions(decompose=DecomposeOptions(rank=0), smoothing=False)
    if variant is DemoVariant.W4A16:
        targets = tuple(W4A16Target(s.name, 64, s.block) for s in quantized_module_specs(transformer))
        return QuantPlan(w4a16=targets), QuantizerOptions()
    raise ValueError(f"{variant.value} is not a quantized variant")


def quantize_demo_transformer(
    pipe,
    variant: DemoVariant,
    prompts: Sequence[str],
    sampling: DemoSampling = DEMO_SAMPLING,
    rank: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[LayerReport]:
    """Calibrates `pipe` (a demo FluxPipeline, BF16) on `prompts` and swaps its transformer's
    linears for `variant`'s modules in place. Returns the per-layer error reports."""
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    transformer = to_nunchaku_layout(pipe.transformer)
    plan, options = _plan_and_options(transformer, variant, rank)
    device = next(transformer.parameters()).device
    with CalibrationCollector(transformer, plan.calibration_targets(), max_samples=512, seed=seed) as calib:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start:start + batch_size])
            pipe(batch, output_type="latent", generator=torch.Generator(device).manual_seed(seed + start),
                 **sampling.pipeline_kwargs(len(batch)))
    result = quantize_model(transformer, plan, calib.stats(), options, progress=progress)
    if variant is DemoVariant.W4A16:
        # apply_quantized_modules enforces the engine's W4A4/W4A16 split; this variant deliberately
        # puts every linear in W4A16.
        dtype = next(transformer.parameters()).dtype
        for name, weights in result.w4a16.items():
            set_submodule(transformer, name, AWQW4A16Linear.from_weights(weights.to(device=device), dtype=dtype))
    else:
        quantize_transformer_in_place(transformer, result)
        set_variant_activations(transformer, variant)
    return result.reports


def set_variant_activations(transformer, variant: DemoVariant) -> None:
    """The activation format `variant` stands for, set on every W4A4 layer explicitly (they take
    NUNCHAKU_SM90_ACTIVATIONS's when created)."""
    pow2 = variant in POW2_VARIANTS
    set_sm90_activations(transformer, Sm90Activations.POW2 if pow2 else Sm90Activations.INT4)

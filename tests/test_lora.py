"""LoRAs on the quantized FLUX transformer: extra low-rank ranks, strengths, formats, unloading."""

from __future__ import annotations

import copy

import pytest
import torch
from flux_helpers import GEN, PROMPTS, quantize_pipeline, transformer_inputs
from safetensors.torch import save_file

from nunchaku.lora import LoRAError, load_lora, loaded_loras, parse_lora, set_lora_strength, unload_lora
from nunchaku.models.flux import to_nunchaku_layout
from nunchaku.models.tiny import TinyFluxConfig, build_tiny_flux_pipeline
from nunchaku.nn import SVDQW4A4Linear
from nunchaku.pipelines import flux as nunchaku_flux

INNER = 128
RANK = 8


@pytest.fixture(scope="module")
def models():
    pipe = build_tiny_flux_pipeline(torch_dtype=torch.bfloat16)
    bf16 = copy.deepcopy(pipe.transformer)
    quantize_pipeline(pipe)
    return pipe, bf16


def diffusers_lora(bf16, seed=0, scale=0.05):
    """A random rank-8 LoRA on every linear of the original diffusers FLUX, PEFT key format."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in bf16.named_modules():
        if isinstance(m, torch.nn.Linear):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * scale
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * scale
    return sd


def merged_bf16(bf16, sd, strength=1.0, more=()):
    """BF16 FLUX with LoRA weights merged: sd at strength, then each (sd, strength) in more."""
    model = copy.deepcopy(bf16)
    with torch.no_grad():
        for lora_sd, s in ((sd, strength), *more):
            for name, m in model.named_modules():
                key = f"transformer.{name}.lora_A.weight"
                if key in lora_sd:
                    delta = lora_sd[key.replace("lora_A", "lora_B")] @ lora_sd[key]
                    m.weight += (s * delta).to(m.weight.dtype)
    return to_nunchaku_layout(model)


def run(model, seed=0):
    with torch.no_grad():
        return model(**transformer_inputs(seed=seed))[0].float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_a_lora_adds_exactly_its_branch_to_a_quantized_layer():
    from nunchaku.quant.svdquant import svdquant_decompose

    w = svdquant_decompose(torch.randn(256, 128), None, torch.ones(128))
    layer = SVDQW4A4Linear.from_weights(w, dtype=torch.float32)
    x = torch.randn(5, 128)
    base = layer(x)
    down, up = torch.randn(128, 8), torch.randn(256, 8)
    layer.set_adapter("style", down, up, strength=0.7)
    assert layer.lowrank_factors()[0].shape == (128, 48)  # 32 + 8 ranks, padded to 16
    torch.testing.assert_close(layer(x) - base, 0.7 * (x @ down) @ up.T, rtol=1e-4, atol=1e-4)
    layer.set_adapter_strength("style", 0.0)
    torch.testing.assert_close(layer(x), base)
    layer.remove_adapter("style")
    assert layer.lowrank_factors()[0].shape == (128, 32)


def test_quantized_plus_lora_tracks_bf16_plus_lora(models):
    pipe, bf16 = models
    sd = diffusers_lora(bf16)
    ref_base, ref_lora = run(to_nunchaku_layout(copy.deepcopy(bf16))), run(merged_bf16(bf16, sd))
    q = pipe.transformer
    q_base = run(q)
    load_lora(q, sd, "style")
    q_lora = run(q)
    assert rel(ref_lora, ref_base) > 0.05  # the LoRA changes the output noticeably
    # With the LoRA, the quantized model is as close to BF16+LoRA as it was to BF16 without.
    assert rel(q_lora, ref_lora) < 1.5 * rel(q_base, ref_base) + 5e-3, (rel(q_lora, ref_lora), rel(q_base, ref_base))
    # The LoRA's own effect is reproduced: (q_lora - q_base) ≈ (ref_lora - ref_base); what differs
    # is the base's quantization error carried through the blocks the LoRA changes.
    assert rel(q_lora - q_base, ref_lora - ref_base) < 0.2

    set_lora_strength(q, "style", 0.5)
    half = run(q)
    ref_half = run(merged_bf16(bf16, sd, 0.5))
    assert rel(half - q_base, ref_half - ref_base) < 0.2
    set_lora_strength(q, "style", 0.0)
    torch.testing.assert_close(run(q), q_base, rtol=0, atol=0)
    unload_lora(q, "style")
    assert loaded_loras(q) == {}
    torch.testing.assert_close(run(q), q_base, rtol=0, atol=0)
    assert torch.equal(q.x_embedder.weight, bf16.x_embedder.weight)  # the merged BF16 part is restored


def test_two_loras_at_once_match_both_merged_in_bf16(models):
    pipe, bf16 = models
    q = pipe.transformer
    a, b = diffusers_lora(bf16, seed=1), diffusers_lora(bf16, seed=2)
    ref_base = run(to_nunchaku_layout(copy.deepcopy(bf16)))
    ref_both = run(merged_bf16(bf16, a, 1.0, more=[(b, 0.5)]))
    q_base = run(q)
    load_lora(q, a, "a")
    load_lora(q, b, "b", strength=0.5)
    assert loaded_loras(q) == {"a": 1.0, "b": 0.5}
    q_both = run(q)
    unload_lora(q, "a")
    unload_lora(q, "b")
    assert rel(q_both - q_base, ref_both - ref_base) < 0.2


def test_bfl_and_kohya_formats_equal_the_diffusers_format(models):
    pipe, bf16 = models
    q = pipe.transformer
    g = torch.Generator().manual_seed(5)
    down_qkv, up_qkv = torch.randn(RANK, INNER, generator=g) * 0.05, torch.randn(3 * INNER, RANK, generator=g) * 0.05
    down_l1, up_l1 = torch.randn(RANK, INNER, generator=g) * 0.05, torch.randn(7 * INNER, RANK, generator=g) * 0.05
    down_l2, up_l2 = torch.randn(RANK, 5 * INNER, generator=g) * 0.05, torch.randn(INNER, RANK, generator=g) * 0.05
    bfl = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": down_qkv,
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": up_qkv,
        "diffusion_model.single_blocks.1.linear1.lora_A.weight": down_l1,
        "diffusion_model.single_blocks.1.linear1.lora_B.weight": up_l1,
        "diffusion_model.single_blocks.1.linear2.lora_A.weight": down_l2,
        "diffusion_model.single_blocks.1.linear2.lora_B.weight": up_l2,
    }
    kohya = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down_qkv,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up_qkv * 2,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(RANK / 2.0),  # alpha/r = 0.5 cancels the 2
        "lora_unet_single_blocks_1_linear1.lora_down.weight": down_l1,
        "lora_unet_single_blocks_1_linear1.lora_up.weight": up_l1,
        "lora_unet_single_blocks_1_linear2.lora_down.weight": down_l2,
        "lora_unet_single_blocks_1_linear2.lora_up.weight": up_l2,
    }
    peft = {}
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        peft[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"] = down_qkv
        peft[f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight"] = up_qkv[i * INNER:(i + 1) * INNER]
    for i, p in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
        rows = slice(i * INNER, (i + 1) * INNER) if i < 3 else slice(3 * INNER, None)
        peft[f"transformer.single_transformer_blocks.1.{p}.lora_A.weight"] = down_l1
        peft[f"transformer.single_transformer_blocks.1.{p}.lora_B.weight"] = up_l1[rows]
    peft["transformer.single_transformer_blocks.1.proj_out.lora_A.weight"] = down_l2
    peft["transformer.single_transformer_blocks.1.proj_out.lora_B.weight"] = up_l2
    outs = []
    for name, sd in (("bfl", bfl), ("kohya", kohya), ("peft", peft)):
        load_lora(q, sd, name)
        outs.append(run(q))
        unload_lora(q, name)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-2, atol=1e-2)
    assert rel(outs[0], run(q)) > 1e-3


def test_pipeline_lora_api_from_a_file(models, tmp_path):
    pipe, bf16 = models
    path = tmp_path / "style.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_lora(bf16, seed=3).items()}, str(path))
    p = nunchaku_flux.with_transformer(pipe, pipe.transformer)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = p(PROMPTS[0], generator=g(), output_type="np", **GEN).images
    p.load_lora_weights(path, adapter_name="style")
    styled = p(PROMPTS[0], generator=g(), output_type="np", **GEN).images
    p.set_adapters(["style"], adapter_weights=[0.0])
    off = p(PROMPTS[0], generator=g(), output_type="np", **GEN).images
    p.unload_lora_weights()
    after = p(PROMPTS[0], generator=g(), output_type="np", **GEN).images
    assert abs(styled - base).max() > 1e-3
    assert (off == base).all()  # strength 0 leaves the adapter out entirely
    assert (after == base).all()


def test_bad_loras_are_refused_and_leave_the_model_unchanged(models):
    pipe, bf16 = models
    q = pipe.transformer
    before = run(q)
    other = build_tiny_flux_pipeline(TinyFluxConfig(num_attention_heads=2), torch_dtype=torch.bfloat16).transformer
    with pytest.raises(LoRAError, match="another model"):
        load_lora(q, diffusers_lora(other), "wrong")
    with pytest.raises(LoRAError, match="match no FLUX transformer module"):
        load_lora(q, {"unet.down_blocks.0.lora_A.weight": torch.zeros(4, 8)}, "sdxl")
    sd = diffusers_lora(bf16)
    del sd["transformer.x_embedder.lora_B.weight"]
    with pytest.raises(LoRAError, match="x_embedder' lacks its up matrix"):
        parse_lora(sd, q.config)
    with pytest.raises(LoRAError, match="text-encoder"):
        load_lora(q, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}, "te")
    with pytest.raises(LoRAError, match="no LoRA named 'nope'"):
        set_lora_strength(q, "nope", 1.0)
    assert loaded_loras(q) == {}
    torch.testing.assert_close(run(q), before, rtol=0, atol=0)

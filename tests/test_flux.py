"""FLUX on the engine, end to end on CPU with a tiny FLUX-architecture pipeline (random weights)."""

from __future__ import annotations

import copy
import math
import shutil

import numpy as np
import pytest
import torch

from nunchaku.formats import CheckpointError, Generation, write_official
from nunchaku.models.flux import (
    SVDQFluxSingleTransformerBlock,
    SVDQFluxTransformerBlock,
    _joined_sequence,
    iter_quantized_modules,
    to_nunchaku_layout,
)
from nunchaku.models.flux_loading import layout_to_official, quantized_layers, save_quantized_transformer
from nunchaku.models.tiny import TinyFluxConfig, build_tiny_flux_pipeline
from nunchaku.nn import AWQW4A16Linear, SVDQW4A4Linear
from nunchaku.pipelines import flux as nunchaku_flux
from nunchaku.quant.quantizer import QuantizerOptions
from nunchaku.quant.svdquant import DecomposeOptions

from flux_helpers import GEN, PROMPTS, quantize_pipeline, transformer_inputs, with_outlier_channels

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A BF16 tiny pipeline saved as a diffusers folder, and its SVDQuant INT4 checkpoint."""
    root = tmp_path_factory.mktemp("flux")
    pipe = with_outlier_channels(build_tiny_flux_pipeline(torch_dtype=torch.bfloat16))
    pipe.save_pretrained(root / "base")
    reports = quantize_pipeline(pipe)
    save_quantized_transformer(root / "int4", pipe.transformer)
    pipe.reports = reports
    return root, pipe


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def test_layout_computes_the_diffusers_function_for_any_batch_and_resolution():
    pipe = build_tiny_flux_pipeline()
    original = pipe.transformer.eval()
    layout = to_nunchaku_layout(copy.deepcopy(original))
    assert isinstance(layout.single_transformer_blocks[0], SVDQFluxSingleTransformerBlock)
    assert isinstance(layout.transformer_blocks[0], SVDQFluxTransformerBlock)
    assert not hasattr(layout.transformer_blocks[0].attn, "to_q")
    for batch, h, w in ((1, 64, 64), (3, 48, 80), (2, 16, 16)):
        inp = transformer_inputs(batch, h, w, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(layout(**inp)[0], original(**inp)[0], rtol=1e-5, atol=1e-5)


def test_single_blocks_reuse_the_joined_tensor_they_were_given_as_two_halves():
    """A single block returns the text and image halves of one tensor; the next block joins them
    again. Where they still are those two halves, the join is the tensor itself, without a copy;
    in every other case it is a real concatenation."""
    joined = torch.randn(2, 7, 16)
    text, image = joined[:, :3], joined[:, 3:]
    assert _joined_sequence(text, image) is joined
    moved = image + 1  # e.g. a ControlNet residual added: a new tensor
    for enc, hid in ((image, text), (text.clone(), image), (text, image[:, 1:]), (joined[:, :2], image), (text, moved)):
        cat = _joined_sequence(enc, hid)
        assert cat is not joined and torch.equal(cat, torch.cat([enc, hid], dim=1))
    # Views of the same tensor that torch.cat would refuse are refused, not joined.
    for enc, hid in ((joined[:1, :3], image), (joined[:, :3, :8], image)):
        with pytest.raises(RuntimeError):
            _joined_sequence(enc, hid)


def test_double_block_adds_an_ip_adapter_output_as_diffusers_does():
    """An attention processor may return a third (IP-Adapter) output; the block adds it after the
    MLP, as diffusers' FluxTransformerBlock does. Compared on the same diffusers block object."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    block = build_tiny_flux_pipeline(torch_dtype=torch.float32).transformer.transformer_blocks[0].eval()
    processor = block.attn.processor

    def with_ip_output(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        out, context = processor(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return out, context, 0.5 * hidden_states

    block.attn.set_processor(with_ip_output)
    g = torch.Generator().manual_seed(0)
    dim = block.norm1.linear.in_features
    args = (torch.randn(2, 16, dim, generator=g), torch.randn(2, 8, dim, generator=g), torch.randn(2, dim, generator=g))
    with torch.no_grad():
        expected = FluxTransformerBlock.forward(block, *args)
        got = SVDQFluxTransformerBlock.forward(block, *args)
    for e, o in zip(expected, got, strict=True):
        assert torch.equal(e, o)


def test_layout_keeps_diffusers_block_lookups_working():
    """diffusers finds repeated blocks (compile_repeated_blocks) and unsplittable modules by class name."""
    layout = to_nunchaku_layout(build_tiny_flux_pipeline().transformer)
    assert {"SVDQFluxTransformerBlock", "SVDQFluxSingleTransformerBlock"} <= set(layout._repeated_blocks)
    assert {"SVDQFluxTransformerBlock", "SVDQFluxSingleTransformerBlock"} <= set(layout._no_split_modules)
    repeated = [m for m in layout.modules() if type(m).__name__ in layout._repeated_blocks]
    assert len(repeated) == len(layout.transformer_blocks) + len(layout.single_transformer_blocks)


def test_every_quantized_module_is_in_place(saved):
    _, pipe = saved
    names = dict(iter_quantized_modules(pipe.transformer))
    cfg = TinyFluxConfig()
    assert len(names) == cfg.num_layers * 10 + cfg.num_single_layers * 4
    assert isinstance(names["transformer_blocks.0.ff.net.2"], SVDQW4A4Linear)
    assert names["transformer_blocks.0.ff.net.2"].act_unsigned
    assert names["single_transformer_blocks.1.mlp_out"].act_unsigned
    assert not names["single_transformer_blocks.1.qkv_mlp"].act_unsigned
    assert isinstance(names["transformer_blocks.1.norm1_context.linear"], AWQW4A16Linear)
    # Embedders and the final layer stay 16-bit.
    assert isinstance(pipe.transformer.x_embedder, torch.nn.Linear)
    assert pipe.transformer.proj_out.weight.dtype == torch.bfloat16


def test_int4_is_close_to_bf16_and_much_closer_than_naive_w4a4(saved):
    root, pipe = saved
    base = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16)
    ref_t = to_nunchaku_layout(copy.deepcopy(base.transformer))
    svdq = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16, qmodel_path=root / "int4")
    naive = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16)
    naive_reports = quantize_pipeline(naive, QuantizerOptions(decompose=DecomposeOptions(rank=0), smoothing=False))
    # Layer by layer, on the calibration tokens:
    mean_db = lambda reports: np.mean([r.sqnr_db for r in reports if r.kind == "w4a4"])  # noqa: E731
    assert mean_db(pipe.reports) > mean_db(naive_reports) + 6, (mean_db(pipe.reports), mean_db(naive_reports))
    # The whole transformer (its output is dominated by the residual stream, so gaps shrink):
    inp = transformer_inputs()
    with torch.no_grad():
        ref = ref_t(**inp)[0].float()
        out_svdq = svdq.transformer(**inp)[0].float()
        out_naive = naive.transformer(**inp)[0].float()
    sqnr = lambda y: 10 * math.log10(ref.pow(2).sum() / (y - ref).pow(2).sum())  # noqa: E731
    assert sqnr(out_svdq) > 40, sqnr(out_svdq)
    assert sqnr(out_svdq) > sqnr(out_naive) + 3, (sqnr(out_svdq), sqnr(out_naive))
    # And the images, through the VAE:
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    img_bf16 = base(PROMPTS[0], generator=g(), output_type="np", **GEN).images
    img_svdq = svdq(PROMPTS[0], generator=g(), output_type="np", **GEN).images
    img_naive = naive(PROMPTS[0], generator=g(), output_type="np", **GEN).images
    assert img_svdq.shape == (1, 64, 64, 3)
    assert psnr(img_svdq, img_bf16) > 35, psnr(img_svdq, img_bf16)
    assert psnr(img_svdq, img_bf16) > psnr(img_naive, img_bf16)


def test_checkpoint_round_trip_gives_identical_images(saved):
    root, pipe = saved
    loaded = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16, qmodel_path=root / "int4")
    # The same text encoders (from_pretrained keeps T5's `wo` in float32), our in-memory transformer.
    in_memory = nunchaku_flux.with_transformer(loaded, pipe.transformer)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = in_memory(PROMPTS[1], generator=g(), output_type="np", **GEN).images
    b = loaded(PROMPTS[1], generator=g(), output_type="np", **GEN).images
    assert np.array_equal(a, b)


def test_batch_callbacks_and_side_by_side(saved):
    root, _ = saved
    int4 = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16, qmodel_path=root / "int4")
    steps = []
    out = int4(PROMPTS[:2], num_images_per_prompt=2, output_type="np",
               callback_on_step_end=lambda p, i, t, kw: (steps.append(i), kw)[1], **GEN)
    assert out.images.shape == (4, 64, 64, 3) and steps == [0, 1]
    bf16_t = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16).transformer
    bf16 = nunchaku_flux.with_transformer(int4, bf16_t)
    assert bf16.text_encoder_2 is int4.text_encoder_2 and bf16.vae is int4.vae
    assert isinstance(bf16.transformer.transformer_blocks[0].attn.to_q, torch.nn.Linear)
    assert bf16(PROMPTS[0], output_type="np", **GEN).images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("generation", [Generation.V1, Generation.TWO_FILE, Generation.V01])
def test_official_checkpoints_load_and_match_our_model(saved, tmp_path, generation):
    root, pipe = saved
    w4a4, w4a16, plain = layout_to_official(*quantized_layers(pipe.transformer))
    config = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    if generation is Generation.V01:
        plain = {k: v for k, v in plain.items() if k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    path = tmp_path / ("official" if generation is Generation.TWO_FILE else "official.safetensors")
    write_official(path, w4a4, w4a16, plain, config, generation=generation)
    loaded = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16, qmodel_path=path)
    qkv_mlp = loaded.transformer.single_transformer_blocks[0].qkv_mlp
    assert qkv_mlp.rank == 64  # the official file's two branches, both kept
    inp = transformer_inputs(batch=2)
    with torch.no_grad():
        ours = pipe.transformer(**inp)[0].float()
        theirs = loaded.transformer(**inp)[0].float()
    # Same weights; only the summation order of the duplicated low-rank branch differs.
    torch.testing.assert_close(theirs, ours, rtol=2e-2, atol=2e-2)


def test_hub_paths_resolve_through_huggingface_hub(saved, tmp_path, monkeypatch):
    root, _ = saved
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        dest = tmp_path / "hub" / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "int4" / "diffusion_pytorch_model.safetensors", dest)
        return str(dest)

    def fake_snapshot(repo_id, **kwargs):
        calls.append((repo_id, None))
        return str(root / "int4")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    pipe = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16, qmodel_path="org/svdq-tiny")
    assert calls == [("org/svdq-tiny", None)]
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_qkv, SVDQW4A4Linear)


def test_bad_inputs_get_clear_errors(saved, tmp_path):
    root, _ = saved
    pipe = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16, qmodel_path=root / "int4")
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe("   ", **GEN)
    with pytest.raises(ValueError, match="multiples of 16 pixels.*got 72x64"):
        pipe(PROMPTS[0], **{**GEN, "height": 72})

    # A checkpoint for another model (different depth) is refused with the layers named.
    other = build_tiny_flux_pipeline(TinyFluxConfig(num_layers=1, num_single_layers=1), torch_dtype=torch.bfloat16)
    quantize_pipeline(other, QuantizerOptions(decompose=DecomposeOptions(rank=16), alphas=(0.5,)))
    save_quantized_transformer(tmp_path / "other", other.transformer)
    shutil.copy(root / "base" / "transformer" / "config.json", tmp_path / "cfg.json")
    import json

    lite_cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    lite_cfg["num_layers"] = 2  # claims the base model's depth but holds one block
    (tmp_path / "other" / "config.json").write_text(json.dumps(lite_cfg))
    with pytest.raises(CheckpointError, match=r"missing \['transformer_blocks.1"):
        nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16, qmodel_path=tmp_path / "other")

    # A missing tensor is named.
    from nunchaku.formats import read_safetensors, write_safetensors

    tensors, meta = read_safetensors(root / "int4" / "diffusion_pytorch_model.safetensors")
    broken = tmp_path / "broken"
    shutil.copytree(root / "int4", broken)
    del tensors["transformer_blocks.0.attn.to_qkv.proj_up"]
    write_safetensors(broken / "diffusion_pytorch_model.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="transformer_blocks.0.attn.to_qkv.proj_up"):
        nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16, qmodel_path=broken)


def test_official_checkpoint_with_the_shared_vectors_loads_bit_exactly(shared_testdata, tmp_path):
    """A v1 official file whose transformer_blocks.0.out_proj holds the shared ground-truth bytes
    (case0, N = K = 256): the loaded layer has exactly the vectors' logical tensors and computes
    their reference output up to 4-bit activation quantization."""
    import dataclasses

    from diffusers import FluxTransformer2DModel

    from nunchaku.formats import read_safetensors, write_safetensors
    from nunchaku.formats.testing import random_flux_layers
    from nunchaku.models.flux_loading import build_quantized_transformer
    from nunchaku.quant.svdquant import simulate_w4a4

    config = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
                  num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
                  axes_dims_rope=(16, 24, 24))
    w4a4, w4a16, _ = random_flux_layers(config, generator=torch.Generator().manual_seed(0))
    qkv = w4a4["single_transformer_blocks.0.qkv_proj"]
    w4a4["single_transformer_blocks.0.mlp_fc1"] = dataclasses.replace(
        w4a4["single_transformer_blocks.0.mlp_fc1"], smooth=qkv.smooth)  # official files share it
    model = FluxTransformer2DModel(**config).to(torch.bfloat16)
    plain = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    for block in ("transformer_blocks.0.", "single_transformer_blocks.0."):
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            key = f"{block}attn.{norm}.weight"
            if key in model.state_dict():
                plain[f"{block}{norm}.weight"] = model.state_dict()[key]
    path = tmp_path / "svdq-int4-tiny.safetensors"
    write_official(path, w4a4, w4a16, plain, config, generation=Generation.V1)

    vectors, _ = read_safetensors(shared_testdata / "nunchaku_formats" / "w4a4_int4.safetensors")
    tensors, meta = read_safetensors(path)
    for suffix in ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up"):
        key = f"transformer_blocks.0.out_proj.{suffix}"
        assert tensors[key].shape == vectors[f"case0.{suffix}"].shape, key
        tensors[key] = vectors[f"case0.{suffix}"]
    write_safetensors(path, tensors, meta)

    transformer = build_quantized_transformer(path)
    layer = transformer.transformer_blocks[0].attn.to_out[0]
    w = layer.to_weights()
    assert torch.equal(w.qweight, vectors["case0.plain.weight_int4"])
    for ours, theirs in (("wscales", "wscales"), ("smooth", "smooth"), ("lora_down", "lora_down"),
                         ("lora_up", "lora_up"), ("bias", "bias")):
        assert torch.equal(getattr(w, ours), vectors[f"case0.plain.{theirs}"]), ours
    x = vectors["case0.ref.x"]
    y = layer(x.float().to(torch.bfloat16)).float()
    torch.testing.assert_close(y, simulate_w4a4(x, w).to(torch.bfloat16).float(), rtol=0, atol=0)
    ref = vectors["case0.ref.y_noactquant"]
    assert ((y - ref).norm() / ref.norm()).item() < 0.15  # only the 4-bit activations differ


def test_quantized_transformer_compiles_as_one_graph(saved):
    """torch.compile(fullgraph=True) captures the whole 4-bit transformer (reference ops), with a
    LoRA loaded too; aot_eager checks the capture without needing a C++ toolchain."""
    from nunchaku.lora import load_lora, unload_lora

    _, pipe = saved
    transformer = pipe.transformer
    g = torch.Generator().manual_seed(0)
    lora = {f"transformer.transformer_blocks.0.attn.{p}.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.05
            for p in ("to_q", "add_k_proj") for ab, shape in (("A", (8, 128)), ("B", (128, 8)))}
    inp = transformer_inputs()
    with torch.no_grad():
        for with_lora in (False, True):
            if with_lora:
                load_lora(transformer, lora, "compiled")
            torch._dynamo.reset()
            eager = transformer(**inp)[0]
            compiled = torch.compile(transformer, fullgraph=True, backend="aot_eager")(**inp)[0]
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    unload_lora(transformer, "compiled")


def test_prompt_length_defaults_to_the_text_tokenizer_limit(saved):
    """diffusers pads T5 prompts to 512 tokens; a model trained on shorter ones gets its own."""
    root, _ = saved
    pipe = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    pipe(PROMPTS[0], num_inference_steps=1, guidance_scale=0.0, height=64, width=64, output_type="latent")
    handle.remove()
    assert seen == [pipe.tokenizer_2.model_max_length] == [32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pil_images_are_made_with_diffusers_arithmetic(dtype):
    """DevicePilImageProcessor rounds to 8-bit pixels before leaving the image's device; its
    pixels are diffusers' (the same operations in the same dtypes), clamped tails, exact halves
    (x * 255 = k + 0.5, rounded to even), a per-image do_denormalize and one-channel images included."""
    from diffusers.image_processor import VaeImageProcessor

    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 3, 17, 19, generator=g) * 2.6 - 1.3).to(dtype)
    image[0, 0, 0, :6] = torch.tensor([-1.0, 1.0, 0.0, 0.5, 2 * (2.5 / 255) - 1, 2 * (3.5 / 255) - 1]).to(dtype)
    ours_processor = nunchaku_flux.DevicePilImageProcessor(vae_scale_factor=16)
    theirs_processor = VaeImageProcessor(vae_scale_factor=16)
    for kwargs in ({}, {"do_denormalize": [True, False, True]}):
        ours = ours_processor.postprocess(image, output_type="pil", **kwargs)
        theirs = theirs_processor.postprocess(image, output_type="pil", **kwargs)
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs, strict=True):
            assert a.mode == b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    gray = image[:, :1]
    ours = ours_processor.postprocess(gray, output_type="pil")
    theirs = theirs_processor.postprocess(gray, output_type="pil")
    for a, b in zip(ours, theirs, strict=True):
        assert a.mode == "L" and np.array_equal(np.asarray(a), np.asarray(b))
    # Other output types are diffusers' own.
    assert torch.equal(ours_processor.postprocess(image, output_type="pt"),
                       theirs_processor.postprocess(image, output_type="pt"))
    # A processor configured not to denormalize (values already in [0, 1]).
    plain = image.float().clamp(0, 1).to(dtype)
    ours = nunchaku_flux.DevicePilImageProcessor(do_normalize=False).postprocess(plain, output_type="pil")
    theirs = VaeImageProcessor(do_normalize=False).postprocess(plain, output_type="pil")
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_pipelines_use_the_device_pil_processor(saved):
    root, pipe = saved
    loaded = nunchaku_flux.from_pretrained(root / "base", torch_dtype=torch.bfloat16, qmodel_path=root / "int4")
    pil = loaded(PROMPTS[0], generator=torch.Generator().manual_seed(5), **GEN).images[0]
    assert isinstance(loaded.image_processor, nunchaku_flux.DevicePilImageProcessor)
    assert loaded.image_processor.config.vae_scale_factor == loaded.vae_scale_factor * 2
    arr = loaded(PROMPTS[0], generator=torch.Generator().manual_seed(5), output_type="np", **GEN).images[0]
    assert np.array_equal(np.asarray(pil), (arr * 255).round().astype("uint8"))
    side = nunchaku_flux.with_transformer(loaded, pipe.transformer)
    side(PROMPTS[0], **GEN)
    assert isinstance(side.image_processor, nunchaku_flux.DevicePilImageProcessor)

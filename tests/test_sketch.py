"""One-step sketch-to-image on the tiny FLUX pipeline."""

import numpy as np
import pytest
import torch
from flux_helpers import quantize_pipeline
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from nunchaku.models.flux_loading import save_quantized_transformer
from nunchaku.models.tiny import build_tiny_flux_pipeline
from nunchaku.pipelines.sketch import SketchToImagePipeline, binarize_sketch


def a_sketch(size=64):
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((12, 12, 52, 52), outline="black", width=4)
    return img


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sketch")
    pipe = build_tiny_flux_pipeline(torch_dtype=torch.bfloat16)
    pipe.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks"):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(16, m.in_features, generator=g) * 0.05
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 16, generator=g) * 0.05
    save_file(lora, str(root / "sketch_lora.safetensors"))
    quantize_pipeline(pipe)
    save_quantized_transformer(root / "int4", pipe.transformer)
    return root


def test_binarize_maps_strokes_to_one_and_background_to_minus_one():
    t = binarize_sketch(a_sketch())
    assert t.shape == (1, 3, 64, 64) and set(t.unique().tolist()) == {-1.0, 1.0}
    assert t[0, 0, 32, 12].item() == 1.0 and t[0, 0, 32, 32].item() == -1.0
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert (binarize_sketch(transparent) == -1).all()  # transparent = background, not ink


@pytest.mark.parametrize("quantized", [True, False])
def test_one_step_generation_follows_the_guidance(saved, quantized):
    root = saved
    pipe = SketchToImagePipeline.from_pretrained(
        root / "base", root / "sketch_lora.safetensors", torch_dtype=torch.bfloat16,
        qmodel_path=root / "int4" if quantized else None,
    )
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a = pipe(a_sketch(), "a red circle", sketch_guidance=0.8, generator=g())
    b = pipe(a_sketch(), "a red circle", sketch_guidance=0.8, generator=g())
    c = pipe(a_sketch(), "a red circle", sketch_guidance=0.0, generator=g())
    assert isinstance(a, Image.Image) and a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))  # deterministic for a seed
    assert not np.array_equal(np.asarray(a), np.asarray(c))  # the guidance matters
    blank = Image.new("RGB", (64, 64), "white")
    d = pipe(blank, "a red circle", sketch_guidance=0.8, generator=g())
    assert not np.array_equal(np.asarray(a), np.asarray(d))  # so does the sketch


def test_bad_inputs(saved):
    pipe = SketchToImagePipeline.from_pretrained(saved / "base", None, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe(a_sketch(), " ")
    with pytest.raises(ValueError, match="multiple of 16 pixels, got 60x64"):
        pipe(Image.new("RGB", (60, 64), "white"), "a cat")
    with pytest.raises(ValueError, match=r"sketch_guidance must be in \[0, 1\]"):
        pipe(a_sketch(), "a cat", sketch_guidance=1.5)

"""One-step sketch-to-image on the tiny FLUX pipeline."""

import numpy as np
import pytest
import torch
from flux_helpers import save_tiny_flux_with_lora
from PIL import Image, ImageDraw

from nunchaku.pipelines.flux import DevicePilImageProcessor
from nunchaku.pipelines.sketch import SketchMode, SketchToImagePipeline, binarize_sketch


def a_sketch(size=64):
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((12, 12, 52, 52), outline="black", width=4)
    return img


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_flux_with_lora(tmp_path_factory.mktemp("sketch"), "sketch_lora.safetensors", lora_rank=16,
                                    lora_scale=0.05)


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
    assert isinstance(pipe.flux.image_processor, DevicePilImageProcessor)  # PIL pixels made on the device
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


def test_without_a_sketch_lora_the_sketch_is_the_starting_image(saved):
    pipe = SketchToImagePipeline.from_pretrained(saved / "base", None, torch_dtype=torch.bfloat16)
    assert pipe.mode is SketchMode.SDEDIT
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    red = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(red).ellipse((12, 12, 52, 52), fill="red")
    blue = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(blue).rectangle((8, 30, 40, 60), fill="blue")
    kw = dict(num_inference_steps=4, true_cfg_scale=2.0)
    a = np.asarray(pipe(red, "a red circle", sketch_guidance=0.7, generator=g(), **kw), dtype=np.float32)
    a2 = np.asarray(pipe(red, "a red circle", sketch_guidance=0.7, generator=g(), **kw), dtype=np.float32)
    b = np.asarray(pipe(blue, "a red circle", sketch_guidance=0.7, generator=g(), **kw), dtype=np.float32)
    assert a.shape == (64, 64, 3) and np.array_equal(a, a2)
    assert np.abs(a - b).mean() > 1.0  # the sketch shapes the result...
    # ...and with no sketch guidance the start is pure noise: the sketch no longer matters at all
    a0 = pipe(red, "a red circle", sketch_guidance=0.0, generator=g(), **kw)
    b0 = pipe(blue, "a red circle", sketch_guidance=0.0, generator=g(), **kw)
    assert np.array_equal(np.asarray(a0), np.asarray(b0))
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        pipe(red, "a red circle", num_inference_steps=0)

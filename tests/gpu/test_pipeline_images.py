"""The pipelines' PIL conversion on a CUDA image: DevicePilImageProcessor rounds to 8-bit pixels on
the GPU; its pixels must be diffusers' (which rounds on the host)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nunchaku.pipelines.flux import DevicePilImageProcessor

pytestmark = pytest.mark.usefixtures("needs_cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pil_pixels_on_the_gpu_are_diffusers_pixels(dtype):
    from diffusers.image_processor import VaeImageProcessor

    g = torch.Generator(device="cuda").manual_seed(0)
    image = (torch.rand(2, 3, 96, 80, generator=g, device="cuda") * 2.6 - 1.3).to(dtype)
    ours = DevicePilImageProcessor(vae_scale_factor=16).postprocess(image, output_type="pil")
    theirs = VaeImageProcessor(vae_scale_factor=16).postprocess(image, output_type="pil")
    for a, b in zip(ours, theirs, strict=True):
        assert a.size == b.size == (80, 96)
        assert np.array_equal(np.asarray(a), np.asarray(b))

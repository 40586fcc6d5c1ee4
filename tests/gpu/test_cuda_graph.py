"""CUDAGraphForward on the tiny FLUX transformer (nunchaku layout, its fused kernels included) and
on a quantized linear with a LoRA: replays give what the eager forward gives, for new input
values, for other input shapes (least recently used graph evicted), and after the module's
tensors change."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nunchaku.cuda_graph import CUDAGraphForward
from nunchaku.models.flux import to_nunchaku_layout
from nunchaku.models.tiny import build_tiny_flux_pipeline
from nunchaku.nn import SVDQW4A4Linear
from nunchaku.quant.svdquant import DecomposeOptions, smoothing_factors, svdquant_decompose

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flux_helpers import transformer_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("needs_cuda")


def cuda_inputs(batch: int, seed: int, height: int = 64) -> dict:
    return {k: v.to("cuda") if torch.is_tensor(v) else v
            for k, v in transformer_inputs(batch=batch, height=height, seed=seed).items()}


def test_replays_match_the_eager_forward():
    transformer = to_nunchaku_layout(build_tiny_flux_pipeline(torch_dtype=torch.bfloat16).transformer).to("cuda")
    graphed = CUDAGraphForward(transformer, max_graphs=2)
    transformer.forward = graphed
    with torch.inference_mode():
        for batch, seed in ((1, 0), (1, 1), (2, 2), (1, 3)):
            inputs = cuda_inputs(batch, seed)
            eager = graphed.eager_forward(**inputs)[0]
            replayed = transformer(**inputs)[0]
            assert torch.equal(replayed, eager), (batch, seed)
        assert graphed.graph_count == 2  # batch 1 and batch 2
        first = transformer(**cuda_inputs(1, 0))[0]
        second = transformer(**cuda_inputs(1, 1))[0]
        assert not torch.equal(first, second)  # outputs are copies, not the graph's static buffers
        # A third shape evicts the least recently used graph (batch 2); batch 1 is still replayed.
        tall = cuda_inputs(1, 4, height=96)
        assert torch.equal(transformer(**tall)[0], graphed.eager_forward(**tall)[0])
        assert graphed.graph_count == 2
        assert torch.equal(transformer(**cuda_inputs(1, 0))[0], first)


def test_a_lora_change_recaptures():
    """Setting or re-weighting an adapter replaces tensors the graph read: it must not replay
    stale pointers (nunchaku.nn.linear.state_generation)."""
    torch.manual_seed(0)
    w = torch.randn(256, 128) / 128**0.5
    weights = svdquant_decompose(w, torch.randn(256), smoothing_factors(torch.rand(128) + 0.5, w, 0.5),
                                 DecomposeOptions(rank=16))
    layer = SVDQW4A4Linear.from_weights(weights, dtype=torch.bfloat16).to("cuda")
    graphed = CUDAGraphForward(layer)
    x = torch.randn(8, 128, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        plain = graphed(x)
        assert torch.equal(plain, graphed.eager_forward(x))
        layer.set_adapter("style", torch.randn(128, 16) * 0.1, torch.randn(256, 16) * 0.1, strength=1.0)
        with_lora = graphed(x)
        assert torch.equal(with_lora, graphed.eager_forward(x)) and not torch.equal(with_lora, plain)
        layer.set_adapter_strength("style", 0.5)
        assert torch.equal(graphed(x), graphed.eager_forward(x))
        layer.remove_adapter("style")
        assert torch.equal(graphed(x), plain)

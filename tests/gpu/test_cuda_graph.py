"""CUDAGraphForward on the tiny FLUX transformer (nunchaku layout, its fused kernels included):
replays give what the eager forward gives, for new input values and for a second input shape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nunchaku.cuda_graph import CUDAGraphForward
from nunchaku.models.flux import to_nunchaku_layout
from nunchaku.models.tiny import build_tiny_flux_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flux_helpers import transformer_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("needs_cuda")


def cuda_inputs(batch: int, seed: int) -> dict:
    return {k: v.to("cuda") if torch.is_tensor(v) else v
            for k, v in transformer_inputs(batch=batch, seed=seed).items()}


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

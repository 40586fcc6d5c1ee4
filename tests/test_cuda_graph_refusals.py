"""CUDAGraphForward's refusals and its invalidation signal (CPU side; the replays themselves:
tests/gpu/test_cuda_graph.py)."""

import pytest
import torch

from nunchaku.cuda_graph import CUDAGraphForward
from nunchaku.nn import SVDQW4A4Linear
from nunchaku.nn.linear import state_generation


def test_refuses_what_it_cannot_replay():
    linear = torch.nn.Linear(4, 4)
    graphed = CUDAGraphForward(linear)
    with torch.no_grad(), pytest.raises(ValueError, match=r"tensors on a CUDA device, got \['cpu'\]"):
        graphed(torch.randn(2, 4))
    with pytest.raises(ValueError, match="serves inference"):
        graphed(torch.randn(2, 4))
    with pytest.raises(ValueError, match="max_graphs must be at least 1"):
        CUDAGraphForward(linear, max_graphs=0)
    assert graphed.graph_count == 0


def test_quantized_modules_announce_replaced_tensors():
    """Every change that replaces tensors a captured forward reads moves state_generation."""
    layer = SVDQW4A4Linear(128, 256, rank=16)
    steps = [
        lambda: layer.set_adapter("a", torch.randn(128, 8), torch.randn(256, 8)),
        lambda: layer.set_adapter_strength("a", 0.5),
        lambda: layer.remove_adapter("a"),
        lambda: layer.to(torch.float16),
    ]
    for step in steps:
        before = state_generation()
        step()
        assert state_generation() > before
    before = state_generation()
    layer(torch.randn(3, 128, dtype=torch.float16))  # a forward replaces nothing
    assert state_generation() == before

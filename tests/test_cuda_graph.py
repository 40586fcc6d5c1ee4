"""CUDAGraphForward's refusals (CPU side; the replays themselves: tests/gpu/test_cuda_graph.py)."""

import pytest
import torch

from nunchaku.cuda_graph import CUDAGraphForward


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

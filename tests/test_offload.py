"""Block offloading: the same outputs, block weights absent between their uses, undone by remove().
(On the CPU the "device" is the CPU itself, which checks the bookkeeping; the GPU run and its
memory figures are in benchmarks/flux_step.py --variants int4-offload.)"""

from __future__ import annotations

import pytest
import torch
from flux_helpers import quantize_pipeline, transformer_inputs

from nunchaku.models.tiny import build_tiny_flux_pipeline
from nunchaku.offload import BlockOffloader


def test_offloaded_blocks_give_the_same_output_and_come_back():
    pipe = build_tiny_flux_pipeline(torch_dtype=torch.bfloat16)
    quantize_pipeline(pipe)
    model = pipe.transformer
    inputs = transformer_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
        offloader = BlockOffloader(model, "cpu")
        block_tensors = [t for b in offloader.blocks for t in b.parameters()]
        assert all(t.numel() == 0 for t in block_tensors)  # not resident between calls
        assert torch.equal(model(**inputs)[0], expected)
        assert torch.equal(model(**inputs)[0], expected)  # and again: nothing consumed
        assert all(t.numel() == 0 for t in block_tensors)
        offloader.remove()
        assert all(t.numel() > 0 for t in block_tensors)
        assert torch.equal(model(**inputs)[0], expected)


def test_refuses_a_model_that_is_not_on_the_device():
    pipe = build_tiny_flux_pipeline()
    with pytest.raises(ValueError, match="move the transformer to meta first"):
        BlockOffloader(pipe.transformer, "meta")
    with pytest.raises(ValueError, match="needs a FLUX transformer"):
        BlockOffloader(torch.nn.Linear(4, 4), "cpu")

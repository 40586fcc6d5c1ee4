"""The quantized modules and the FLUX transformer on the sm_90 kernels, against the reference
path (NUNCHAKU_BACKEND=reference) on the same GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from nunchaku.nn import SVDQW4A4Linear
from nunchaku.nn.linear import WeightLayout
from nunchaku.quant.svdquant import svdquant_decompose

pytestmark = pytest.mark.usefixtures("needs_sm90")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_copy(module, monkeypatch):
    monkeypatch.setenv("NUNCHAKU_BACKEND", "reference")
    ref = copy.deepcopy(module).to("cuda")
    monkeypatch.delenv("NUNCHAKU_BACKEND")
    return ref


@pytest.mark.parametrize("unsigned", [False, True])
def test_module_moves_to_the_kernel_layout_and_matches_the_reference(unsigned, monkeypatch):
    w = svdquant_decompose(torch.randn(384, 256), torch.randn(384), torch.rand(256) + 0.5, act_unsigned=unsigned)
    cpu = SVDQW4A4Linear.from_weights(w)
    ref = reference_copy(cpu, monkeypatch)
    gpu = copy.deepcopy(cpu).to("cuda")
    assert gpu.weight_layout is WeightLayout.SM90 and ref.weight_layout is WeightLayout.NIBBLES
    for m in (1, 3, 257):
        x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        if unsigned:
            x = torch.nn.functional.gelu(x)
        assert rel(gpu(x), ref(x)) < 1e-2  # one bf16 rounding, plus rare activation-code ties
    down, up = torch.randn(256, 8), torch.randn(384, 8) * 0.1
    gpu.set_adapter("style", down, up, 0.7)  # 32 + 8 ranks: padded to 48 for the kernels
    ref.set_adapter("style", down, up, 0.7)
    x = torch.randn(33, 256, device="cuda", dtype=torch.bfloat16)
    assert rel(gpu(x), ref(x)) < 1e-2
    back = gpu.to("cpu")
    assert back.weight_layout is WeightLayout.NIBBLES and torch.equal(back.to_weights().qweight, w.qweight)


def test_tiny_flux_transformer_runs_on_the_kernels(monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flux_helpers import quantize_pipeline, transformer_inputs

    from nunchaku.models.tiny import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(torch_dtype=torch.bfloat16)
    quantize_pipeline(pipe)
    ref = reference_copy(pipe.transformer, monkeypatch)
    gpu = pipe.transformer.to("cuda")
    layouts = {m.weight_layout for m in gpu.modules() if isinstance(m, SVDQW4A4Linear)}
    assert layouts == {WeightLayout.SM90}
    inp = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in transformer_inputs(batch=2).items()}
    with torch.no_grad():
        assert rel(gpu(**inp)[0], ref(**inp)[0]) < 2e-2
    with torch.no_grad():
        compiled = torch.compile(gpu, fullgraph=True)(**inp)[0]  # the kernels' ops trace, no graph break
        assert rel(compiled, gpu(**inp)[0]) < 1e-2

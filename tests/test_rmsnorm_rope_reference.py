"""The fused q/k RMSNorm + RoPE on the CPU: its PyTorch reference equals the diffusers modules it
replaces (both norm classes FLUX models carry), and the nunchaku-layout FLUX transformer routes
every block's q and k through it (the GPU kernel is checked against diffusers in
tests/gpu/test_rmsnorm_rope.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm
from flux_helpers import transformer_inputs

from nunchaku.models.flux import to_nunchaku_layout
from nunchaku.models.tiny import build_tiny_flux_pipeline
from nunchaku.ops import rmsnorm_rope_triton
from nunchaku.ops.rmsnorm_rope_triton import reference_rmsnorm_rope


@pytest.mark.parametrize("norm_class", [torch.nn.RMSNorm, RMSNorm])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_equals_the_diffusers_modules(norm_class, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 40, 3 * 4 * 64, generator=g) * 3).to(dtype)[..., : 4 * 64].unflatten(-1, (4, 64))
    norm = norm_class(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
        angles = torch.rand(40, 32, generator=g) * 6.28
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
        expected = apply_rotary_emb(norm(x), (cos, sin), sequence_dim=1)
        out = reference_rmsnorm_rope(x, norm.weight, cos, sin, 1e-6, norm_class is RMSNorm)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_flux_layout_routes_every_q_and_k_through_the_fused_op(monkeypatch):
    """With the kernel's availability check forced (the CPU has no Triton kernel), the transformer
    calls the op for q and k of both streams of every double block (writing into the joined
    sequence) and of every single block, with the norm flavour FLUX uses, and gives the diffusers
    path's output."""
    transformer = to_nunchaku_layout(build_tiny_flux_pipeline(torch_dtype=torch.float32).transformer)
    transformer = transformer.to(torch.bfloat16)
    inp = transformer_inputs(batch=2)
    with torch.no_grad():
        expected = transformer(**inp)[0]
        calls = []

        def recorded(x, weight, cos, sin, eps, round_before_weight, out):
            calls.append(round_before_weight)
            out.copy_(reference_rmsnorm_rope(x, weight, cos, sin, eps, round_before_weight))

        monkeypatch.setattr(rmsnorm_rope_triton, "rmsnorm_rope_problem", lambda *a: None)
        monkeypatch.setattr(rmsnorm_rope_triton, "run_rmsnorm_rope_into", recorded)
        out = transformer(**inp)[0]
    assert len(calls) == 4 * len(transformer.transformer_blocks) + 2 * len(transformer.single_transformer_blocks)
    assert not any(calls)  # FLUX's q/k norms are torch.nn.RMSNorm: one rounding
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

"""The fused q/k RMSNorm + rotary embedding (nunchaku::rmsnorm_rope) against diffusers' modules."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb
from diffusers.models.normalization import RMSNorm

from nunchaku.models.flux import norm_and_rotate
from nunchaku.ops.rmsnorm_rope_triton import rmsnorm_rope

pytestmark = pytest.mark.usefixtures("needs_cuda")
pytest.importorskip("triton", reason="the fused kernel is a Triton kernel: triton is not installed")


def rotary_tables(text: int, height: int, width: int):
    ids = torch.zeros(text + height * width, 3)
    ids[text:, 1] = torch.arange(height).repeat_interleave(width)
    ids[text:, 2] = torch.arange(width).repeat(height)
    return FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids.cuda())


@pytest.mark.parametrize("norm_class", [torch.nn.RMSNorm, RMSNorm])  # FLUX's, diffusers' own
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [(512, 64, 64), (7, 3, 5)])
def test_matches_diffusers_on_strided_views(dtype, tokens, norm_class):
    text, height, width = tokens
    t, h, d = text + height * width, 24, 128
    gen = torch.Generator(device="cuda").manual_seed(t)
    # q as the fused q/k/v projection produces it: a view with token stride 3 * H * D.
    qkv = (torch.randn(2, t, 3 * h * d, generator=gen, device="cuda") * 3).to(dtype)
    q = qkv[..., : h * d].unflatten(-1, (h, d))
    norm = norm_class(d, eps=1e-6).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=gen, device="cuda") + 0.5)
    cos, sin = rotary_tables(text, height, width)
    with torch.no_grad():
        expected = apply_rotary_emb(norm(q), (cos, sin), sequence_dim=1)
        out = rmsnorm_rope(q, norm.weight, cos, sin, norm.eps, norm_class is RMSNorm)
        assert torch.equal(norm_and_rotate(q, norm, (cos, sin)), out)  # the module path takes the kernel
        joined = torch.full((2, 5 + t, h, d), float("nan"), device="cuda", dtype=dtype)
        assert norm_and_rotate(q, norm, (cos, sin), out=joined[:, 5:]).data_ptr() == joined[:, 5:].data_ptr()
        assert torch.equal(joined[:, 5:], out) and joined[:, :5].isnan().all()  # written in place, nothing else
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    # Only the sum of squares may add in another order, which can move a normalized input by one
    # 16-bit ulp. The rotation keeps each (even, odd) pair's magnitude, so an input ulp shows in
    # both outputs of the pair at the pair's scale (not the output's, which can cancel to ~0):
    # bound by 3 ulps of the pair magnitude (two inputs and the output rounding), and rare.
    diff = (out.float() - expected.float()).abs()
    pair = expected.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(-1, -1, -1, -1, 2).flatten(-2)
    assert (diff <= 3 * ulp * pair + 1e-6).all(), (diff - 3 * ulp * pair).max().item()
    assert (diff > 0).float().mean().item() < 0.01, (diff > 0).float().mean().item()


def test_norm_and_rotate_takes_the_fused_path_in_eager_mode_only(monkeypatch):
    cos, sin = rotary_tables(4, 2, 2)
    q = torch.randn(1, 8, 2, 128, device="cuda", dtype=torch.bfloat16)
    norm = torch.nn.RMSNorm(128, eps=1e-6).cuda().bfloat16()
    with torch.no_grad():
        fused = norm_and_rotate(q, norm, (cos, sin))
        assert torch.equal(fused, rmsnorm_rope(q, norm.weight, cos, sin, 1e-6, False))
        diffusers_path = apply_rotary_emb(norm(q), (cos, sin), sequence_dim=1)
    # With gradients needed (the kernel has no backward) the diffusers modules run, and backward works.
    trained = norm_and_rotate(q, norm, (cos, sin))
    assert torch.equal(trained, diffusers_path)
    trained.float().sum().backward()
    assert norm.weight.grad is not None
    monkeypatch.setenv("NUNCHAKU_BACKEND", "reference")
    with torch.no_grad():
        assert torch.equal(norm_and_rotate(q, norm, (cos, sin)), diffusers_path)


def test_opcheck_and_bad_input():
    cos, sin = rotary_tables(4, 2, 2)
    q = torch.randn(1, 8, 3, 128, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(128, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nunchaku.rmsnorm_rope, (q, weight, cos, sin, 1e-6))
    with pytest.raises(ValueError, match="rotary tables"):
        rmsnorm_rope(q, weight, cos[:5], sin[:5], 1e-6)


def test_tiny_flux_layout_uses_it_in_every_block(monkeypatch):
    """The nunchaku-layout transformer calls the fused op for q and k of every stream of every
    block (FLUX's norms are torch.nn.RMSNorm), and its output matches the diffusers path."""
    import sys
    from pathlib import Path

    import nunchaku.ops.rmsnorm_rope_triton as fused_module
    from nunchaku.models.flux import to_nunchaku_layout
    from nunchaku.models.tiny import build_tiny_flux_pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flux_helpers import transformer_inputs

    transformer = to_nunchaku_layout(build_tiny_flux_pipeline(torch_dtype=torch.bfloat16).transformer).to("cuda")
    inp = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in transformer_inputs(batch=2).items()}
    calls = []
    real = fused_module.run_rmsnorm_rope_into
    monkeypatch.setattr(fused_module, "run_rmsnorm_rope_into", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = transformer(**inp)[0]
        assert len(calls) == 4 * len(transformer.transformer_blocks) + 2 * len(transformer.single_transformer_blocks)
        monkeypatch.setenv("NUNCHAKU_BACKEND", "reference")
        reference = transformer(**inp)[0]
    err = ((fused.double() - reference.double()).norm() / reference.double().norm()).item()
    assert err < 1e-2, err


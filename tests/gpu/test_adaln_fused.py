"""The fused AdaLN-Zero elementwise ops (nunchaku::adaln_modulate, gated_residual,
gated_residual_adaln) against the PyTorch code of the FLUX blocks, and the blocks that use them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from nunchaku.ops import adaln_triton
from nunchaku.ops.adaln_triton import (
    adaln_modulate,
    gated_residual,
    gated_residual_adaln,
    reference_adaln_modulate,
    reference_gated_residual,
)

pytestmark = pytest.mark.usefixtures("needs_cuda")
pytest.importorskip("triton", reason="the fused kernels are Triton kernels: triton is not installed")

SHAPES = [(1, 4608, 3072), (2, 257, 96), (3, 1, 64), (1, 7, 3000)]


def operands(bsz: int, t: int, c: int, dtype: torch.dtype, seed: int):
    """Strided views as the blocks see them: the residual is the image half of a joined [B, 5 + T, C]
    tensor, shift/scale/gate are chunks of one AdaLN embedding [B, 6C]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    joined = (torch.randn(bsz, 5 + t, c, generator=gen, device="cuda") * 4 + 1).to(dtype)
    residual = joined[:, 5:]
    out = torch.randn(bsz, t, c, generator=gen, device="cuda").to(dtype)
    out2 = torch.randn(bsz, t, c, generator=gen, device="cuda").to(dtype)
    emb = (torch.randn(bsz, 6 * c, generator=gen, device="cuda") * 0.5).to(dtype)
    shift, scale, gate = emb.chunk(6, dim=1)[:3]
    return residual, out, out2, shift, scale, gate


def assert_normalized_close(y: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, scale: torch.Tensor):
    """The LayerNorm's sums may add in another order than PyTorch's, which moves the normalized value
    n of x by one 16-bit ulp now and then; y = round(round(n * (1 + scale)) + shift) then moves by at
    most that ulp times |1 + scale| plus one ulp at each of the two roundings that follow."""
    ulp = 2.0**-7 if y.dtype == torch.bfloat16 else 2.0**-10
    n = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=1e-6)
    modulated = (n * (1 + scale.float())[:, None]).abs()
    diff = (y.float() - expected.float()).abs()
    bound = ulp * (2 * modulated + expected.float().abs()) + 1e-6
    assert (diff <= bound).all(), (diff - bound).max().item()
    assert (diff > 0).float().mean().item() < 0.01, (diff > 0).float().mean().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_ops_match_the_pytorch_block_code(shape, dtype):
    residual, out, out2, shift, scale, gate = operands(*shape, dtype, seed=shape[1])
    with torch.no_grad():
        y = adaln_modulate(residual, shift, scale, 1e-6)
        assert y.is_contiguous() and y.dtype == dtype and y.shape == residual.shape
        assert_normalized_close(y, reference_adaln_modulate(residual, shift, scale, 1e-6), residual, scale)

        # No reduction in these: bit for bit what PyTorch's per-op kernels give.
        assert torch.equal(gated_residual(residual, gate, out), reference_gated_residual(residual, gate, out))
        assert torch.equal(gated_residual(residual, gate, out, out2, clip_fp16=True),
                           reference_gated_residual(residual, gate, out, out2, clip_fp16=True))

        h, y = gated_residual_adaln(residual, gate, out, shift, scale, 1e-6)
        h_expected = reference_gated_residual(residual, gate, out)
        assert torch.equal(h, h_expected)
        assert_normalized_close(y, reference_adaln_modulate(h_expected, shift, scale, 1e-6), h_expected, scale)


def test_fp16_overflow_is_clipped_only_when_asked():
    residual, out, out2, shift, scale, gate = operands(1, 3, 64, torch.float16, seed=0)
    out[0, 1, :8] = 60000.0
    gate[0, :8] = 2.0
    with torch.no_grad():
        clipped = gated_residual(residual, gate, out, clip_fp16=True)
        unclipped = gated_residual(residual, gate, out)
    assert torch.equal(clipped, reference_gated_residual(residual, gate, out, clip_fp16=True))
    assert clipped[0, 1, :8].eq(65504).all()
    assert unclipped[0, 1, :8].isinf().all()  # as diffusers' image stream of a double block leaves it


def test_opcheck_and_bad_input():
    residual, out, out2, shift, scale, gate = operands(2, 3, 64, torch.bfloat16, seed=1)
    torch.library.opcheck(torch.ops.nunchaku.adaln_modulate, (residual, shift, scale, 1e-6))
    torch.library.opcheck(torch.ops.nunchaku.gated_residual, (residual, gate, out, out2, True))
    torch.library.opcheck(torch.ops.nunchaku.gated_residual_adaln, (residual, gate, out, shift, scale, 1e-6))
    with pytest.raises(ValueError, match=r"gated_residual: gate is \(2, 32\), expected \[B, C\]"):
        gated_residual(residual, gate[:, :32], out)
    with pytest.raises(ValueError, match="out is torch.float16"):
        gated_residual_adaln(residual, gate, out.half(), shift, scale, 1e-6)
    with pytest.raises(ValueError, match="not on a CUDA GPU"):
        adaln_modulate(residual.cpu(), shift.cpu(), scale.cpu(), 1e-6)
    with pytest.raises(ValueError, match="unit last stride"):
        adaln_modulate(residual, shift, scale.t().contiguous().t(), 1e-6)


def test_tiny_flux_layout_uses_them_in_every_block(monkeypatch):
    """The nunchaku-layout transformer runs all of its blocks' modulation and residual work through
    the fused ops in eager mode, and its output matches the PyTorch path (NUNCHAKU_BACKEND=reference)."""
    from nunchaku.models.flux import to_nunchaku_layout
    from nunchaku.models.tiny import build_tiny_flux_pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flux_helpers import transformer_inputs

    transformer = to_nunchaku_layout(build_tiny_flux_pipeline(torch_dtype=torch.bfloat16).transformer).to("cuda")
    inp = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in transformer_inputs(batch=2).items()}
    calls = {name: 0 for name in ("run_adaln_modulate", "run_gated_residual", "run_gated_residual_adaln")}
    for name in calls:
        real = getattr(adaln_triton, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(adaln_triton, name, counted)
    with torch.no_grad():
        fused = transformer(**inp)[0]
        double, single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
        assert calls == {"run_adaln_modulate": 2 * double + single, "run_gated_residual": 2 * double + single,
                         "run_gated_residual_adaln": 2 * double}
        monkeypatch.setenv("NUNCHAKU_BACKEND", "reference")
        reference = transformer(**inp)[0]
    err = ((fused.double() - reference.double()).norm() / reference.double().norm()).item()
    assert err < 5e-3, err

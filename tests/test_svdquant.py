import math

import pytest
import torch

from nunchaku.config import GELU_SHIFT
from nunchaku.quant.int4 import dequantize_int4
from nunchaku.quant.svdquant import (
    DecomposeOptions,
    SVDMethod,
    fuse_shared_input,
    search_smoothing,
    simulate_w4a4,
    smoothing_factors,
    svdquant_decompose,
    top_r_svd,
)

F32 = DecomposeOptions(storage_dtype=torch.float32)


def outlier_activations(t, k, n_outliers=6, scale=40.0):
    x = torch.randn(t, k)
    idx = torch.randperm(k)[:n_outliers]
    x[:, idx] *= scale
    return x


def sqnr(y, ref):
    return 10 * math.log10(ref.pow(2).sum() / (y - ref).pow(2).sum())


def test_smoothing_is_an_exact_identity_before_quantization():
    x = outlier_activations(32, 256).double()
    w = torch.randn(128, 256).double()
    lam = smoothing_factors(x.abs().amax(0), w, 0.5).double()
    torch.testing.assert_close((x / lam) @ (w * lam).T, x @ w.T, rtol=1e-10, atol=1e-9)
    # α = 1 flattens the per-channel activation range completely (up to the global factor).
    flat = smoothing_factors(x.abs().amax(0), w, 1.0).double()
    ratio = (x / flat).abs().amax(0)
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-5, atol=0)


@pytest.mark.parametrize("method", list(SVDMethod))
def test_svd_branch_reconstructs_the_top_r_part(method):
    n, k, r = 96, 160, 16
    u, _ = torch.linalg.qr(torch.randn(n, n))
    v, _ = torch.linalg.qr(torch.randn(k, k))
    s = torch.cat([torch.linspace(50, 20, r), torch.linspace(1, 0.1, min(n, k) - r)])
    a = u[:, : len(s)] @ torch.diag(s) @ v[:, : len(s)].T
    up, down = top_r_svd(a, r, method)
    top = u[:, :r] @ torch.diag(s[:r]) @ v[:, :r].T
    torch.testing.assert_close(up @ down.T, top, atol=2e-3 if method is SVDMethod.RANDOMIZED else 1e-4, rtol=0)
    # Eckart-Young: the remaining error is exactly the discarded singular values.
    rest = torch.linalg.matrix_norm(a - up @ down.T).item()
    assert rest == pytest.approx(s[r:].norm().item(), rel=1e-3)


def test_exact_low_rank_weight_leaves_zero_residual():
    w = torch.randn(128, 32) @ torch.randn(32, 192)
    layer = svdquant_decompose(w, None, torch.ones(192), F32)
    main = dequantize_int4(layer.qweight, layer.wscales)
    assert main.abs().max() < 1e-3 * w.abs().max()
    torch.testing.assert_close(layer.dequantize(), w, atol=1e-3 * w.abs().max().item(), rtol=0)


def test_lora_down_reads_the_unsmoothed_input():
    w = torch.randn(64, 128)
    smooth = torch.rand(128) * 4 + 0.25
    layer = svdquant_decompose(w, None, smooth, F32)
    up, down_s = top_r_svd(w * smooth, 32)
    torch.testing.assert_close(layer.lora_up.float() @ layer.lora_down.float().T, up @ (down_s / smooth[:, None]).T,
                               atol=1e-4, rtol=1e-4)
    # The dense equivalent is W up to the int4 step of the residual.
    step = layer.wscales.float().repeat_interleave(64, 1) / smooth[None, :]
    assert ((layer.dequantize() - w).abs() <= step / 2 + 1e-5).all()


def test_unsigned_layers_compensate_the_gelu_shift():
    k, n = 256, 128
    h = torch.randn(2048, k) * 2
    x = torch.nn.functional.gelu(h)  # >= -0.17, what fc2 reads
    w = torch.randn(n, k) / 16
    b = torch.randn(n)
    ref = x @ w.T + b
    smooth = smoothing_factors((x + GELU_SHIFT).abs().amax(0), w, 0.5)
    unsigned = svdquant_decompose(w, b, smooth, F32, act_unsigned=True)
    signed = svdquant_decompose(w, b, smooth, F32, act_unsigned=False)
    assert unsigned.act_unsigned
    s_u, s_s = sqnr(simulate_w4a4(x, unsigned), ref), sqnr(simulate_w4a4(x, signed), ref)
    assert s_u > 20 and s_u > s_s + 1.5  # 16 non-negative codes beat 8
    # The bias holds exactly -shift * (row sums of the dequantized main branch in raw input space)...
    main_raw = dequantize_int4(unsigned.qweight, unsigned.wscales) / unsigned.smooth.float()[None, :]
    compensation = unsigned.bias.float() - b
    torch.testing.assert_close(compensation, -GELU_SHIFT * main_raw.sum(1), rtol=1e-5, atol=1e-5)
    # ...which cancels the shift; without it the output carries that term as an error.
    uncompensated = unsigned.to(torch.float32)
    uncompensated.bias = b.clone()
    assert s_u > sqnr(simulate_w4a4(x, uncompensated), ref) + 2


def test_svdquant_beats_naive_and_smoothquant_on_outlier_activations():
    k, n = 512, 384
    x = outlier_activations(256, k)
    w = torch.randn(n, k) / math.sqrt(k)
    w[:, torch.randperm(k)[:4]] *= 8  # weight outliers too
    ref = x @ w.T
    absmax = x.abs().amax(0)
    naive = svdquant_decompose(w, None, torch.ones(k), DecomposeOptions(rank=0))
    smooth_only = search_smoothing(w, None, absmax, x, DecomposeOptions(rank=0)).layer
    svdq = search_smoothing(w, None, absmax, x, DecomposeOptions(rank=32)).layer
    s_naive, s_smooth, s_svdq = (sqnr(simulate_w4a4(x, l), ref) for l in (naive, smooth_only, svdq))
    assert s_smooth > s_naive + 1
    assert s_svdq > s_smooth + 3, (s_naive, s_smooth, s_svdq)


def test_search_picks_the_lowest_error_alpha_and_refines():
    x = outlier_activations(128, 256)
    w = torch.randn(128, 256) / 16
    res = search_smoothing(w, None, x.abs().amax(0), x, DecomposeOptions(rank=16), alphas=(0.0, 0.5, 1.0))
    assert res.alpha in res.mse_by_alpha
    assert res.mse == min(res.mse_by_alpha.values())
    assert len(res.mse_by_alpha) >= 4  # midpoints around the best grid point were tried
    mse = (simulate_w4a4(x, res.layer) - x @ w.T).pow(2).mean().item()
    assert mse == pytest.approx(res.mse, rel=1e-4)


def test_refinement_never_increases_the_weight_error():
    w = torch.randn(128, 256)
    w[:, :3] *= 20
    smooth = torch.ones(256)
    plain = svdquant_decompose(w, None, smooth, F32)
    refined = svdquant_decompose(w, None, smooth, DecomposeOptions(storage_dtype=torch.float32, refine_iters=4))
    err = lambda l: torch.linalg.matrix_norm(l.dequantize() - w).item()
    assert err(refined) <= err(plain)


def test_storage_dtype_rounding_is_absorbed():
    w = torch.randn(128, 192)
    layer = svdquant_decompose(w, torch.randn(128), torch.rand(192) + 0.5, DecomposeOptions())
    for name in ("wscales", "smooth", "lora_down", "lora_up", "bias"):
        assert getattr(layer, name).dtype == torch.bfloat16
    step = layer.wscales.float().repeat_interleave(64, 1) / layer.smooth.float()[None, :]
    assert ((layer.dequantize() - w).abs() <= step / 2 + 1e-4).all()


def test_fuse_shared_input_concatenates_rows_and_biases():
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    w, bias = fuse_shared_input([a, b], [torch.ones(32), None])
    assert torch.equal(w, torch.cat([a, b])) and torch.equal(bias, torch.cat([torch.ones(32), torch.zeros(16)]))
    with pytest.raises(ValueError, match="same K"):
        fuse_shared_input([a, torch.randn(8, 32)], [None, None])


def test_bad_shapes_named():
    with pytest.raises(ValueError, match=r"smooth must have shape \[64\], got \[32\]"):
        svdquant_decompose(torch.randn(8, 64), None, torch.ones(32))

"""GPU tests of the sm_90a kernels in the pow2 activation format (nunchaku.ops.Sm90Activations.POW2)
against the references in nunchaku.ops.sm90_layout: the quantizer bit for bit, the GEMM with
per-token scales to one rounding of its output."""

from __future__ import annotations

import pytest
import torch
from test_w4a4_sm90 import check_gemm, make_layer
from w4a4_helpers import check_close, check_gelu_epilogue, rel_err

from nunchaku.ops import Sm90Activations, sm90
from nunchaku.ops.sm90_layout import (
    dequantize_act_sm90,
    pack_weights_sm90,
    reference_gemm_sm90,
    reference_quantize_act_pow2_sm90,
    scale_rows_padded,
)

pytestmark = pytest.mark.usefixtures("needs_sm90")


def run_quantize_pow2(x, smooth, lora_down):
    """The op on poisoned outputs (NaN / 0xFF bytes), so unwritten elements show."""
    m, k = x.shape
    codes = torch.full((m, k), 0xFF, dtype=torch.uint8, device=x.device)
    scales = torch.full((scale_rows_padded(m),), float("nan"), device=x.device)
    lora_act = torch.full((m, lora_down.shape[1]), float("nan"), device=x.device)
    torch.ops.nunchaku.w4a4_quantize_act_pow2_sm90(x, smooth, lora_down, codes, scales, lora_act)
    return codes, scales, lora_act


def wide_range_input(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Gaussian x with every 64-channel group scaled by 2^u, u uniform in [-24, 6]: groups far
    below their token's largest (the rounding path), and whole zero groups and rows."""
    g = k // 64
    u = torch.randint(-24, 7, (m, g, 1), generator=gen, device="cuda").to(torch.float32)
    x = torch.randn(m, g, 64, generator=gen, device="cuda") * torch.exp2(u)
    x[:, ::5] = 0
    x[::7] = 0
    return x.view(m, k).to(dtype)


def check_quantize(x, layer):
    codes, scales, lora_act = run_quantize_pow2(x, layer["smooth"], layer["lora_down"])
    rc, rs, rl = reference_quantize_act_pow2_sm90(x, layer["smooth"], layer["lora_down"])
    assert torch.equal(scales, rs), f"{(scales != rs).sum().item()} token scales differ"
    mismatch = (codes != rc).sum().item()
    assert mismatch == 0, f"{mismatch} of {codes.numel()} codes differ"
    assert rel_err(lora_act, rl) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 192), (257, 3072), (4608, 3072), (130, 12288), (1000, 320)])
def test_quantize_pow2_matches_reference(m, k, dtype):
    """Bit for bit, with K split over a cluster (evenly and not: K = 320) and whole rows per CTA."""
    gen = torch.Generator(device="cuda").manual_seed(m * 5 + k)
    layer = make_layer(k, 128, 32, dtype, gen)
    check_quantize((torch.randn(m, k, generator=gen, device="cuda") * 3).to(dtype), layer)


@pytest.mark.parametrize("rank", [16, 96, 128])
@pytest.mark.parametrize("m,k", [(300, 3072), (64, 15360)])
def test_quantize_pow2_wide_range_and_ranks(m, k, rank):
    """Groups 2^-30 below their token's largest, zero groups and zero rows; the largest rank (3
    ring stages) and K = 15360 (240 groups a row)."""
    gen = torch.Generator(device="cuda").manual_seed(m + k + rank)
    layer = make_layer(k, 128, rank, torch.bfloat16, gen)
    x = wide_range_input(m, k, torch.bfloat16, gen)
    check_quantize(x, layer)
    _, scales, _ = run_quantize_pow2(x, layer["smooth"], layer["lora_down"])
    assert (scales[:m][::7] == 2.0**-104).all(), "zero rows get the floor exponent's scale"
    assert (scales[m:] == 0).all()


def test_quantize_pow2_without_k_split():
    """Enough rows that every CTA takes whole rows (no cluster split: the token exponent comes from
    the thread's own groups), with a group count that leaves a partial batch in the rewrite."""
    gen = torch.Generator(device="cuda").manual_seed(17)
    layer = make_layer(1152, 128, 32, torch.bfloat16, gen)
    check_quantize(wide_range_input(17000, 1152, torch.bfloat16, gen), layer)


def test_quantize_pow2_boundaries():
    """Group maxima at exact powers of two (and one ulp above), values under the 2^-96 floor, and
    groups more than 2^126 below their token's largest (rewritten as zero)."""
    gen = torch.Generator(device="cuda").manual_seed(19)
    k = 512
    layer = make_layer(k, 128, 32, torch.float16, gen)
    layer["smooth"] = torch.ones(k, device="cuda", dtype=torch.float16)
    x = torch.randn(48, k, generator=gen, device="cuda") * 0.25
    x[:16, 0::64] = torch.exp2(torch.arange(-8, 8, device="cuda").float())[:, None]  # max = 2^j exactly
    x[16:32, 0::64] = 1.0 + 2.0**-10  # one fp16 ulp above 1
    x32 = x.clone()
    x32[32:, 64:128] = 2.0**-100  # below the floor (fp32 path: x is fp16, see below)
    x = x.to(torch.float16)
    check_quantize(x, layer)
    # fp32-only magnitudes go through bf16: 2^-100 and 2^120 in one token (a 2^220 span)
    xb = x32.to(torch.bfloat16)
    xb[40:, 128:192] = 2.0**120
    layer_b = make_layer(k, 128, 32, torch.bfloat16, gen)
    layer_b["smooth"] = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    check_quantize(xb, layer_b)


def test_quantize_pow2_is_at_least_as_accurate_as_int4():
    """Per group, the pow2 activations' max error is at most the int4 format's step bound and, in
    total, clearly below the int4 format's error (on the same x)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    layer = make_layer(3072, 128, 32, torch.bfloat16, gen)
    x = torch.randn(512, 3072, generator=gen, device="cuda").to(torch.bfloat16)
    v = x.double() / layer["smooth"].double()
    a2 = dequantize_act_sm90(*sm90.w4a4_quantize_act_pow2_sm90(x, layer["smooth"], layer["lora_down"])[:2])
    a4 = dequantize_act_sm90(*sm90.w4a4_quantize_act_sm90(x, layer["smooth"], layer["lora_down"])[:2])
    amax = v.abs().view(512, 48, 64).amax(-1)
    err2 = (a2 - v).abs().view(512, 48, 64).amax(-1)
    assert (err2 <= amax / 16 * (1 + 1e-6)).all()  # half of a step of at most max/8
    assert (a2 - v).norm() < 0.8 * (a4 - v).norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 257, 4608])
@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 12288), (15360, 3072)])
def test_gemm_pow2_matches_reference(m, k, n, dtype, gemm_tile):
    if m == 4608 and n == 12288:
        pytest.skip("large-M check limited to two shapes to keep the run short")
    gen = torch.Generator(device="cuda").manual_seed(m + k + n + 1)
    layer = make_layer(k, n, 32, dtype, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    check_gemm(x, layer, f"pow2 gemm m={m} k={k} n={n} {dtype}",
               quantize=reference_quantize_act_pow2_sm90)


@pytest.mark.parametrize("m,k,n", [(3, 64, 128), (300, 320, 384), (500, 704, 256), (1000, 3072, 3072)])
def test_fused_layer_pow2(m, k, n, gemm_tile):
    """Quantize + GEMM end to end in the pow2 format, with wide-range inputs, odd group counts
    and partial tiles; the GELU epilogue on part of the columns."""
    gen = torch.Generator(device="cuda").manual_seed(m * k + n + 3)
    dtype = torch.bfloat16
    layer = make_layer(k, n, 32, dtype, gen)
    x = wide_range_input(m, k, dtype, gen) * 16
    args = (layer["smooth"], layer["lora_down"], layer["wp"], layer["wsp"], layer["lora_up"], layer["bias"])
    out = sm90.w4a4_linear_sm90(x, *args, pow2_activations=True)
    codes, scales, lora_act = reference_quantize_act_pow2_sm90(x, layer["smooth"], layer["lora_down"])
    exact = reference_gemm_sm90(codes, scales, layer["wp"], layer["wsp"], lora_act, layer["lora_up"], layer["bias"],
                                exact=True)
    check_close(out, exact, dtype, f"pow2 fused m={m} k={k} n={n}")
    with_gelu = sm90.w4a4_linear_sm90(x, *args, gelu_from=n // 2, pow2_activations=True)
    check_gelu_epilogue(out, with_gelu, n // 2)


@pytest.mark.parametrize("k", [64, 704, 3072])
def test_gemm_pow2_zero_and_spread_weight_scales(k, gemm_tile):
    """Weight scales spread over 2^-30..2^30 within a channel and whole zero-scale groups (the
    promotion multiplies each group's partial sums by its row's scale alone), several waves of
    tiles, odd group counts."""
    tokens, channels = gemm_tile
    m, n = tokens * 3 + 17, channels * 50
    gen = torch.Generator(device="cuda").manual_seed(k + channels)
    dtype = torch.bfloat16
    layer = make_layer(k, n, 32, dtype, gen)
    g = k // 64
    wcodes = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    spread = torch.exp2(torch.randint(-30, 31, (n, g), generator=gen, device="cuda").float())
    wscales = ((torch.rand(n, g, generator=gen, device="cuda") + 0.5) * spread).to(dtype)
    wscales[::3, g // 2] = 0
    layer["wp"], layer["wsp"] = pack_weights_sm90(wcodes, wscales)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    check_gemm(x, layer, f"pow2 gemm, spread scales, k={k}", quantize=reference_quantize_act_pow2_sm90)


def test_pow2_rejects_bad_arguments():
    gen = torch.Generator(device="cuda").manual_seed(3)
    layer = make_layer(256, 128, 32, torch.bfloat16, gen)
    x = torch.randn(8, 256, generator=gen, device="cuda").to(torch.bfloat16)
    codes, scales, lora_act = sm90.w4a4_quantize_act_pow2_sm90(x, layer["smooth"], layer["lora_down"])
    assert scales.shape == (384,)
    out = torch.empty(8, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"act_scales \(per token\) must have shape \[384\]"):
        torch.ops.nunchaku.w4a4_gemm_sm90(codes, scales[:192].contiguous(), layer["wp"], layer["wsp"], lora_act,
                                          layer["lora_up"], layer["bias"], 128, out)
    with pytest.raises(RuntimeError, match=r"act_scales must be a contiguous float32 \[M_pad\] = \[384\]"):
        torch.ops.nunchaku.w4a4_quantize_act_pow2_sm90(x, layer["smooth"], layer["lora_down"], codes,
                                                       torch.empty(4, 384, device="cuda"), lora_act)
    with pytest.raises(ValueError, match="signed only"):
        sm90.w4a4_linear_sm90(x, layer["smooth"], layer["lora_down"], layer["wp"], layer["wsp"], layer["lora_up"],
                              layer["bias"], act_unsigned=True, pow2_activations=True)


def test_module_follows_the_activation_setting(monkeypatch):
    """SVDQW4A4Linear runs the pow2 format when NUNCHAKU_SM90_ACTIVATIONS=pow2 (read when the module
    moves to the GPU), signed layers only; its output is then closer to the unquantized layer."""
    from nunchaku.nn.linear import SVDQW4A4Linear
    from nunchaku.quant.svdquant import smoothing_factors, svdquant_decompose

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(384, 256, generator=gen) / 16
    x = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    exact = x.double() @ w.double().t()
    outputs = {}
    for setting in ("int4", "pow2"):
        monkeypatch.setenv("NUNCHAKU_SM90_ACTIVATIONS", setting)
        for unsigned in (False, True):
            smooth = smoothing_factors(x.float().abs().amax(0), w, 0.5)
            q = svdquant_decompose(w, None, smooth, act_unsigned=unsigned)
            layer = SVDQW4A4Linear.from_weights(q, torch.bfloat16).cuda()
            assert layer.sm90_activations is Sm90Activations(setting)
            assert f"sm90_activations={setting}" in repr(layer)
            inp = x.float().clamp(min=-0.17) if unsigned else x.float()
            outputs[setting, unsigned] = layer(inp.to(torch.bfloat16).cuda()).double().cpu()
    assert torch.equal(outputs["int4", True], outputs["pow2", True]), "unsigned layers stay int4"
    assert not torch.equal(outputs["int4", False], outputs["pow2", False])
    assert rel_err(outputs["pow2", False], exact) < rel_err(outputs["int4", False], exact)


def test_module_on_the_gpu_matches_its_reference_path_on_the_cpu():
    """A pow2 layer computes the same format on the Hopper kernels and on the reference path (CPU):
    the same codes (bit-exact quantizer), so the outputs differ only by the GEMMs' summation
    order and one bf16 rounding each."""
    from nunchaku.nn.linear import SVDQW4A4Linear, WeightLayout
    from nunchaku.quant.svdquant import smoothing_factors, svdquant_decompose

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(384, 320, generator=gen) / 18
    x = (torch.randn(2, 37, 320, generator=gen) * torch.logspace(-2, 1, 320)).to(torch.bfloat16)
    q = svdquant_decompose(w, torch.randn(384, generator=gen), smoothing_factors(x.float().abs().amax((0, 1)), w, 0.5))
    cpu = SVDQW4A4Linear.from_weights(q, torch.bfloat16)
    cpu.sm90_activations = Sm90Activations.POW2
    y_cpu = cpu(x).double()
    gpu = SVDQW4A4Linear.from_weights(q, torch.bfloat16)
    gpu.sm90_activations = Sm90Activations.POW2
    gpu = gpu.cuda()
    assert gpu.weight_layout is WeightLayout.SM90  # the kernels, not the reference on the GPU
    y_gpu = gpu(x.cuda()).double().cpu()
    err = rel_err(y_gpu, y_cpu)
    assert err < 5e-3, err  # in norm: two bf16 roundings of the same sum, in different orders
    cpu.sm90_activations = Sm90Activations.INT4
    assert rel_err(y_gpu, cpu(x).double()) > 2 * err  # the int4 path is visibly another quantizer

import pytest
import torch

from nunchaku import ops
from nunchaku.nn import AWQW4A16Linear, SVDQW4A4Linear
from nunchaku.ops import reference
from nunchaku.quant.awq import quantize_w4a16, simulate_w4a16
from nunchaku.quant.int4 import pack_int4_nibbles
from nunchaku.quant.svdquant import DecomposeOptions, simulate_w4a4, smoothing_factors, svdquant_decompose


def make_w4a4(n=256, k=320, unsigned=False, rank=32):
    w = torch.randn(n, k) / k**0.5
    x = torch.randn(64, k)
    return svdquant_decompose(w, torch.randn(n), smoothing_factors(x.abs().amax(0), w, 0.5),
                              DecomposeOptions(rank=rank), act_unsigned=unsigned)


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), (257,)])
def test_w4a4_module_matches_the_specification(unsigned, lead):
    weights = make_w4a4(unsigned=unsigned)
    layer = SVDQW4A4Linear.from_weights(weights, dtype=torch.float32)
    x = torch.randn(*lead, 320)
    if unsigned:
        x = torch.nn.functional.gelu(x)
    y = layer(x)
    assert y.shape == (*lead, 256) and y.dtype == torch.float32
    torch.testing.assert_close(y, simulate_w4a4(x, weights), rtol=1e-5, atol=1e-4)


def test_w4a4_module_bf16_output_is_one_rounding_of_the_fp32_result():
    weights = make_w4a4()
    layer = SVDQW4A4Linear.from_weights(weights, dtype=torch.bfloat16)
    x = torch.randn(7, 320, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, simulate_w4a4(x, weights).to(torch.bfloat16), rtol=0, atol=0)


def test_w4a4_module_round_trips_its_weights_and_packs_4_bits():
    weights = make_w4a4()
    layer = SVDQW4A4Linear.from_weights(weights)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (256, 160)
    back = layer.to_weights()
    assert torch.equal(back.qweight, weights.qweight)
    assert torch.equal(back.lora_down, weights.lora_down) and back.act_unsigned == weights.act_unsigned


def test_w4a4_module_non_contiguous_input():
    weights = make_w4a4()
    layer = SVDQW4A4Linear.from_weights(weights, dtype=torch.float32)
    x = torch.randn(320, 9).T  # a transposed view
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), simulate_w4a4(x, weights), rtol=1e-5, atol=1e-4)


def test_bad_inputs_and_weights_are_named():
    layer = SVDQW4A4Linear(128, 64, rank=16)
    with pytest.raises(ValueError, match="input has 100 features, the layer expects 128"):
        layer(torch.randn(2, 100))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not fit a layer"):
        layer.load_weights(make_w4a4(n=64, k=128, rank=32))
    with pytest.raises(ValueError, match="multiple of the group size 64"):
        SVDQW4A4Linear(100, 64)


@pytest.mark.parametrize("group_size", [64, 128])
def test_w4a16_module_matches_the_specification(group_size):
    w = torch.randn(96, 256)
    weights = quantize_w4a16(w, torch.randn(96), group_size, storage_dtype=torch.float32)
    layer = AWQW4A16Linear.from_weights(weights, dtype=torch.float32)
    x = torch.randn(3, 4, 256)
    torch.testing.assert_close(layer(x), simulate_w4a16(x, weights), rtol=1e-5, atol=1e-4)
    assert torch.equal(layer.to_weights().qweight, weights.qweight)
    no_bias = AWQW4A16Linear.from_weights(quantize_w4a16(w, None, group_size, storage_dtype=torch.float32),
                                         dtype=torch.float32)
    assert no_bias.bias is None
    torch.testing.assert_close(layer(x) - no_bias(x), weights.bias.expand(3, 4, 96), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gelu_from", [0, 130, 256])
def test_w4a4_module_applies_gelu_to_the_columns_asked(gelu_from, dtype):
    """forward(x, gelu_from=g): what an MLP up-projection followed by its tanh GELU gives (the
    kernels do it in their epilogue; the reference path does it the PyTorch way, bit for bit)."""
    layer = SVDQW4A4Linear.from_weights(make_w4a4(), dtype=dtype)
    x = torch.randn(2, 7, 320).to(dtype)
    plain = layer(x)
    fused = layer(x, gelu_from=gelu_from)
    expected = torch.cat([plain[..., :gelu_from],
                          torch.nn.functional.gelu(plain[..., gelu_from:], approximate="tanh")], dim=-1)
    assert torch.equal(fused, expected)
    assert gelu_from == 256 or not torch.equal(fused, plain)
    for bad in (131, -2, 258):
        with pytest.raises(ValueError, match=f"gelu_from = {bad} must be an even column index"):
            layer(x, gelu_from=bad)


def test_reference_ops_compose_to_the_linear():
    weights = make_w4a4(unsigned=True)
    x = torch.nn.functional.gelu(torch.randn(11, 320))
    codes, scales, lora_act = reference.w4a4_quantize_act_fuse_lora(x, weights.smooth, weights.lora_down, True)
    assert codes.dtype == torch.uint8 and codes.shape == (11, 320) and scales.shape == (11, 5)
    torch.testing.assert_close(lora_act, x @ weights.lora_down.float())
    y = reference.w4a4_gemm(codes, scales, pack_int4_nibbles(weights.qweight), weights.wscales, lora_act,
                            weights.lora_up, weights.bias, torch.float32)
    torch.testing.assert_close(y, simulate_w4a4(x, weights), rtol=1e-5, atol=1e-4)
    y2 = ops.w4a4_linear(x, pack_int4_nibbles(weights.qweight), weights.wscales, weights.smooth, weights.lora_down,
                         weights.lora_up, weights.bias, True)
    torch.testing.assert_close(y2, y)


def test_weight_layouts_round_trip_and_follow_the_device(monkeypatch):
    from nunchaku.nn.linear import WeightLayout

    weights = make_w4a4()
    layer = SVDQW4A4Linear.from_weights(weights)
    assert layer.weight_layout is WeightLayout.NIBBLES  # on the CPU: the reference's layout
    layer._set_layout(WeightLayout.SM90)  # what a move to an H100 does
    assert layer.qweight.shape == (3, 384 // 64, 64, 64) and layer.wscales.dtype == layer.compute_dtype  # N 256 -> 384
    back = layer.to_weights()
    assert torch.equal(back.qweight, weights.qweight) and torch.equal(back.wscales, weights.wscales)
    layer.to(torch.float32).to("cpu")  # .to() on the CPU returns it to the reference layout
    assert layer.weight_layout is WeightLayout.NIBBLES
    assert torch.equal(layer.to_weights().qweight, weights.qweight)

    monkeypatch.setenv("NUNCHAKU_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="NUNCHAKU_BACKEND=cuda, but the layer is on cpu"):
        layer.to("cpu")
    monkeypatch.setenv("NUNCHAKU_BACKEND", "fast")
    with pytest.raises(ValueError, match="NUNCHAKU_BACKEND='fast' is not one of"):
        layer.to("cpu")


def test_set_sm90_activations_sets_every_w4a4_layer(monkeypatch):
    from nunchaku.nn import set_sm90_activations
    from nunchaku.ops import Sm90Activations

    monkeypatch.delenv("NUNCHAKU_SM90_ACTIVATIONS", raising=False)
    model = torch.nn.Sequential(SVDQW4A4Linear(128, 128), torch.nn.GELU(), SVDQW4A4Linear(128, 256, act_unsigned=True))
    assert all(m.sm90_activations is Sm90Activations.INT4 for m in (model[0], model[2]))
    assert set_sm90_activations(model, "pow2") == 2
    assert model[0].sm90_activations is Sm90Activations.POW2 and model[2].sm90_activations is Sm90Activations.POW2
    model.to(torch.float32)  # a move keeps the setting
    assert model[0].sm90_activations is Sm90Activations.POW2
    with pytest.raises(ValueError, match="'int5' is not a valid Sm90Activations"):
        set_sm90_activations(model, "int5")
    monkeypatch.setenv("NUNCHAKU_SM90_ACTIVATIONS", "pow2")
    assert SVDQW4A4Linear(128, 128).sm90_activations is Sm90Activations.POW2


def test_pow2_layer_on_the_reference_path_computes_the_hopper_format():
    """A layer set to pow2 off the Hopper kernels runs the reference of that format: its
    activations are the sm_90 quantizer reference's codes decoded (the same values bit for bit),
    times the dequantized weights, in float32."""
    from nunchaku.ops import Sm90Activations
    from nunchaku.ops.sm90_layout import dequantize_act_sm90, reference_quantize_act_pow2_sm90
    from nunchaku.quant.int4 import dequantize_int4

    torch.manual_seed(1)
    weights = make_w4a4(k=384)
    layer = SVDQW4A4Linear.from_weights(weights, dtype=torch.float32)
    # Groups up to ~2^10 below the token's largest (every code exact: the format's range is 2^13).
    x = torch.randn(2, 5, 384) * torch.logspace(-2, 1, 384)
    y_int4 = layer(x)
    layer.sm90_activations = Sm90Activations.POW2
    y = layer(x)
    x2 = x.reshape(-1, 384)
    lw = layer.to_weights()  # the layer's float32 tensors
    codes, scales, _ = reference_quantize_act_pow2_sm90(x2, lw.smooth, lw.lora_down)
    a = dequantize_act_sm90(codes, scales)
    # The format from its definition: per (token, group) the smallest e with 16 * 2^e >= max |v|,
    # q = v / 2^e rounded half to even (every code exact here: groups within 2^13 of the token's
    # largest).
    v = (x2.double() / lw.smooth.double()).view(10, 6, 64)
    e = torch.ceil(torch.log2(v.abs().amax(-1, keepdim=True) / 16))
    assert torch.equal(a.view(10, 6, 64), torch.round(v / 2**e) * 2**e)
    w = dequantize_int4(lw.qweight, lw.wscales, 64)
    expected = (a.float() @ w.T + (x2 @ lw.lora_down) @ lw.lora_up.T + lw.bias).reshape(2, 5, 256)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, y_int4, rtol=1e-3, atol=1e-3)  # a different quantizer, visibly


def test_pow2_is_closer_to_the_unquantized_activations_than_int4():
    """Per group the pow2 step is at most max/8 against int4's max/7: on Gaussian activations
    the layer's output error against the float layer (same quantized weights, exact
    activations) is lower with pow2."""
    from nunchaku.ops import Sm90Activations
    from nunchaku.quant.int4 import dequantize_int4

    torch.manual_seed(0)
    weights = make_w4a4(k=512, n=256)
    layer = SVDQW4A4Linear.from_weights(weights, dtype=torch.float32)
    x = torch.randn(64, 512)
    lw = layer.to_weights()
    w = dequantize_int4(lw.qweight, lw.wscales, 64)
    exact = x @ w.T + (x @ lw.lora_down) @ lw.lora_up.T + lw.bias
    err_int4 = (layer(x) - exact).norm() / exact.norm()
    layer.sm90_activations = Sm90Activations.POW2
    err_pow2 = (layer(x) - exact).norm() / exact.norm()
    assert err_pow2 < 0.9 * err_int4, (err_pow2, err_int4)  # measured 0.070 against 0.087


def test_pow2_unsigned_layer_keeps_int4_and_sm80_layout_refuses_pow2():
    from nunchaku.nn.linear import WeightLayout
    from nunchaku.ops import Sm90Activations

    weights = make_w4a4(unsigned=True)
    layer = SVDQW4A4Linear.from_weights(weights, dtype=torch.float32)
    x = torch.nn.functional.gelu(torch.randn(4, 320))
    y_int4 = layer(x)
    layer.sm90_activations = Sm90Activations.POW2
    assert torch.equal(layer(x), y_int4) and not layer.uses_pow2_activations
    # The format's groups are 64 channels: a layer quantized in groups of 128 keeps int4 as well.
    g128 = svdquant_decompose(torch.randn(256, 256) / 16, None, torch.ones(256),
                              DecomposeOptions(rank=16, group_size=128))
    wide = SVDQW4A4Linear.from_weights(g128, dtype=torch.float32)
    x128 = torch.randn(4, 256)
    y128 = wide(x128)
    wide.sm90_activations = Sm90Activations.POW2
    assert torch.equal(wide(x128), y128) and not wide.uses_pow2_activations
    with pytest.raises(ValueError, match="pow2 activation format is for signed layers only"):
        ops.w4a4_linear(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up, layer.bias,
                        act_unsigned=True, pow2_activations=True)
    signed = SVDQW4A4Linear.from_weights(make_w4a4(), dtype=torch.bfloat16)
    signed._set_layout(WeightLayout.SM80)  # as on an Ampere GPU (packing is pure PyTorch)
    signed.sm90_activations = Sm90Activations.POW2
    with pytest.raises(RuntimeError, match="Ampere/Ada .sm80. W4A4 kernels do not implement"):
        signed(torch.randn(2, 320, dtype=torch.bfloat16))

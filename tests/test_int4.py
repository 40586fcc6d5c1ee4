import pytest
import torch

from nunchaku.quant.int4 import (
    dequantize_int4,
    fake_quantize_act_int4,
    pack_int4_nibbles,
    quantize_act_int4,
    quantize_weight_int4,
    quantize_weight_uint4_asym,
    unpack_int4_nibbles,
)


@pytest.mark.parametrize("shape", [(1, 64), (3, 128), (17, 192)])
def test_weight_quantization_error_is_at_most_half_a_step(shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    codes, scales = quantize_weight_int4(w)
    assert codes.dtype == torch.int8 and scales.shape == (shape[0], shape[1] // 64)
    assert codes.min() >= -8 and codes.max() <= 7
    err = (dequantize_int4(codes, scales) - w).abs()
    step = scales.repeat_interleave(64, dim=1)
    assert (err <= step / 2 + 1e-6).all()
    # The group maximum is representable exactly (it maps to ±7).
    gmax = w.abs().reshape(shape[0], -1, 64).amax(-1)
    assert torch.allclose((scales * 7), gmax, rtol=1e-6)


def test_scale_dtype_rounding_is_consistent_with_codes():
    w = torch.randn(8, 128)
    codes, scales = quantize_weight_int4(w, scale_dtype=torch.bfloat16)
    assert scales.dtype == torch.bfloat16
    step = scales.float().repeat_interleave(64, 1)
    # Rounding the scale down may push the group maximum past code 7: that element clips by at
    # most the rounding excess, every other element stays within half a step.
    gmax = w.abs().reshape(8, 2, 64).amax(-1)
    excess = (gmax - 7 * scales.float()).clamp(min=0).repeat_interleave(64, 1)
    assert ((dequantize_int4(codes, scales) - w).abs() <= step / 2 + excess + 1e-6).all()


def test_zero_group_quantizes_to_zero_codes():
    w = torch.zeros(2, 64)
    codes, scales = quantize_weight_int4(w)
    assert (codes == 0).all() and (scales == 1).all()
    codes, scales = quantize_act_int4(torch.zeros(3, 64))
    assert (codes == 0).all()


def test_activation_quantization_signed_and_unsigned_ranges():
    v = torch.randn(5, 256) * 4
    codes, scales = quantize_act_int4(v)
    assert codes.dtype == torch.int8 and codes.min() >= -8 and codes.max() <= 7
    assert scales.shape == (5, 4)
    torch.testing.assert_close(scales, v.abs().reshape(5, 4, 64).amax(-1) / 7)
    u = v.abs()
    ucodes, uscales = quantize_act_int4(u, unsigned=True)
    assert ucodes.dtype == torch.uint8 and ucodes.max() == 15
    torch.testing.assert_close(uscales, u.reshape(5, 4, 64).amax(-1) / 15)
    # Unsigned has twice the resolution of signed on non-negative data.
    err_u = (fake_quantize_act_int4(u, unsigned=True) - u).pow(2).mean()
    err_s = (fake_quantize_act_int4(u) - u).pow(2).mean()
    assert err_u < err_s / 2


def test_rounding_is_half_to_even():
    v = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5] + [0.0] * 58])
    codes, scales = quantize_act_int4(v)
    assert scales.item() == 1.0
    assert codes[0, :6].tolist() == [7, 0, 2, 2, 0, -2]


def test_asymmetric_uint4_keeps_zero_exact_and_bounds_error():
    w = torch.randn(6, 128) + 0.5
    codes, scales, zeros = quantize_weight_uint4_asym(w, 64)
    assert codes.dtype == torch.uint8 and codes.max() <= 15
    deq = codes.float().reshape(6, 2, 64) * scales[..., None] + zeros[..., None]
    step = scales[..., None]
    assert ((deq - w.reshape(6, 2, 64)).abs() <= step / 2 + 1e-5).all()
    zero_point = -zeros / scales
    torch.testing.assert_close(zero_point, zero_point.round())


def test_nibble_packing_round_trip_and_order():
    codes = torch.randint(-8, 8, (3, 10), dtype=torch.int8)
    packed = pack_int4_nibbles(codes)
    assert packed.shape == (3, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4_nibbles(packed, signed=True), codes)
    assert pack_int4_nibbles(torch.tensor([1, 2], dtype=torch.int8)).item() == 0x21
    assert pack_int4_nibbles(torch.tensor([-1, -8], dtype=torch.int8)).item() == 0x8F
    u = torch.randint(0, 16, (4, 6), dtype=torch.uint8)
    assert torch.equal(unpack_int4_nibbles(pack_int4_nibbles(u), signed=False), u)
    with pytest.raises(ValueError, match="odd number"):
        pack_int4_nibbles(torch.zeros(3, dtype=torch.int8))


def test_group_size_mismatch_named():
    with pytest.raises(ValueError, match="100 is not a multiple of the group size 64"):
        quantize_weight_int4(torch.randn(2, 100))

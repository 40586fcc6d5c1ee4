"""The Hopper kernels' weight layout (nunchaku.ops.sm90_layout) on the CPU: the repacker, its
inverse, and the layout's definition in the module docstring (what the GEMM's threads read as
their wgmma A fragments); the kernels are checked against these in tests/gpu/test_w4a4_sm90.py."""

from __future__ import annotations

import pytest
import torch

from nunchaku.ops import reference
from nunchaku.ops.sm90_layout import (
    dequantize_act_sm90,
    pack_weights_sm90,
    pow2_group_exponent,
    reference_gemm_sm90,
    reference_quantize_act_pow2_sm90,
    reference_quantize_act_sm90,
    scale_rows_padded,
    unpack_weights_sm90,
)
from nunchaku.quant.int4 import pack_int4_nibbles


def packed_code(packed: torch.Tensor, kt: int, b: int, gi: int, w: int, lane: int, j: int, i: int) -> int:
    """Nibble i of word j of thread (warp w, lane) in group gi of block (kt, 64-channel block b)."""
    block = packed[kt, b].reshape(-1)
    byte = int(block[((gi * 4 + w) * 32 + lane) * 16 + 4 * j + i // 2])
    nib = (byte >> (4 * (i % 2))) & 0xF
    return nib - 16 if nib >= 8 else nib


@pytest.mark.parametrize("n,k", [(128, 64), (256, 192), (384, 320), (640, 1024)])
def test_pack_follows_the_documented_layout_and_unpacks_back(n, k):
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, k // 64, generator=g) + 0.5).bfloat16()
    packed, ws = pack_weights_sm90(codes, scales)
    kt_count, n_pad = (k + 127) // 128, (n + 191) // 192 * 192
    assert packed.shape == (kt_count, n_pad // 64, 64, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_weights_sm90(packed, n, k), codes)
    assert ws.shape == (2 * kt_count, n_pad) and torch.equal(ws[: k // 64, :n], scales.t())
    assert not ws[k // 64 :].any() and not ws[:, n:].any()
    # Every nibble of every thread of the first and last block, against the docstring's formula.
    for kt, b in {(0, 0), (kt_count - 1, n_pad // 64 - 1)}:
        for gi in range(2):
            for w in range(4):
                for lane in range(32):
                    for j in range(4):
                        for i in range(8):
                            ch = 64 * b + 16 * w + lane // 4 + 8 * (i // 4)
                            kk = 128 * kt + 64 * gi + 32 * (j // 2) + 16 * (j % 2) + 4 * (lane % 4) + i % 4
                            want = int(codes[ch, kk]) if kk < k and ch < n else 0
                            assert packed_code(packed, kt, b, gi, w, lane, j, i) == want


def test_reference_gemm_agrees_with_the_logical_reference():
    g = torch.Generator().manual_seed(1)
    m, k, n, r = 37, 320, 256, 32
    lc = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8)
    ls = torch.rand(m, k // 64, generator=g) * 0.1 + 0.01
    wcodes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.02 + 0.001).bfloat16()
    lora_act = torch.randn(m, r, generator=g)
    lora_up = (torch.randn(n, r, generator=g) * 0.1).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    act_codes = lc.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)
    act_scales = torch.zeros(k // 64, 384)
    act_scales[:, :m] = ls.t()
    wp, wsp = pack_weights_sm90(wcodes, wscales)
    y = reference_gemm_sm90(act_codes, act_scales, wp, wsp, lora_act, lora_up, bias, exact=True)
    y_logical = reference.w4a4_gemm(lc, ls, pack_int4_nibbles(wcodes), wscales, lora_act, lora_up, bias,
                                    torch.float32)
    torch.testing.assert_close(y.float(), y_logical, rtol=1e-4, atol=1e-4)


def test_pack_rejects_what_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="N % 128"):
        pack_weights_sm90(torch.zeros(192, 64, dtype=torch.int8), torch.ones(192, 1).bfloat16())
    with pytest.raises(ValueError, match="K % 64"):
        pack_weights_sm90(torch.zeros(128, 96, dtype=torch.int8), torch.ones(128, 1).bfloat16())
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_weights_sm90(torch.full((128, 64), 9, dtype=torch.int8), torch.ones(128, 1).bfloat16())
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        pack_weights_sm90(torch.zeros(128, 64, dtype=torch.int8), torch.ones(128, 1))


@pytest.mark.parametrize(
    "amax,e",
    [(16.0, 0), (16.000002, 1), (8.0, -1), (3.0, -2), (17.0, 1), (0.0, -100), (1e-40, -100), (2.0**-96, -100),
     (2.0**-95 * 1.5, -98), (3.0e38, 124)],
)
def test_pow2_group_exponent_is_the_smallest_that_covers_the_group(amax, e):
    got = int(pow2_group_exponent(torch.tensor([amax], dtype=torch.float32))[0])
    assert got == e
    if -100 < e:
        assert 16 * 2.0**e >= amax and 16 * 2.0 ** (e - 1) < amax


def test_pow2_reference_codes_are_the_documented_format():
    """Codes * token scale are q * 2^e exactly (q in [-16, 16], 2^e the smallest power of two with
    16 * 2^e >= the group's max), for groups down to 2^-13 of the token's largest; beyond, a
    bounded rounding; zero rows and the padding rows."""
    g = torch.Generator().manual_seed(0)
    m, k = 40, 640
    spread = torch.exp2(torch.randint(-12, 6, (m, k // 64, 1), generator=g).float())
    x = (torch.randn(m, k // 64, 64, generator=g) * spread).view(m, k).bfloat16()
    x[3] = 0
    smooth = (torch.rand(k, generator=g) + 0.5).bfloat16()
    lora_down = torch.randn(k, 16, generator=g).bfloat16()
    codes, scales, lora_act = reference_quantize_act_pow2_sm90(x, smooth, lora_down)
    assert codes.shape == (m, k) and codes.dtype == torch.uint8
    assert scales.shape == (scale_rows_padded(m),) and not scales[m:].any()
    v = (x.float() / smooth.float()).view(m, k // 64, 64)
    e = pow2_group_exponent(v.abs().amax(-1))
    q = torch.round(v / torch.exp2(e.float())[..., None])
    assert q.abs().max() <= 16
    a = dequantize_act_sm90(codes, scales).view(m, k // 64, 64)
    t = e.amax(-1, keepdim=True)
    exact_groups = (e >= t - 13)[..., None].expand_as(a)
    assert torch.equal(a[exact_groups], (q * torch.exp2(e.float())[..., None]).double()[exact_groups])
    group_max, token_max = v.abs().amax(-1).double(), v.abs().amax((1, 2)).double()
    bound = group_max / 16 + token_max[:, None] * 2.0**-17  # half a step, plus the rounding of tiny groups
    assert ((a - v.double()).abs().amax(-1) <= bound).all()
    assert not codes[3].any() and scales[3] == 2.0**-104
    assert torch.equal(scales[:m], torch.exp2(t.squeeze(-1).float() - 4))
    assert lora_act.shape == (m, 16)


def test_pow2_is_at_least_as_accurate_as_int4_per_group():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1024, generator=g).bfloat16()
    smooth = (torch.rand(1024, generator=g) + 0.5).bfloat16()
    lora_down = torch.zeros(1024, 16).bfloat16()
    v = (x.double() / smooth.double()).view(64, 16, 64)
    a2 = dequantize_act_sm90(*reference_quantize_act_pow2_sm90(x, smooth, lora_down)[:2]).view(64, 16, 64)
    a4 = dequantize_act_sm90(*reference_quantize_act_sm90(x, smooth, lora_down)[:2]).view(64, 16, 64)
    amax = v.abs().amax(-1)
    assert ((a2 - v).abs().amax(-1) <= amax / 16 * (1 + 1e-9)).all()  # int4's bound: amax / 14
    assert ((a4 - v).abs().amax(-1) <= amax / 14 * (1 + 1e-6)).all()
    assert (a2 - v).norm() < 0.8 * (a4 - v).norm()


def test_reference_gemm_takes_per_token_scales():
    g = torch.Generator().manual_seed(2)
    m, k, n = 5, 192, 128
    codes = torch.randint(-16, 17, (m, k), generator=g).float().to(torch.float8_e4m3fn).view(torch.uint8)
    scales = torch.zeros(scale_rows_padded(m))
    scales[:m] = torch.exp2(torch.randint(-8, 8, (m,), generator=g).float())
    wcodes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    wscales = (torch.rand(n, k // 64, generator=g) + 0.5).bfloat16()
    wp, wsp = pack_weights_sm90(wcodes, wscales)
    lora_act, lora_up, bias = torch.randn(m, 16, generator=g), torch.zeros(n, 16).bfloat16(), torch.zeros(n).bfloat16()
    y = reference_gemm_sm90(codes, scales, wp, wsp, lora_act, lora_up, bias, exact=True)
    a = codes.view(torch.float8_e4m3fn).double() * scales[:m, None].double()
    w = (wcodes.double().view(n, 3, 64) * wscales.double()[..., None]).view(n, k)
    torch.testing.assert_close(y, a @ w.t(), rtol=1e-12, atol=1e-12)


def test_sm90_activations_setting(monkeypatch):
    from nunchaku.ops import Sm90Activations, requested_sm90_activations

    monkeypatch.delenv("NUNCHAKU_SM90_ACTIVATIONS", raising=False)
    assert requested_sm90_activations() is Sm90Activations.INT4
    monkeypatch.setenv("NUNCHAKU_SM90_ACTIVATIONS", " POW2 ")
    assert requested_sm90_activations() is Sm90Activations.POW2
    monkeypatch.setenv("NUNCHAKU_SM90_ACTIVATIONS", "int5")
    with pytest.raises(ValueError, match="NUNCHAKU_SM90_ACTIVATIONS='int5' is not one of"):
        requested_sm90_activations()


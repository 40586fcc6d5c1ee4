"""The Ampere/Ada kernels' layouts and references (nunchaku.ops.sm80_layout) against the
logical reference (nunchaku.ops.reference), on the CPU; the kernels themselves are checked
against these references in tests/gpu/test_w4a4_sm80.py."""

from __future__ import annotations

import pytest
import torch

from nunchaku import ops
from nunchaku.nn import SVDQW4A4Linear
from nunchaku.nn.linear import WeightLayout
from nunchaku.ops import reference
from nunchaku.ops.sm80_layout import (
    pack_weights_sm80,
    reference_gemm_sm80,
    reference_quantize_act_sm80,
    unpack_weights_sm80,
)
from nunchaku.quant.int4 import pack_int4_nibbles, unpack_int4_nibbles
from nunchaku.quant.svdquant import svdquant_decompose


def operands(m=37, k=320, n=256, r=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(m, k, generator=g).bfloat16(),
        "wcodes": torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8),
        "wscales": (torch.rand(n, k // 64, generator=g) * 0.02 + 0.001).bfloat16(),
        "smooth": (torch.rand(k, generator=g) + 0.5).bfloat16(),
        "lora_down": (torch.randn(k, r, generator=g) / k**0.5).bfloat16(),
        "lora_up": (torch.randn(n, r, generator=g) * 0.1).bfloat16(),
        "bias": torch.randn(n, generator=g).bfloat16(),
    }


@pytest.mark.parametrize("act_unsigned", [False, True])
def test_references_agree_with_the_logical_reference(act_unsigned):
    o = operands()
    x = torch.nn.functional.gelu(o["x"]) if act_unsigned else o["x"]
    codes, scales, lora_act = reference_quantize_act_sm80(x, o["smooth"], o["lora_down"], act_unsigned)
    lc, ls, la = reference.w4a4_quantize_act_fuse_lora(x, o["smooth"], o["lora_down"], act_unsigned)
    m = x.shape[0]
    assert codes.shape == (m, x.shape[1] // 2) and codes.dtype == torch.uint8
    assert torch.equal(unpack_int4_nibbles(codes, signed=not act_unsigned).to(torch.int16), lc.to(torch.int16))
    assert torch.equal(scales[:, :m].t(), ls) and not scales[:, m:].any()
    torch.testing.assert_close(lora_act, la, rtol=1e-5, atol=1e-5)

    wc, ws = pack_weights_sm80(pack_int4_nibbles(o["wcodes"]), o["wscales"])
    assert ws.shape == (320 // 64, 256)
    y = reference_gemm_sm80(codes, scales, wc, ws, lora_act, o["lora_up"], o["bias"], act_unsigned, exact=True)
    y_logical = reference.w4a4_gemm(lc, ls, pack_int4_nibbles(o["wcodes"]), o["wscales"], la, o["lora_up"],
                                    o["bias"], torch.float32)
    torch.testing.assert_close(y.float(), y_logical, rtol=1e-4, atol=1e-4)
    codes_back, scales_back = unpack_weights_sm80(wc, ws)
    assert torch.equal(codes_back, o["wcodes"]) and torch.equal(scales_back, o["wscales"])


def test_pack_rejects_what_the_kernel_cannot_take():
    o = operands(n=192)
    with pytest.raises(ValueError, match="N % 128 == 0"):
        pack_weights_sm80(pack_int4_nibbles(o["wcodes"]), o["wscales"])
    o = operands()
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        pack_weights_sm80(pack_int4_nibbles(o["wcodes"]), o["wscales"].float())
    with pytest.raises(ValueError, match=r"wscales must be \[N, K/64\]"):
        pack_weights_sm80(pack_int4_nibbles(o["wcodes"]), o["wscales"].t())


def test_module_round_trips_through_the_sm80_layout():
    w = svdquant_decompose(torch.randn(256, 320), torch.randn(256), torch.rand(320) + 0.5)
    layer = SVDQW4A4Linear.from_weights(w)
    x = torch.randn(5, 320)
    before = layer(x)
    layer._set_layout(WeightLayout.SM80)  # what a move to an Ampere/Ada GPU does
    assert layer.qweight.shape == (256, 160) and layer.wscales.shape == (5, 256)
    back = layer.to_weights()
    assert torch.equal(back.qweight, w.qweight) and torch.equal(back.wscales, w.wscales.to(torch.bfloat16))
    layer.to("cpu")  # the CPU runs the reference: back to its layout, same output
    assert layer.weight_layout is WeightLayout.NIBBLES
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)


def test_kernel_family_choice_is_validated(monkeypatch):
    monkeypatch.setenv("NUNCHAKU_W4A4_KERNELS", "sm75")
    with pytest.raises(ValueError, match="NUNCHAKU_W4A4_KERNELS='sm75' is not one of"):
        ops.requested_w4a4_kernels()
    monkeypatch.setenv("NUNCHAKU_W4A4_KERNELS", "SM80")
    assert ops.requested_w4a4_kernels() is ops.W4A4Kernels.SM80
    kernels, problem = ops.w4a4_kernel_problem(torch.device("cpu"), 128, 64, 32, ops.W4A4Kernels.SM80)
    assert kernels is None and "not a CUDA GPU" in problem


def test_kernels_refuse_groups_other_than_64(monkeypatch):
    """A layer quantized in groups of 128 stays on the reference path on a GPU with kernels (the
    kernels' layouts and scales are per 64 channels), with the reason; 64 is accepted. The GPU
    is simulated (no CUDA here): only the capability query is answered."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "simulated Hopper")
    cuda = torch.device("cuda", 0)
    kernels, problem = ops.w4a4_kernel_problem(cuda, 256, 256, 32, None, torch.bfloat16, group_size=128)
    assert kernels is None and "groups of 64 channels, the layer's groups are 128" in problem
    kernels, problem = ops.w4a4_kernel_problem(cuda, 256, 256, 32, None, torch.bfloat16, group_size=64)
    assert problem is None or "nunchaku._C is not built" in problem  # the last check: the extension

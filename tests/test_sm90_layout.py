"""The Hopper kernels' weight layout (nunchaku.ops.sm90_layout) on the CPU: the repacker, its
inverse, and the layout's definition in the module docstring (what the GEMM's threads read as
their wgmma A fragments); the kernels are checked against these in tests/gpu/test_w4a4_sm90.py."""

from __future__ import annotations

import pytest
import torch

from nunchaku.ops import reference
from nunchaku.ops.sm90_layout import pack_weights_sm90, reference_gemm_sm90, unpack_weights_sm90
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

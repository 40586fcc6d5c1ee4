"""GPU tests of the sm_90a W4A4 ops against the references in nunchaku.ops.sm90_layout (error
measure: tests/gpu/w4a4_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from w4a4_helpers import (
    FLUX_KN,
    check_close,
    check_cuda_graph_replay,
    check_gelu_epilogue,
    random_layer,
    rel_err,
)

from nunchaku.ops import sm90
from nunchaku.ops.sm90_layout import (
    pack_weights_sm90,
    reference_gemm_sm90,
    reference_quantize_act_sm90,
    scale_rows_padded,
)

pytestmark = pytest.mark.usefixtures("needs_sm90")

def make_layer(k: int, n: int, r: int, dtype: torch.dtype, gen: torch.Generator):
    layer = random_layer(k, n, r, dtype, gen)
    layer["wp"], layer["wsp"] = pack_weights_sm90(layer.pop("wcodes"), layer.pop("wscales"))
    return layer


def run_quantize(x, smooth, lora_down, act_unsigned):
    """Call the op on poisoned outputs (NaN / 0xFF bytes) so unwritten elements show."""
    m, k = x.shape
    codes = torch.full((m, k), 0xFF, dtype=torch.uint8, device=x.device)  # e4m3 NaN
    scales = torch.full((k // 64, scale_rows_padded(m)), float("nan"), device=x.device)
    lora_act = torch.full((m, lora_down.shape[1]), float("nan"), device=x.device)
    torch.ops.nunchaku.w4a4_quantize_act_sm90(x, smooth, lora_down, act_unsigned, codes, scales, lora_act)
    return codes, scales, lora_act


def run_gemm(codes, scales, wp, wsp, lora_act, lora_up, bias, gelu_from=None):
    out = torch.full((codes.shape[0], lora_up.shape[0]), float("nan"), device=codes.device, dtype=lora_up.dtype)
    gelu_from = out.shape[1] if gelu_from is None else gelu_from
    torch.ops.nunchaku.w4a4_gemm_sm90(codes, scales, wp, wsp, lora_act, lora_up, bias, gelu_from, out)
    return out


def check_gemm(x, layer, label, quantize=reference_quantize_act_sm90):
    """The GEMM on a reference quantizer's output (int4 by default; reference_quantize_act_pow2_sm90
    for the pow2 format) against the float64 reference."""
    codes, scales, lora_act = quantize(x, layer["smooth"], layer["lora_down"])
    out = run_gemm(codes, scales, layer["wp"], layer["wsp"], lora_act, layer["lora_up"], layer["bias"])
    exact = reference_gemm_sm90(codes, scales, layer["wp"], layer["wsp"], lora_act, layer["lora_up"], layer["bias"],
                                exact=True)
    check_close(out, exact, x.dtype, label)


@pytest.mark.parametrize("act_unsigned", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 192), (257, 3072), (4608, 3072), (130, 12288)])
def test_quantize_matches_reference(m, k, dtype, act_unsigned):
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + k)
    x = (torch.randn(m, k, generator=gen, device="cuda") * 2).to(dtype)
    layer = make_layer(k, 128, 32, dtype, gen)
    codes, scales, lora_act = run_quantize(x, layer["smooth"], layer["lora_down"], act_unsigned)
    rc, rs, rl = reference_quantize_act_sm90(x, layer["smooth"], layer["lora_down"], act_unsigned)
    torch.testing.assert_close(scales, rs, rtol=0, atol=0)
    mismatch = (codes != rc).sum().item()
    assert mismatch == 0, f"{mismatch} of {codes.numel()} codes differ"
    assert rel_err(lora_act, rl) < 1e-5


@pytest.mark.parametrize("k", [3072, 320])  # 320: 5 groups, split unevenly across the cluster
def test_quantize_rank128(k):
    """Rank 128 (the largest; 3 ring stages) and a K whose groups do not split evenly."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(1000, k, generator=gen, device="cuda").to(torch.bfloat16)
    layer = make_layer(k, 128, 128, torch.bfloat16, gen)
    codes, scales, lora_act = run_quantize(x, layer["smooth"], layer["lora_down"], False)
    rc, rs, rl = reference_quantize_act_sm90(x, layer["smooth"], layer["lora_down"])
    assert torch.equal(codes, rc) and torch.equal(scales, rs)
    assert rel_err(lora_act, rl) < 1e-5


def test_quantize_noncontiguous_x_and_rank64():
    gen = torch.Generator(device="cuda").manual_seed(1)
    base = torch.randn(300, 2 * 3072 + 64, generator=gen, device="cuda").to(torch.bfloat16)
    x = base[::2, 64 : 64 + 3072]  # row stride 2*(2*3072+64), offset start: not contiguous
    assert not x.is_contiguous()
    layer = make_layer(3072, 128, 64, torch.bfloat16, gen)
    codes, scales, lora_act = sm90.w4a4_quantize_act_sm90(x, layer["smooth"], layer["lora_down"])
    rc, rs, rl = reference_quantize_act_sm90(x, layer["smooth"], layer["lora_down"])
    assert torch.equal(codes, rc) and torch.equal(scales, rs)
    assert rel_err(lora_act, rl) < 1e-5
    xt = torch.randn(3072, 40, generator=gen, device="cuda").to(torch.bfloat16).t()  # stride(1) != 1
    codes, scales, _ = sm90.w4a4_quantize_act_sm90(xt, layer["smooth"], layer["lora_down"])
    rc, rs, _ = reference_quantize_act_sm90(xt, layer["smooth"], layer["lora_down"])
    assert torch.equal(codes, rc) and torch.equal(scales, rs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 257, 4608])
@pytest.mark.parametrize("k,n", FLUX_KN)
def test_gemm_matches_reference(m, k, n, dtype, gemm_tile):
    if m == 4608 and (k, n) not in [(3072, 3072), (15360, 3072)]:
        pytest.skip("large-M check limited to two shapes to keep the run short")
    gen = torch.Generator(device="cuda").manual_seed(m + k + n)
    layer = make_layer(k, n, 32, dtype, gen)
    x = (torch.randn(m, k, generator=gen, device="cuda")).to(dtype)
    check_gemm(x, layer, f"gemm m={m} k={k} n={n} {dtype}")


@pytest.mark.parametrize("act_unsigned", [False, True])
@pytest.mark.parametrize("m,k,n", [(3, 64, 128), (129, 192, 256), (300, 320, 384), (500, 192, 256), (1000, 3072, 3072)])
def test_fused_layer_odd_k(m, k, n, act_unsigned, gemm_tile):
    """Quantize + GEMM end to end, K not a multiple of 128 included (odd group count), partial last
    token tiles and channel tiles (N not a multiple of the GEMM's 192) included."""
    gen = torch.Generator(device="cuda").manual_seed(m * k + n)
    dtype = torch.bfloat16
    layer = make_layer(k, n, 32, dtype, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    out = sm90.w4a4_linear_sm90(x, layer["smooth"], layer["lora_down"], layer["wp"], layer["wsp"],
                                layer["lora_up"], layer["bias"], act_unsigned)
    codes, scales, lora_act = reference_quantize_act_sm90(x, layer["smooth"], layer["lora_down"], act_unsigned)
    exact = reference_gemm_sm90(codes, scales, layer["wp"], layer["wsp"], lora_act, layer["lora_up"], layer["bias"],
                                exact=True)
    check_close(out, exact, dtype, f"fused m={m} k={k} n={n} unsigned={act_unsigned}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [16, 48, 64, 96, 112, 128])
@pytest.mark.parametrize("m,k", [(500, 64), (257, 320), (500, 3072), (192, 256)])
def test_gemm_ranks(m, k, rank, dtype, gemm_tile):
    """Every rank the quantizer makes, with short K (K = 64: one stage; K = 320: three stages), long
    K, a full and a partial last token tile."""
    gen = torch.Generator(device="cuda").manual_seed(m + k + rank)
    layer = make_layer(k, 384, rank, dtype, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    check_gemm(x, layer, f"gemm m={m} k={k} rank={rank} {dtype}")


@pytest.mark.parametrize("k", [64, 320, 704, 3072])  # 1, 3 and 6 (odd group counts) and 24 stages a tile
def test_gemm_more_tiles_than_sms(k, gemm_tile):
    """Several waves of tiles, each with 1, 3 or 6 (the last one half empty: 6 also wraps the
    5-stage ring) or 24 stages."""
    tokens, channels = gemm_tile
    m, n = tokens * 17 + 50, 3072  # 18 x (3072 / channels) tiles, the last token tile partial
    assert -(-m // tokens) * (n // channels) > torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(k)
    dtype = torch.bfloat16
    layer = make_layer(k, n, 32, dtype, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    check_gemm(x, layer, f"gemm m={m} k={k} n={n}")


def test_gemm_infinite_scales_stay_in_their_rows(gemm_tile):
    """Rows with infinite activation scales (an overflowing input) give non-finite outputs in those
    rows only (the empty second group of an odd group count must not read a scale slot that no
    copy filled: 0 * inf)."""
    tokens, _ = gemm_tile
    m, k, n = tokens * 18, 704, 3072  # odd group count, the ring wrapped: the empty group is skipped
    inf_rows = tokens + tokens // 2  # the first token tile and half of the second
    gen = torch.Generator(device="cuda").manual_seed(7)
    dtype = torch.bfloat16
    layer = make_layer(k, n, 32, dtype, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    codes, scales, lora_act = reference_quantize_act_sm90(x, layer["smooth"], layer["lora_down"])
    scales[:, :inf_rows] = float("inf")
    out = run_gemm(codes, scales, layer["wp"], layer["wsp"], lora_act, layer["lora_up"], layer["bias"])
    exact = reference_gemm_sm90(codes[inf_rows:], scales[:, inf_rows:], layer["wp"], layer["wsp"],
                                lora_act[inf_rows:], layer["lora_up"], layer["bias"], exact=True)
    assert not torch.isfinite(out[:inf_rows]).all()
    check_close(out[inf_rows:], exact, dtype, "rows after the infinite-scale rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gelu_from", [0, 130, 256, 384])  # all, mid n8 block, a 128-channel boundary, none
def test_gemm_gelu_epilogue(gelu_from, dtype, gemm_tile):
    gen = torch.Generator(device="cuda").manual_seed(gelu_from)
    layer = make_layer(192, 384, 32, dtype, gen)
    x = (torch.randn(257, 192, generator=gen, device="cuda") * 2).to(dtype)
    codes, scales, lora_act = sm90.w4a4_quantize_act_sm90(x, layer["smooth"], layer["lora_down"])
    args = (codes, scales, layer["wp"], layer["wsp"], lora_act, layer["lora_up"], layer["bias"])
    check_gelu_epilogue(run_gemm(*args), run_gemm(*args, gelu_from=gelu_from), gelu_from)
    with pytest.raises(RuntimeError, match=r"gelu_from = 131 must be an even column index in \[0, N = 384\]"):
        run_gemm(*args, gelu_from=131)


def test_gemm_rejects_bad_arguments():
    gen = torch.Generator(device="cuda").manual_seed(3)
    layer = make_layer(256, 128, 32, torch.bfloat16, gen)
    x = torch.randn(8, 256, generator=gen, device="cuda").to(torch.bfloat16)
    codes, scales, lora_act = sm90.w4a4_quantize_act_sm90(x, layer["smooth"], layer["lora_down"])
    out = torch.empty(8, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="wscales_packed"):
        torch.ops.nunchaku.w4a4_gemm_sm90(codes, scales, layer["wp"], layer["wsp"][:2], lora_act,
                                          layer["lora_up"], layer["bias"], 128, out)
    with pytest.raises(RuntimeError, match="lora_up"):
        torch.ops.nunchaku.w4a4_gemm_sm90(codes, scales, layer["wp"], layer["wsp"], lora_act,
                                          layer["lora_up"].half(), layer["bias"], 128, out)
    with pytest.raises(RuntimeError, match=r"act_scales \(per group and token; 1-D \[M_pad\] for pow2 codes\) "
                                           r"must have shape \[4, 384\]"):
        torch.ops.nunchaku.w4a4_gemm_sm90(codes, scales[:, :192].contiguous(), layer["wp"], layer["wsp"], lora_act,
                                          layer["lora_up"], layer["bias"], 128, out)
    with pytest.raises(RuntimeError, match="K = 100"):
        torch.ops.nunchaku.w4a4_quantize_act_sm90(x[:, :100], layer["smooth"][:100], layer["lora_down"][:100], False,
                                                  codes[:, :100], scales, lora_act)
    with pytest.raises(RuntimeError, match="M = 8388609 tokens is more than the 8388480"):
        torch.ops.nunchaku.w4a4_gemm_sm90(torch.empty(8388609, 256, device="cuda", dtype=torch.uint8), scales,
                                          layer["wp"], layer["wsp"], lora_act, layer["lora_up"], layer["bias"], 128,
                                          out)
    with pytest.raises(RuntimeError, match="rank R = 144"):
        torch.ops.nunchaku.w4a4_gemm_sm90(codes, scales, layer["wp"], layer["wsp"], torch.zeros(8, 144, device="cuda"),
                                          torch.zeros(128, 144, device="cuda", dtype=torch.bfloat16), layer["bias"], 128,
                                          out)


def test_gemm_rejects_an_unknown_forced_tile(monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(4)
    layer = make_layer(256, 128, 32, torch.bfloat16, gen)
    x = torch.randn(8, 256, generator=gen, device="cuda").to(torch.bfloat16)
    codes, scales, lora_act = sm90.w4a4_quantize_act_sm90(x, layer["smooth"], layer["lora_down"])
    monkeypatch.setenv("NUNCHAKU_SM90_GEMM_TILE", "256x128")
    with pytest.raises(RuntimeError, match="NUNCHAKU_SM90_GEMM_TILE must be 192x128 or 128x192"):
        run_gemm(codes, scales, layer["wp"], layer["wsp"], lora_act, layer["lora_up"], layer["bias"])


@pytest.mark.parametrize("pow2", [False, True], ids=["int4", "pow2"])
def test_opcheck(pow2):
    """Both quantize ops (the pow2 one has no act_unsigned argument) and the GEMM on their output."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    layer = make_layer(192, 256, 32, torch.bfloat16, gen)
    x = torch.randn(33, 192, generator=gen, device="cuda").to(torch.bfloat16)
    if pow2:
        codes, scales, lora_act = sm90.w4a4_quantize_act_pow2_sm90(x, layer["smooth"], layer["lora_down"])
        quantize_op, flags = torch.ops.nunchaku.w4a4_quantize_act_pow2_sm90.default, ()
    else:
        codes, scales, lora_act = sm90.w4a4_quantize_act_sm90(x, layer["smooth"], layer["lora_down"])
        quantize_op, flags = torch.ops.nunchaku.w4a4_quantize_act_sm90.default, (False,)
    torch.library.opcheck(
        quantize_op,
        (x, layer["smooth"], layer["lora_down"], *flags, torch.empty_like(codes), torch.empty_like(scales),
         torch.empty_like(lora_act)),
    )
    out = torch.empty(33, 256, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(
        torch.ops.nunchaku.w4a4_gemm_sm90.default,
        (codes, scales, layer["wp"], layer["wsp"], lora_act, layer["lora_up"], layer["bias"], 100, out),
    )


@pytest.mark.parametrize("pow2", [False, True], ids=["int4", "pow2"])
def test_cuda_graph_capture(gemm_tile, pow2):
    gen = torch.Generator(device="cuda").manual_seed(9)
    layer = make_layer(3072, 3072, 32, torch.bfloat16, gen)
    x = torch.randn(200, 3072, generator=gen, device="cuda").to(torch.bfloat16)
    args = (layer["smooth"], layer["lora_down"], layer["wp"], layer["wsp"], layer["lora_up"], layer["bias"])
    check_cuda_graph_replay(lambda t: sm90.w4a4_linear_sm90(t, *args, pow2_activations=pow2), x, gen)

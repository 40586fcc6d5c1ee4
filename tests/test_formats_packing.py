"""Packing of the SVDQuant byte layouts: ground-truth vectors (both directions, bit for bit), the
README index formulas on index-tagged inputs, and round trips on random shapes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from nunchaku.formats import packing as P
from nunchaku.quant.weights import W4A4Weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality, dtype and shape included (works for float8 too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1 and a.is_floating_point():
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


_CACHE: dict[str, dict[str, torch.Tensor]] = {}


@pytest.fixture
def vectors(shared_testdata):
    def load(name):
        path = str(shared_testdata / "nunchaku_formats" / name)
        if path not in _CACHE:
            _CACHE[path] = load_file(path)
        return _CACHE[path]

    return load


# ---------------------------------------------------------------------------------------------
# ground-truth vectors


@pytest.mark.parametrize("case", ["case0", "case1"])
def test_int4_vectors_unpack(vectors, case):
    t = vectors("w4a4_int4.safetensors")
    q = t[f"{case}.plain.weight_int4"]
    n, k = q.shape
    assert _same(P.unpack_w4a4_qweight(t[f"{case}.qweight"], n, k), q)
    assert _same(P.unpack_w4a4_wscales(t[f"{case}.wscales"], n, k // 64), t[f"{case}.plain.wscales"])
    assert _same(P.unpack_scale_vector(t[f"{case}.bias"], n), t[f"{case}.plain.bias"])
    assert _same(P.unpack_scale_vector(t[f"{case}.smooth"], k), t[f"{case}.plain.smooth"])
    assert _same(P.unpack_scale_vector(t[f"{case}.smooth_orig"], k), t[f"{case}.plain.smooth"])
    assert _same(P.unpack_lora_down(t[f"{case}.lora_down"], k), t[f"{case}.plain.lora_down"])
    assert _same(P.unpack_lora_up(t[f"{case}.lora_up"], n), t[f"{case}.plain.lora_up"])


@pytest.mark.parametrize("case", ["case0", "case1"])
def test_int4_vectors_pack(vectors, case):
    """Packers reproduce the stored tensors, padding values of case1 included."""
    t = vectors("w4a4_int4.safetensors")
    assert _same(P.pack_w4a4_qweight(t[f"{case}.plain.weight_int4"]), t[f"{case}.qweight"])
    assert _same(P.pack_w4a4_wscales(t[f"{case}.plain.wscales"]), t[f"{case}.wscales"])
    assert _same(P.pack_scale_vector(t[f"{case}.plain.bias"]), t[f"{case}.bias"])
    assert _same(P.pack_scale_vector(t[f"{case}.plain.smooth"]), t[f"{case}.smooth"])
    assert _same(P.pack_scale_vector(t[f"{case}.plain.smooth"]), t[f"{case}.smooth_orig"])
    assert _same(P.pack_lora_down(t[f"{case}.plain.lora_down"]), t[f"{case}.lora_down"])
    assert _same(P.pack_lora_up(t[f"{case}.plain.lora_up"]), t[f"{case}.lora_up"])


def test_int4_case1_padding_values(vectors):
    t = vectors("w4a4_int4.safetensors")
    k = t["case1.plain.smooth"].shape[0]
    assert (k, t["case1.smooth"].shape[0]) == (192, 256)
    full = P.unpack_scale_vector(t["case1.smooth"])
    assert torch.all(full[k:] == 1.0)
    assert torch.all(P.unpack_w4a4_wscales(t["case1.wscales"])[:, 3:] == 1.0)
    assert torch.all(P.unpack_lora_down(t["case1.lora_down"])[k:] == 0.0)
    assert torch.all(P.unpack_w4a4_qweight(t["case1.qweight"])[:, k:] == 0)


@pytest.mark.parametrize("case", ["case0", "case1"])
def test_int4_vectors_semantics(vectors, case):
    """The unpacked layer computes ref.y_noactquant (README 3.1) and lora_down is the
    un-smoothed DeepCompressor branch."""
    t = vectors("w4a4_int4.safetensors")
    n, k = t[f"{case}.plain.weight_int4"].shape
    w = W4A4Weights(
        qweight=P.unpack_w4a4_qweight(t[f"{case}.qweight"], n, k),
        wscales=P.unpack_w4a4_wscales(t[f"{case}.wscales"], n, k // 64),
        smooth=P.unpack_scale_vector(t[f"{case}.smooth"], k),
        lora_down=P.unpack_lora_down(t[f"{case}.lora_down"], k),
        lora_up=P.unpack_lora_up(t[f"{case}.lora_up"], n),
        bias=P.unpack_scale_vector(t[f"{case}.bias"], n),
    )
    x = t[f"{case}.ref.x"].double()
    main = w.qweight.double() * w.wscales.double().repeat_interleave(64, dim=1)
    y = (x / w.smooth.double()) @ main.T + (x @ w.lora_down.double()) @ w.lora_up.double().T + w.bias.double()
    torch.testing.assert_close(y.float(), t[f"{case}.ref.y_noactquant"], rtol=1e-6, atol=1e-6)
    src = t[f"{case}.src.lowrank_down_smoothed"].double()
    assert _same((src / w.smooth.double()[None, :]).T.to(torch.bfloat16), w.lora_down)


def test_nvfp4_vectors(vectors):
    t = vectors("w4a4_nvfp4.safetensors")
    c = "fp4case0"
    codes = t[f"{c}.plain.weight_fp4_codes"]
    n, k = codes.shape
    assert _same(P.pack_w4a4_qweight(codes), t[f"{c}.qweight"])
    assert _same(P.unpack_w4a4_qweight(t[f"{c}.qweight"], n, k, signed=False), codes)
    assert _same(P.pack_nvfp4_wscales(t[f"{c}.plain.wscales"]), t[f"{c}.wscales"])
    assert _same(P.unpack_nvfp4_wscales(t[f"{c}.wscales"], n, k // 16), t[f"{c}.plain.wscales"])
    assert _same(P.pack_scale_vector(t[f"{c}.plain.wcscales"]), t[f"{c}.wcscales"])
    assert _same(P.unpack_scale_vector(t[f"{c}.wcscales"], n), t[f"{c}.plain.wcscales"])
    for name, length in (("bias", n), ("smooth", k)):
        assert _same(P.pack_scale_vector(t[f"{c}.plain.{name}"]), t[f"{c}.{name}"])
        assert _same(P.unpack_scale_vector(t[f"{c}.{name}"], length), t[f"{c}.plain.{name}"])
    assert _same(P.pack_scale_vector(t[f"{c}.plain.smooth"]), t[f"{c}.smooth_orig"])
    assert _same(P.pack_lora_down(t[f"{c}.plain.lora_down"]), t[f"{c}.lora_down"])
    assert _same(P.pack_lora_up(t[f"{c}.plain.lora_up"]), t[f"{c}.lora_up"])
    assert _same(P.unpack_lora_down(t[f"{c}.lora_down"], k), t[f"{c}.plain.lora_down"])
    assert _same(P.unpack_lora_up(t[f"{c}.lora_up"], n), t[f"{c}.plain.lora_up"])


def _awq_zeros(scales: torch.Tensor, zero_point) -> torch.Tensor:
    """wzeros / scaled_zeros = -(z * s), computed in fp32 and rounded to the dtype (README 3.6/3.7)."""
    return (-(torch.as_tensor(zero_point).float() * scales.float())).to(scales.dtype)


@pytest.mark.parametrize("case,splits", [("adanorm_zero", 6), ("adanorm_single", 3), ("awq_g64", None)])
def test_awq_g64_vectors(vectors, case, splits):
    t = vectors("w4a16_awq.safetensors")
    codes, scales, bias = (t[f"{case}.plain.{k}"] for k in ("weight_uint4", "wscales", "bias"))
    zeros = _awq_zeros(scales, 7)

    def stored_order(x):
        return x if splits is None else P.adanorm_interleave(x, splits)

    def original_order(x):
        return x if splits is None else P.adanorm_deinterleave(x, splits)

    # pack: plain -> stored, bit for bit
    assert _same(P.pack_awq_qweight(stored_order(codes)), t[f"{case}.qweight"])
    assert _same(P.pack_awq_scales(stored_order(scales)), t[f"{case}.wscales"])
    assert _same(P.pack_awq_scales(stored_order(zeros)), t[f"{case}.wzeros"])
    packed_bias = stored_order(bias) if splits is None else P.pack_adanorm_bias(bias, splits)
    assert _same(packed_bias, t[f"{case}.bias"])

    # unpack: stored -> plain
    groups = codes.shape[1] // 64
    assert _same(original_order(P.unpack_awq_qweight(t[f"{case}.qweight"])), codes)
    assert _same(original_order(P.unpack_awq_scales(t[f"{case}.wscales"], groups)), scales)
    assert _same(original_order(P.unpack_awq_scales(t[f"{case}.wzeros"], groups)), zeros)
    if splits is None:
        assert _same(t[f"{case}.bias"], bias)
        return
    unpacked = P.unpack_adanorm_bias(t[f"{case}.bias"], splits)
    assert unpacked.dtype == torch.float32
    # +1 was added in bf16, so the scale chunks only come back as round_bf16(b + 1) - 1; the
    # other chunks come back exactly.
    scale_rows = torch.zeros(bias.shape[0], dtype=torch.bool)
    c = bias.shape[0] // splits
    for s in P.ADANORM_SCALE_CHUNKS[splits]:
        scale_rows[s * c : (s + 1) * c] = True
    expected = torch.where(scale_rows, (bias.float() + 1).to(torch.bfloat16).float() - 1, bias.float())
    assert torch.equal(unpacked, expected)
    assert torch.equal(unpacked[~scale_rows], bias.float()[~scale_rows])
    # and packing the float32 bias again gives the stored bytes back exactly
    assert _same(P.pack_adanorm_bias(unpacked, splits, torch.bfloat16), t[f"{case}.bias"])


def test_t5_g128_vectors(vectors):
    t = vectors("w4a16_awq.safetensors")
    codes, scales, zp = t["t5_g128.plain.weight_uint4"], t["t5_g128.plain.scales"], t["t5_g128.plain.zeros"]
    assert _same(P.pack_awq_qweight(codes, torch.int16), t["t5_g128.qweight"])
    assert _same(P.unpack_awq_qweight(t["t5_g128.qweight"]), codes)
    assert _same(P.pack_awq_scales(scales), t["t5_g128.scales"])
    assert _same(P.pack_awq_scales(_awq_zeros(scales, zp)), t["t5_g128.scaled_zeros"])
    s = P.unpack_awq_scales(t["t5_g128.scales"], 8)
    assert _same(s, scales)
    z = -P.unpack_awq_scales(t["t5_g128.scaled_zeros"], 8).float() / s.float()
    assert torch.equal(z, z.round()) and _same(z.to(torch.uint8), zp)
    # the int16 and int32 AWQ layouts are the same bytes
    assert torch.equal(P.pack_awq_qweight(codes, torch.int32).view(torch.int16).reshape(32, 1024), t["t5_g128.qweight"])


# ---------------------------------------------------------------------------------------------
# README section 4 formulas, position by position on index-tagged inputs


def _grid(rows: int, cols: int):
    return torch.arange(rows)[:, None].expand(rows, cols), torch.arange(cols)[None, :].expand(rows, cols)


def _nibble_sources(pack, rows: int, cols: int, signed: bool) -> torch.Tensor:
    """For every stored nibble, the flat logical index it came from: the index is tagged 4 bits
    (one nibble plane) at a time, each plane packed separately."""
    idx = torch.arange(rows * cols).reshape(rows, cols)
    source = None
    for plane in range((rows * cols - 1).bit_length() // 4 + 1):
        c = ((idx >> (4 * plane)) & 15).to(torch.uint8)
        codes = ((c.to(torch.int16) ^ 8) - 8).to(torch.int8) if signed else c
        stream = P.unpack_nibbles(pack(codes).contiguous().view(torch.uint8).reshape(-1)).long()
        source = stream << (4 * plane) if source is None else source | (stream << (4 * plane))
    return source


@pytest.mark.parametrize("n,k", [(128, 128), (256, 384), (384, 256)])
def test_qweight_formula(n, k):
    src = _nibble_sources(P.pack_w4a4_qweight, n, k, signed=True)
    nn, kk = _grid(n, k)
    word = (
        ((((nn // 128 * (k // 64) + kk // 64) * 8 + (nn % 128) // 16) * 8 + nn % 8) * 4 + (kk % 32) // 8) * 4
        + ((nn % 16) // 8) * 2
        + (kk % 64) // 32
    )
    pos = word * 8 + kk % 8
    assert torch.equal(src[pos], nn * k + kk)


@pytest.mark.parametrize("n,k", [(4, 64), (8, 128), (12, 256)])
def test_awq_formula(n, k):
    src = _nibble_sources(P.pack_awq_qweight, n, k, signed=False)
    nn, kk = _grid(n, k)
    word = ((nn // 4 * (k // 64) + kk // 64) * 4 + nn % 4) * 8 + ((kk % 64) // 32) * 4 + (kk % 8) // 2
    pos = word * 8 + (kk % 2) * 4 + (kk % 32) // 8
    assert torch.equal(src[pos], nn * k + kk)
    unit = ((nn // 4 * (k // 64) + kk // 64) * 4 + nn % 4) * 16 + ((kk % 64) // 32) * 8 + kk % 8
    assert torch.equal(src[unit * 4 + (kk % 32) // 8], nn * k + kk)


@pytest.mark.parametrize("n,g", [(128, 1), (256, 2), (384, 6)])
def test_scale_formula(n, g):
    tags = torch.arange(n * g, dtype=torch.float32).reshape(n, g)
    packed = (P.pack_w4a4_wscales(tags) if g > 1 else P.pack_scale_vector(tags[:, 0])).reshape(-1)
    nn, gg = _grid(n, g)
    f = ((nn // 128) * g + gg) * 128 + ((nn % 128) // 16) * 16 + ((nn % 8) // 2) * 4 + ((nn % 16) // 8) * 2 + nn % 2
    assert torch.equal(packed[f], tags)


@pytest.mark.parametrize("n,g16", [(128, 8), (256, 16), (384, 24)])
def test_nvfp4_scale_formula(n, g16):
    tags = torch.arange(n * g16, dtype=torch.float32).reshape(n, g16)
    packed = P.pack_nvfp4_wscales(tags)
    assert packed.shape == (g16, n)
    nn, gg = _grid(n, g16)
    m = nn % 128
    f = (((nn // 128) * (g16 // 4) + gg // 4) * 32 + (m % 8) * 4 + (m % 32) // 8) * 16 + (m // 32) * 4 + gg % 4
    assert torch.equal(packed.reshape(-1)[f], tags)
    assert torch.equal(P.unpack_nvfp4_wscales(packed), tags)


def _within(a, b):
    return (a % 8) * 32 + ((b % 8) // 2) * 8 + (a // 8) * 4 + (b // 8) * 2 + b % 2


@pytest.mark.parametrize("rows,r", [(128, 16), (256, 32), (384, 48)])
def test_lora_formulas(rows, r):
    tags = torch.arange(rows * r, dtype=torch.float32).reshape(rows, r)
    xx, jj = _grid(rows, r)
    down = P.pack_lora_down(tags).reshape(-1)
    f = ((xx // 16) * (r // 16) + jj // 16) * 256 + _within(jj % 16, xx % 16)
    assert torch.equal(down[f], tags)
    up = P.pack_lora_up(tags).reshape(-1)
    f = ((xx // 16) * (r // 16) + jj // 16) * 256 + _within(xx % 16, jj % 16)
    assert torch.equal(up[f], tags)


# ---------------------------------------------------------------------------------------------
# round trips on random shapes


SHAPES = [(128, 128, 16), (256, 384, 32), (384, 128, 48), (640, 256, 32), (192, 320, 16), (200, 64, 48)]


@pytest.mark.parametrize("n,k,r", SHAPES)
def test_w4a4_round_trip(n, k, r):
    g = torch.Generator().manual_seed(n * 7 + k + r)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    fp4 = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = torch.randn(n, k // 64, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.float16)
    down = torch.randn(k, r, generator=g).to(torch.bfloat16)
    up = torch.randn(n, r, generator=g)
    n_pad, k_pad = P.round_up(n, 128), P.round_up(k, 128)

    packed = P.pack_w4a4_qweight(q)
    assert packed.shape == (n_pad, k_pad // 2) and packed.dtype == torch.int8
    assert _same(P.unpack_w4a4_qweight(packed, n, k), q)
    assert _same(P.unpack_w4a4_qweight(P.pack_w4a4_qweight(fp4), n, k, signed=False), fp4)
    ps = P.pack_w4a4_wscales(s)
    assert ps.shape == (k_pad // 64, n_pad)
    assert _same(P.unpack_w4a4_wscales(ps, n, k // 64), s)
    assert _same(P.unpack_scale_vector(P.pack_scale_vector(bias), n), bias)
    pd, pu = P.pack_lora_down(down), P.pack_lora_up(up)
    assert pd.shape == (k_pad, r) and pu.shape == (n_pad, r)
    assert _same(P.unpack_lora_down(pd, k, r), down)
    assert _same(P.unpack_lora_up(pu, n, r), up)
    if n % 4 == 0 and k % 64 == 0:
        codes = fp4
        for dtype in (torch.int32, torch.int16):
            assert _same(P.unpack_awq_qweight(P.pack_awq_qweight(codes, dtype)), codes)
    fp8 = torch.rand(n, k // 16, generator=g).to(torch.float8_e4m3fn)
    assert _same(P.unpack_nvfp4_wscales(P.pack_nvfp4_wscales(fp8), n, k // 16), fp8)


def test_rank_padding():
    down = torch.randn(128, 24).to(torch.bfloat16)
    packed = P.pack_lora_down(down)
    assert packed.shape == (128, 32)
    assert torch.all(P.unpack_lora_down(packed)[:, 24:] == 0)
    assert _same(P.unpack_lora_down(packed, 128, 24), down)


@pytest.mark.parametrize("splits", [3, 6])
def test_adanorm_round_trip(splits):
    c = 64
    rows = torch.arange(splits * c)
    inter = P.adanorm_interleave(rows, splits)
    cc, ss = torch.arange(c)[:, None], torch.arange(splits)[None, :]
    assert torch.equal(inter[(cc * splits + ss).reshape(-1)], (ss * c + cc).reshape(-1))
    assert torch.equal(P.adanorm_deinterleave(inter, splits), rows)
    w = torch.randint(0, 16, (splits * c, 128), dtype=torch.uint8)
    assert torch.equal(P.adanorm_deinterleave(P.adanorm_interleave(w, splits), splits), w)
    bias = torch.randint(-64, 65, (splits * c,)).float() / 32
    packed = P.pack_adanorm_bias(bias, splits, torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    plus_one = torch.zeros(splits * c)
    for s in P.ADANORM_SCALE_CHUNKS[splits]:
        plus_one[s * c : (s + 1) * c] = 1
    assert torch.equal(P.adanorm_deinterleave(packed.float(), splits), bias + plus_one)
    assert torch.equal(P.unpack_adanorm_bias(packed, splits), bias)


def test_bad_shapes_rejected():
    with pytest.raises(ValueError, match="N % 4 == 0 and K % 64 == 0"):
        P.pack_awq_qweight(torch.zeros(6, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="128"):
        P.unpack_w4a4_qweight(torch.zeros(100, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="does not fit"):
        P.unpack_w4a4_qweight(torch.zeros(128, 64, dtype=torch.int8), 256, 128)

"""GPU tests of the Ampere/Ada (INT4 tensor core) W4A4 ops against the references in
nunchaku.ops.sm80_layout (error measure: tests/gpu/w4a4_helpers.py), and the quantized module and
tiny FLUX on them. On an H100 the INT4 mma.sync runs in emulation: correct, slow."""

from __future__ import annotations

import copy

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

from nunchaku.ops import sm80
from nunchaku.ops.sm80_layout import (
    pack_weights_sm80,
    reference_gemm_sm80,
    reference_quantize_act_sm80,
)
from nunchaku.ops.sm90_layout import scale_rows_padded
from nunchaku.quant.int4 import pack_int4_nibbles

pytestmark = pytest.mark.usefixtures("needs_sm80_kernels")


def make_layer(k: int, n: int, r: int, dtype: torch.dtype, gen: torch.Generator):
    layer = random_layer(k, n, r, dtype, gen)
    layer["wc"], layer["ws"] = pack_weights_sm80(pack_int4_nibbles(layer.pop("wcodes")), layer.pop("wscales"))
    return layer


def run_quantize(x, smooth, lora_down, act_unsigned):
    """The op on poisoned outputs (0x88 bytes = codes -8/-8 or 8/8, NaN) so unwritten elements show."""
    m, k = x.shape
    codes = torch.full((m, k // 2), 0x88, dtype=torch.uint8, device=x.device)
    scales = torch.full((k // 64, scale_rows_padded(m)), float("nan"), device=x.device)
    lora_act = torch.full((m, lora_down.shape[1]), float("nan"), device=x.device)
    torch.ops.nunchaku.w4a4_quantize_act_sm80(x, smooth, lora_down, act_unsigned, codes, scales, lora_act)
    return codes, scales, lora_act


def gemm_exact(codes, scales, layer, lora_act, act_unsigned):
    return reference_gemm_sm80(codes, scales, layer["wc"], layer["ws"], lora_act, layer["lora_up"], layer["bias"],
                               act_unsigned, exact=True)


@pytest.mark.parametrize("act_unsigned", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 192), (257, 3072), (130, 12288)])
def test_quantize_matches_reference(m, k, dtype, act_unsigned):
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + k)
    x = (torch.randn(m, k, generator=gen, device="cuda") * 2).to(dtype)
    layer = make_layer(k, 128, 32, dtype, gen)
    codes, scales, lora_act = run_quantize(x, layer["smooth"], layer["lora_down"], act_unsigned)
    rc, rs, rl = reference_quantize_act_sm80(x, layer["smooth"], layer["lora_down"], act_unsigned)
    torch.testing.assert_close(scales, rs, rtol=0, atol=0)
    mismatch = (codes != rc).sum().item()
    assert mismatch == 0, f"{mismatch} of {codes.numel()} code bytes differ"
    assert rel_err(lora_act, rl) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 257])
@pytest.mark.parametrize("k,n", FLUX_KN)
def test_gemm_matches_reference(m, k, n, dtype):
    gen = torch.Generator(device="cuda").manual_seed(m + k + n)
    layer = make_layer(k, n, 32, dtype, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    codes, scales, lora_act = reference_quantize_act_sm80(x, layer["smooth"], layer["lora_down"])
    out = sm80.w4a4_gemm_sm80(codes, scales, layer["wc"], layer["ws"], lora_act, layer["lora_up"], layer["bias"])
    check_close(out, gemm_exact(codes, scales, layer, lora_act, False), dtype, f"gemm m={m} k={k} n={n} {dtype}")


@pytest.mark.parametrize("act_unsigned", [False, True])
@pytest.mark.parametrize("m,k,n,r", [(3, 64, 128, 16), (129, 192, 256, 32), (300, 320, 384, 48), (4608, 3072, 3072, 32)])
def test_fused_layer(m, k, n, r, act_unsigned):
    """Quantize + GEMM end to end: odd group counts, M tails, ranks 16-48, the FLUX token count."""
    gen = torch.Generator(device="cuda").manual_seed(m * k + n)
    dtype = torch.bfloat16
    layer = make_layer(k, n, r, dtype, gen)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    if act_unsigned:
        x = torch.nn.functional.gelu(x)
    out = sm80.w4a4_linear_sm80(x, layer["smooth"], layer["lora_down"], layer["wc"], layer["ws"],
                                layer["lora_up"], layer["bias"], act_unsigned)
    codes, scales, lora_act = reference_quantize_act_sm80(x, layer["smooth"], layer["lora_down"], act_unsigned)
    check_close(out, gemm_exact(codes, scales, layer, lora_act, act_unsigned), dtype,
                f"fused m={m} k={k} n={n} r={r} unsigned={act_unsigned}")


def test_noncontiguous_x():
    gen = torch.Generator(device="cuda").manual_seed(1)
    base = torch.randn(300, 2 * 3072 + 64, generator=gen, device="cuda").to(torch.bfloat16)
    x = base[::2, 64 : 64 + 3072]
    assert not x.is_contiguous()
    layer = make_layer(3072, 128, 64, torch.bfloat16, gen)
    codes, scales, lora_act = sm80.w4a4_quantize_act_sm80(x, layer["smooth"], layer["lora_down"])
    rc, rs, rl = reference_quantize_act_sm80(x, layer["smooth"], layer["lora_down"])
    assert torch.equal(codes, rc) and torch.equal(scales, rs)
    assert rel_err(lora_act, rl) < 1e-5


@pytest.mark.parametrize("gelu_from", [0, 130, 384])
def test_gemm_gelu_epilogue(gelu_from):
    gen = torch.Generator(device="cuda").manual_seed(gelu_from)
    layer = make_layer(192, 384, 32, torch.bfloat16, gen)
    x = (torch.randn(257, 192, generator=gen, device="cuda") * 2).to(torch.bfloat16)
    codes, scales, lora_act = sm80.w4a4_quantize_act_sm80(x, layer["smooth"], layer["lora_down"])
    args = (codes, scales, layer["wc"], layer["ws"], lora_act, layer["lora_up"], layer["bias"], False)
    check_gelu_epilogue(sm80.w4a4_gemm_sm80(*args), sm80.w4a4_gemm_sm80(*args, gelu_from=gelu_from), gelu_from)
    with pytest.raises(RuntimeError, match="gelu_from = 386"):
        sm80.w4a4_gemm_sm80(*args, gelu_from=386)


def test_rejects_bad_arguments():
    gen = torch.Generator(device="cuda").manual_seed(3)
    layer = make_layer(256, 128, 32, torch.bfloat16, gen)
    x = torch.randn(8, 256, generator=gen, device="cuda").to(torch.bfloat16)
    codes, scales, lora_act = sm80.w4a4_quantize_act_sm80(x, layer["smooth"], layer["lora_down"])
    out = torch.empty(8, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="wscales must have shape"):
        torch.ops.nunchaku.w4a4_gemm_sm80(codes, scales, layer["wc"], layer["ws"].t().contiguous(), lora_act,
                                          layer["lora_up"], layer["bias"], False, 128, out)
    with pytest.raises(RuntimeError, match="N = 64 must be a positive multiple of 128"):
        torch.ops.nunchaku.w4a4_gemm_sm80(codes, scales, layer["wc"][:64], layer["ws"][:, :64].contiguous(),
                                          lora_act, layer["lora_up"][:64], layer["bias"][:64], False, 64,
                                          out[:, :64])
    with pytest.raises(RuntimeError, match=r"act_codes must be a contiguous uint8 \[M, K/2\]"):
        torch.ops.nunchaku.w4a4_quantize_act_sm80(x, layer["smooth"], layer["lora_down"], False,
                                                  torch.empty(8, 256, dtype=torch.uint8, device="cuda"), scales,
                                                  lora_act)


def test_opcheck():
    gen = torch.Generator(device="cuda").manual_seed(5)
    layer = make_layer(192, 256, 32, torch.bfloat16, gen)
    x = torch.randn(33, 192, generator=gen, device="cuda").to(torch.bfloat16)
    codes, scales, lora_act = sm80.w4a4_quantize_act_sm80(x, layer["smooth"], layer["lora_down"], True)
    torch.library.opcheck(
        torch.ops.nunchaku.w4a4_quantize_act_sm80.default,
        (x, layer["smooth"], layer["lora_down"], True, torch.empty_like(codes), torch.empty_like(scales),
         torch.empty_like(lora_act)),
    )
    out = torch.empty(33, 256, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(
        torch.ops.nunchaku.w4a4_gemm_sm80.default,
        (codes, scales, layer["wc"], layer["ws"], lora_act, layer["lora_up"], layer["bias"], True, 100, out),
    )


def test_cuda_graph_capture():
    gen = torch.Generator(device="cuda").manual_seed(9)
    layer = make_layer(3072, 3072, 32, torch.bfloat16, gen)
    x = torch.randn(200, 3072, generator=gen, device="cuda").to(torch.bfloat16)
    args = (layer["smooth"], layer["lora_down"], layer["wc"], layer["ws"], layer["lora_up"], layer["bias"])
    check_cuda_graph_replay(lambda t: sm80.w4a4_linear_sm80(t, *args), x, gen)


def test_module_and_tiny_flux_on_the_sm80_kernels(monkeypatch):
    """NUNCHAKU_W4A4_KERNELS=sm80 puts the layers in the sm80 layout (on an H100 too) and the
    transformer's output matches the reference path on the same GPU."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flux_helpers import quantize_pipeline, transformer_inputs

    from nunchaku.models.tiny import build_tiny_flux_pipeline
    from nunchaku.nn import SVDQW4A4Linear
    from nunchaku.nn.linear import WeightLayout

    pipe = build_tiny_flux_pipeline(torch_dtype=torch.bfloat16)
    quantize_pipeline(pipe)
    monkeypatch.setenv("NUNCHAKU_BACKEND", "reference")
    ref = copy.deepcopy(pipe.transformer).to("cuda")
    monkeypatch.delenv("NUNCHAKU_BACKEND")
    monkeypatch.setenv("NUNCHAKU_W4A4_KERNELS", "sm80")
    gpu = pipe.transformer.to("cuda")
    assert {m.weight_layout for m in gpu.modules() if isinstance(m, SVDQW4A4Linear)} == {WeightLayout.SM80}
    inp = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in transformer_inputs(batch=2).items()}
    with torch.no_grad():
        out = gpu(**inp)[0]
        assert rel_err(out, ref(**inp)[0]) < 2e-2
        compiled = torch.compile(gpu, fullgraph=True)(**inp)[0]
        assert rel_err(compiled, out) < 1e-2
    back = gpu.to("cpu")
    layer = next(m for m in back.modules() if isinstance(m, SVDQW4A4Linear))
    assert layer.weight_layout is WeightLayout.NIBBLES

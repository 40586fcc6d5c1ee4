"""The Triton W4A16 GEMV and GEMM (nunchaku::w4a16_gemv, nunchaku::w4a16_gemm) against the
reference, as ops and inside the module, opcheck, and the choice between them and the reference."""

from __future__ import annotations

import pytest
import torch

from nunchaku import ops
from nunchaku.nn import AWQW4A16Linear
from nunchaku.ops import reference
from nunchaku.ops.w4a16_triton import MAX_ROWS, launch_gemm, w4a16_gemm, w4a16_gemv
from nunchaku.quant.awq import quantize_w4a16
from nunchaku.quant.int4 import pack_int4_nibbles

pytestmark = pytest.mark.usefixtures("needs_cuda")
pytest.importorskip("triton", reason="the W4A16 kernels are Triton kernels: triton is not installed")


def layer(n: int, k: int, dtype, bias: bool, seed: int = 0, group: int = 64):
    g = torch.Generator().manual_seed(seed)
    w = quantize_w4a16(torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None,
                       group_size=group, storage_dtype=dtype)
    to = {"device": "cuda"}
    return (pack_int4_nibbles(w.qweight).to(**to), w.wscales.to(**to), w.wzeros.to(**to),
            None if w.bias is None else w.bias.to(**to))


@pytest.mark.parametrize("m,k,n", [(1, 3072, 18432), (2, 3072, 9216), (4, 256, 384), (MAX_ROWS, 192, 130)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_the_reference(m, k, n, dtype):
    qp, s, z, b = layer(n, k, dtype, bias=m % 2 == 0)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y = w4a16_gemv(x, qp, s, z, b)
    exact = reference.w4a16_gemm(x.float(), qp, s, z, b, 64).double()  # fp32 math, unrounded output
    rounding = (exact.to(dtype).double() - exact).norm() / exact.norm()
    err = (y.double() - exact).norm() / exact.norm()
    assert y.dtype == dtype and y.shape == (m, n)
    assert err <= 1.1 * rounding + 1e-6, (err.item(), rounding.item())  # one rounding of the output


@pytest.mark.parametrize("config", [(64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4)])
def test_gemm_tile_configs_match_the_reference(config):
    qp, s, z, b = layer(300, 512, torch.bfloat16, bias=True, seed=7, group=128)
    x = torch.randn(200, 512, device="cuda", dtype=torch.bfloat16)
    y = launch_gemm(x, qp, s, z, b, config)
    exact = reference.w4a16_gemm(x.float(), qp, s, z, b, 128).double()
    rounding = (exact.to(torch.bfloat16).double() - exact).norm() / exact.norm()
    assert ((y.double() - exact).norm() / exact.norm()) <= 1.1 * rounding + 1e-6


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("m,k,n", [(MAX_ROWS + 1, 4096, 10240), (512, 4096, 4096), (300, 256, 130), (1, 256, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_matches_the_reference(m, k, n, dtype, group):
    """The T5-XXL shapes (512 tokens, d_model 4096, d_ff 10240; our W4A16 T5 uses group 128), M and
    N tails."""
    qp, s, z, b = layer(n, k, dtype, bias=m % 2 == 0, seed=m, group=group)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y = w4a16_gemm(x, qp, s, z, b) if m > 1 else w4a16_gemv(x, qp, s, z, b)
    exact = reference.w4a16_gemm(x.float(), qp, s, z, b, group).double()
    rounding = (exact.to(dtype).double() - exact).norm() / exact.norm()
    err = (y.double() - exact).norm() / exact.norm()
    assert y.dtype == dtype and y.shape == (m, n)
    assert err <= 1.1 * rounding + 1e-6, (err.item(), rounding.item())


def test_module_uses_the_kernels_for_few_and_many_rows(monkeypatch):
    qp, s, z, b = layer(384, 256, torch.bfloat16, bias=True)
    for rows in (3, MAX_ROWS + 1, 600):
        x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
        assert ops.use_triton_w4a16(x, 64)
        monkeypatch.setenv("NUNCHAKU_BACKEND", "reference")
        assert not ops.use_triton_w4a16(x, 64)
        ref = ops.w4a16_linear(x, qp, s, z, b, 64)
        monkeypatch.delenv("NUNCHAKU_BACKEND")
        fast = ops.w4a16_linear(x, qp, s, z, b, 64)
        assert ((fast.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_opcheck_and_compile():
    qp, s, z, b = layer(256, 128, torch.bfloat16, bias=True)
    x = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nunchaku.w4a16_gemv, (x, qp, s, z, b))
    torch.library.opcheck(torch.ops.nunchaku.w4a16_gemv, (x, qp, s, z, None))
    many = torch.randn(40, 128, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nunchaku.w4a16_gemm, (many, qp, s, z, b))
    torch.library.opcheck(torch.ops.nunchaku.w4a16_gemm, (many, qp, s, z, None))
    compiled_many = torch.compile(lambda t: ops.w4a16_linear(t, qp, s, z, b, 64), fullgraph=True)
    assert torch.equal(compiled_many(many), w4a16_gemm(many, qp, s, z, b))
    compiled = torch.compile(lambda t: ops.w4a16_linear(t, qp, s, z, b, 64), fullgraph=True)
    assert torch.equal(compiled(x), w4a16_gemv(x, qp, s, z, b))


def test_bad_shapes_are_refused():
    qp, s, z, b = layer(256, 128, torch.bfloat16, bias=True)
    x = torch.randn(2, 192, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="w4a16_gemv: expected qweight"):
        w4a16_gemv(x, qp, s, z, b)
    with pytest.raises(ValueError, match="w4a16_gemm: expected qweight"):
        w4a16_gemm(torch.randn(64, 192, device="cuda", dtype=torch.bfloat16), qp, s, z, b)


def test_awq_module_on_the_gpu_matches_the_cpu():
    g = torch.Generator().manual_seed(1)
    w = quantize_w4a16(torch.randn(384, 256, generator=g), torch.randn(384, generator=g))
    cpu = AWQW4A16Linear.from_weights(w)
    x = torch.randn(2, 256, generator=g).to(torch.bfloat16)
    gpu = AWQW4A16Linear.from_weights(w).to("cuda")
    y_cpu, y_gpu = cpu(x).float(), gpu(x.cuda()).float().cpu()
    assert ((y_gpu - y_cpu).norm() / y_cpu.norm()).item() < 1e-2

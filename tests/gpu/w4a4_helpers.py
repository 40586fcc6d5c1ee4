"""What the GPU tests of both W4A4 kernel families share: random layers and the error measure.

Error measure: ||out - ref|| / ||ref|| with ref in float64. The kernels accumulate in fp32 and
round once to the output dtype, so their error is essentially that one rounding: we require it
to be within 10% (+1e-6) of the error of the float64 reference rounded to the same dtype, and
under a fixed bound (bf16: 4e-3, fp16: 5e-4).
"""

from __future__ import annotations

import torch

FLUX_KN = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]
BOUND = {torch.bfloat16: 4e-3, torch.float16: 5e-4}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.to(torch.float64), ref.to(torch.float64)
    return ((out64 - ref64).norm() / ref64.norm()).item()


def random_layer(k: int, n: int, r: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Logical W4A4 operands on the GPU: wcodes int8 [N, K], wscales [N, K/64], smooth [K],
    lora_down [K, R], lora_up [N, R], bias [N]."""
    dev = "cuda"
    return {
        "wcodes": torch.randint(-8, 8, (n, k), generator=gen, device=dev, dtype=torch.int8),
        "wscales": (torch.rand(n, k // 64, generator=gen, device=dev) * 0.02 + 0.001).to(dtype),
        "smooth": (torch.rand(k, generator=gen, device=dev) + 0.5).to(dtype),
        "lora_down": (torch.randn(k, r, generator=gen, device=dev) / k**0.5).to(dtype),
        "lora_up": (torch.randn(n, r, generator=gen, device=dev) * 0.1).to(dtype),
        "bias": torch.randn(n, generator=gen, device=dev).to(dtype),
    }


def check_close(out: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten or NaN)"
    err = rel_err(out, exact)
    err_round = rel_err(exact.to(dtype), exact)
    assert err <= 1.1 * err_round + 1e-6 and err <= BOUND[dtype], f"{what}: rel err {err:.3e} (rounding {err_round:.3e})"
    return err


def check_cuda_graph_replay(linear, x: torch.Tensor, gen: torch.Generator) -> None:
    """linear(x) captured in a CUDA graph, replayed on new contents of x, equals an eager call
    (and differs from the first result, so the replay really recomputed)."""
    eager = linear(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        linear(x)  # warm-up off the capture stream, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = linear(x)
    x.copy_(torch.randn(x.shape, generator=gen, device=x.device).to(x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, linear(x))
    assert not torch.equal(captured, eager)


def check_gelu_epilogue(plain: torch.Tensor, fused: torch.Tensor, gelu_from: int) -> None:
    """The GEMM with its epilogue's GELU from column gelu_from (`fused`) against the same GEMM
    without it (`plain`), followed by PyTorch's GELU kernel: columns before gelu_from untouched,
    the rest GELU (tanh) of the rounded output. The epilogue computes the same function as
    x * sigmoid(2u) (u the tanh argument), within a few fp32 ulps of the exact value. PyTorch's
    0.5 x (1 + tanh(u)) cancels for x < -1 (tens of fp32 ulps there, all of them below x ~ -4.5),
    so there the two may differ by one 16-bit ulp more often, or by a tiny absolute amount; for
    x >= -1 both are within a few fp32 ulps, and a 16-bit output differs only where the value sits
    on a rounding boundary."""
    assert torch.equal(fused[:, :gelu_from], plain[:, :gelu_from])
    if gelu_from == plain.shape[1]:
        assert torch.equal(fused, plain)
        return
    x = plain[:, gelu_from:].float()
    expected = torch.nn.functional.gelu(plain[:, gelu_from:], approximate="tanh").float()
    got = fused[:, gelu_from:].float()
    ulp = 2.0**-7 if fused.dtype == torch.bfloat16 else 2.0**-10
    diff = (got - expected).abs()
    assert (diff <= ulp * expected.abs() + 1e-6).all(), (diff - ulp * expected.abs()).max().item()
    no_cancellation = x >= -1
    assert no_cancellation.float().mean() > 0.5
    rate = (diff[no_cancellation] > 0).float().mean().item()
    assert rate < 1e-3, rate

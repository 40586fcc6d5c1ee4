"""W4A16 kernels in Triton: a GEMV for a few rows (the AdaLN modulation linears: one row per
image) and a tensor-core GEMM for many (the T5 encoder: 512 tokens a prompt).

y[m, n] = sum_g ( s[n,g] * sum_{k in g} x[m,k] q[n,k]  +  z[n,g] * sum_{k in g} x[m,k] ) + b[n]

which is x·Wᵀ + b with W = q·s + z (nunchaku.quant.int4, asymmetric uint4) without ever
materializing W: the weights are read once, as packed nibbles (uint8 [N, K/2], byte b = codes
2b (low) and 2b+1 (high)), and everything accumulates in fp32. The reference path dequantizes
all of W on every call instead (on FLUX.1 12B: 3.2 B weights a step, ~40 ms of elementwise
work). The GEMM feeds the codes themselves to the tensor cores (0..15 is exact in bf16/fp16, so
each group's dot product is exact in fp32) and applies s and z per 64-wide group, which keeps
its result as exact as the GEMV's. Registered as the torch ops nunchaku::w4a16_gemv and
nunchaku::w4a16_gemm with fakes, so torch.compile treats each as one opaque call.
"""

from __future__ import annotations

import torch

from .triton_device import on_device_of

MAX_ROWS = 16
GROUP_SIZES = (64, 128)  # what our checkpoints use (AdaLN: 64, T5: 128); both tested on the GPU
BLOCK_N = 64


def triton_problem(x: torch.Tensor, group_size: int) -> str | None:
    """Why the Triton kernels cannot take this call, or None if they can."""
    if not x.is_cuda:
        return "x is not on a CUDA GPU"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x is {x.dtype} (the kernels take bfloat16 or float16)"
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} (the kernels take {', '.join(map(str, GROUP_SIZES))})"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def w4a16_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, G, stride_xm, stride_ym,
                          HAS_BIAS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        n = pid_n * BLOCK + tl.arange(0, BLOCK)
        n_ok = n < N
        j = tl.arange(0, HALF)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for g in tl.range(0, G):
            k0 = g * 2 * HALF
            x_even = tl.load(x_ptr + m * stride_xm + k0 + 2 * j).to(tl.float32)
            x_odd = tl.load(x_ptr + m * stride_xm + k0 + 2 * j + 1).to(tl.float32)
            packed = tl.load(q_ptr + n[:, None] * (K // 2) + g * HALF + j[None, :], mask=n_ok[:, None], other=0)
            lo = (packed & 0xF).to(tl.float32)
            hi = (packed >> 4).to(tl.float32)
            dot = tl.sum(lo * x_even[None, :] + hi * x_odd[None, :], axis=1)
            x_sum = tl.sum(x_even, axis=0) + tl.sum(x_odd, axis=0)
            s = tl.load(s_ptr + n * G + g, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + n * G + g, mask=n_ok, other=0.0).to(tl.float32)
            acc += s * dot + z * x_sum
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    return w4a16_gemv_kernel


_KERNEL = None


@torch.library.custom_op("nunchaku::w4a16_gemv", mutates_args=())
def w4a16_gemv(x: torch.Tensor, qweight_packed: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) -> [M, N] in x.dtype; see the module docstring for the layout."""
    global _KERNEL
    _check_w4a16_shapes("w4a16_gemv", x, qweight_packed, wscales, wzeros)
    m, k = x.shape
    n = qweight_packed.shape[0]
    g = wscales.shape[1]
    if _KERNEL is None:
        _KERNEL = _kernel()
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton_cdiv(n, BLOCK_N), m)
    with on_device_of(x):
        _KERNEL[grid](x, qweight_packed.contiguous(), wscales.contiguous(), wzeros.contiguous(),
                      bias if bias is not None else y, y, n, k, g, x.stride(0), y.stride(0),
                      HAS_BIAS=bias is not None, HALF=k // g // 2, BLOCK=BLOCK_N)
    return y


@w4a16_gemv.register_fake
def _(x, qweight_packed, wscales, wzeros, bias):
    return x.new_empty((x.shape[0], qweight_packed.shape[0]))


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# (BLOCK_M, BLOCK_N, warps, pipeline stages) of the GEMM; benchmarks/w4a16.py --sweep times others.
GEMM_CONFIG = (64, 128, 4, 3)


def _gemm_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def w4a16_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, G, stride_xm, stride_ym,
                          HAS_BIAS: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
        pid_m = tl.program_id(1)
        pid_n = tl.program_id(0)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = m < M
        n_ok = n < N
        k = tl.arange(0, 2 * HALF)
        j = tl.arange(0, HALF)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in tl.range(0, G, num_stages=STAGES):
            x = tl.load(x_ptr + m[:, None] * stride_xm + g * 2 * HALF + k[None, :], mask=m_ok[:, None], other=0.0)
            packed = tl.load(q_ptr + n[:, None] * (K // 2) + g * HALF + j[None, :], mask=n_ok[:, None], other=0)
            # [BLOCK_N, HALF, 2] -> [BLOCK_N, 2*HALF]: channel 2j from the low nibble, 2j+1 from the high.
            codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, 2 * HALF)).to(x.dtype)
            dot = tl.dot(x, tl.trans(codes))  # exact: integer codes times 16-bit x, fp32 sums
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            s = tl.load(s_ptr + n * G + g, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + n * G + g, mask=n_ok, other=0.0).to(tl.float32)
            acc += dot * s[None, :] + x_sum[:, None] * z[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    return w4a16_gemm_kernel


_GEMM_KERNEL = None


def launch_gemm(x, qweight_packed, wscales, wzeros, bias, config=None) -> torch.Tensor:
    """The GEMM with explicit (BLOCK_M, BLOCK_N, warps, stages), GEMM_CONFIG by default."""
    global _GEMM_KERNEL
    if _GEMM_KERNEL is None:
        _GEMM_KERNEL = _gemm_kernel()
    block_m, block_n, warps, stages = config or GEMM_CONFIG
    m, k = x.shape
    n = qweight_packed.shape[0]
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton_cdiv(n, block_n), triton_cdiv(m, block_m))
    with on_device_of(x):
        _GEMM_KERNEL[grid](x, qweight_packed.contiguous(), wscales.contiguous(), wzeros.contiguous(),
                           bias if bias is not None else y, y, m, n, k, wscales.shape[1], x.stride(0), y.stride(0),
                           HAS_BIAS=bias is not None, HALF=k // wscales.shape[1] // 2, BLOCK_M=block_m,
                           BLOCK_N=block_n, STAGES=stages, num_warps=warps)
    return y


@torch.library.custom_op("nunchaku::w4a16_gemm", mutates_args=())
def w4a16_gemm(x: torch.Tensor, qweight_packed: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, any M) -> [M, N] in x.dtype; layouts as for w4a16_gemv."""
    _check_w4a16_shapes("w4a16_gemm", x, qweight_packed, wscales, wzeros)
    return launch_gemm(x, qweight_packed, wscales, wzeros, bias)


@w4a16_gemm.register_fake
def _(x, qweight_packed, wscales, wzeros, bias):
    return x.new_empty((x.shape[0], qweight_packed.shape[0]))


def _check_w4a16_shapes(op: str, x, qweight_packed, wscales, wzeros) -> None:
    k = x.shape[1]
    n = qweight_packed.shape[0]
    groups = wscales.shape[1] if wscales.dim() == 2 else 0
    if (qweight_packed.shape != (n, k // 2) or wscales.dim() != 2 or wscales.shape[0] != n or groups == 0
            or k % groups or k // groups not in GROUP_SIZES or wzeros.shape != wscales.shape):
        raise ValueError(f"{op}: expected qweight [N, K/2], scales and zeros [N, K/G] with G in "
                         f"{GROUP_SIZES} for K={k}, got "
                         f"{list(qweight_packed.shape)}, {list(wscales.shape)}, {list(wzeros.shape)}")


def w4a16_triton(x: torch.Tensor, qweight_packed: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """The GEMV for up to MAX_ROWS rows, the GEMM beyond."""
    if x.shape[0] <= MAX_ROWS:
        return w4a16_gemv(x, qweight_packed, wscales, wzeros, bias)
    return w4a16_gemm(x, qweight_packed, wscales, wzeros, bias)

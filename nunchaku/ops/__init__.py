"""The kernel boundary: one function per op, and the choice of backend.

The functions here take logical-layout tensors (nunchaku.quant.weights; weight codes
nibble-packed) and run the reference implementation (nunchaku.ops.reference), which works on
every device. The CUDA kernels (csrc/, nunchaku.ops.sm90) take their own weight layouts, which
the modules prepare once when they are moved to a GPU the kernels support (see
nunchaku.nn.linear); both paths are tested against the reference.

NUNCHAKU_BACKEND selects: "auto" (default: the CUDA kernels where built and supported, the
reference elsewhere), "reference" (always the reference), "cuda" (the kernels, or an error
naming what is missing).
"""

from __future__ import annotations

import enum
import os

import torch

from . import reference


class Backend(str, enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    CUDA = "cuda"


def requested_backend() -> Backend:
    value = os.environ.get("NUNCHAKU_BACKEND", "auto").strip().lower()
    try:
        return Backend(value)
    except ValueError:
        raise ValueError(
            f"NUNCHAKU_BACKEND={value!r} is not one of {[b.value for b in Backend]}"
        ) from None


def sm90_kernel_problem(device: torch.device, n: int, k: int, rank: int = 32) -> str | None:
    """Why the sm_90 W4A4 kernels cannot run a [N, K] layer with a rank-`rank` low-rank branch
    on `device`, or None if they can."""
    if device.type != "cuda":
        return f"the layer is on {device}, not a CUDA GPU"
    if torch.cuda.get_device_capability(device) != (9, 0):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; the W4A4 kernels built so far are for "
                "Hopper (sm_90); the Ampere/Ada INT4 path is not written yet")
    if n % 128 or k % 64:
        return f"the kernels need N % 128 == 0 and K % 64 == 0, the layer is N={n}, K={k}"
    if rank < 16 or rank % 16:
        return f"the kernels need a low-rank branch of rank 16, 32, 48, ..., the layer has rank {rank}"
    from . import sm90

    if not sm90.extension_available():
        return "the CUDA extension nunchaku._C is not built (pip install --no-build-isolation -e . with nvcc)"
    return None


def use_sm90_kernels(device: torch.device, n: int, k: int, rank: int = 32) -> bool:
    """Whether a layer on `device` should run the sm_90 kernels, per NUNCHAKU_BACKEND."""
    backend = requested_backend()
    if backend is Backend.REFERENCE:
        return False
    problem = sm90_kernel_problem(device, n, k, rank)
    if backend is Backend.CUDA and problem is not None:
        raise RuntimeError(f"NUNCHAKU_BACKEND=cuda, but {problem}")
    return problem is None


def w4a4_linear(
    x: torch.Tensor,
    qweight_packed: torch.Tensor,
    wscales: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor,
    act_unsigned: bool,
    group_size: int = 64,
) -> torch.Tensor:
    """SVDQuant W4A4 linear on x [M, K] -> [M, N] in x.dtype (see nunchaku.quant.svdquant)."""
    codes, scales, lora_act = reference.w4a4_quantize_act_fuse_lora(x, smooth, lora_down, act_unsigned, group_size)
    return reference.w4a4_gemm(codes, scales, qweight_packed, wscales, lora_act, lora_up, bias, x.dtype, group_size)


def use_triton_w4a16(x: torch.Tensor, group_size: int) -> bool:
    """Whether a W4A16 call on x goes to the Triton GEMV (a few rows on a CUDA GPU with triton)
    rather than the reference, per NUNCHAKU_BACKEND. There is no W4A16 GEMM kernel for many rows
    yet, so those run the reference under every backend."""
    if requested_backend() is Backend.REFERENCE:
        return False
    from .w4a16_triton import triton_problem

    return triton_problem(x, group_size) is None


def w4a16_linear(
    x: torch.Tensor,
    qweight_packed: torch.Tensor,
    wscales: torch.Tensor,
    wzeros: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """Weight-only 4-bit linear on x [M, K] -> [M, N] in x.dtype."""
    if use_triton_w4a16(x, group_size):
        from .w4a16_triton import w4a16_gemv

        return w4a16_gemv(x, qweight_packed, wscales, wzeros, bias)
    return reference.w4a16_gemm(x, qweight_packed, wscales, wzeros, bias, group_size)

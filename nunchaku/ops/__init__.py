"""The kernel boundary: one function per op, and the choice of backend.

The functions here take logical-layout tensors (nunchaku.quant.weights; weight codes
nibble-packed) and run the reference implementation (nunchaku.ops.reference), which works on
every device. The CUDA kernels (csrc/; nunchaku.ops.sm90 for Hopper, nunchaku.ops.sm80 for
Ampere/Ada) take their own weight layouts, which
the modules prepare once when they are moved to a GPU the kernels support (see
nunchaku.nn.linear); both paths are tested against the reference.

NUNCHAKU_BACKEND selects: "auto" (default: the CUDA kernels where built and supported, the
reference elsewhere), "reference" (always the reference), "cuda" (the kernels, or an error
naming what is missing). NUNCHAKU_W4A4_KERNELS picks the W4A4 kernel family (W4A4Kernels),
NUNCHAKU_SM90_ACTIVATIONS the activation format of new W4A4 layers (Sm90Activations).
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


def _enum_from_env(variable: str, choices: type[enum.Enum], default: str, extra: tuple[str, ...] = ()):
    """The member of `choices` that environment variable `variable` names (case and surrounding
    blanks ignored; unset: `default`); a value in `extra` is returned as the string itself for the
    caller to handle, anything else is a ValueError that names the variable and the choices."""
    value = os.environ.get(variable, default).strip().lower()
    if value in extra:
        return value
    try:
        return choices(value)
    except ValueError:
        raise ValueError(
            f"{variable}={value!r} is not one of {list(extra) + [c.value for c in choices]}"
        ) from None


def requested_backend() -> Backend:
    return _enum_from_env("NUNCHAKU_BACKEND", Backend, "auto")


class W4A4Kernels(str, enum.Enum):
    """The two CUDA kernel families of the W4A4 linear."""

    SM90 = "sm90"  # Hopper: the 4-bit codes run on the fp8 tensor cores (wgmma), sm_90 only
    SM80 = "sm80"  # Ampere/Ada: the INT4 tensor cores (mma.sync m16n8k64); sm_80 to sm_90


def requested_w4a4_kernels() -> W4A4Kernels | None:
    """NUNCHAKU_W4A4_KERNELS: "auto" (default: the family made for the GPU), "sm90" or "sm80"
    (that family wherever it can run: an H100 runs the sm80 kernels, in emulation, for testing)."""
    kernels = _enum_from_env("NUNCHAKU_W4A4_KERNELS", W4A4Kernels, "auto", extra=("auto",))
    return None if kernels == "auto" else kernels


class Sm90Activations(str, enum.Enum):
    """How a W4A4 layer quantizes its (signed) activations on Hopper.

    INT4: the method's 4-bit codes with an fp32 scale per (token, 64-channel group), on every
    path and GPU (default).
    POW2: integers in [-16, 16] with a power-of-two scale per (token, group), chosen so that the
    step is at most max/8 (INT4's is max/7): at least as accurate as INT4 in every group (down
    to groups 2^-13 below the token's largest), but ~5-bit, not 4-bit, activations. On sm_90
    both run on the same fp8 tensor cores; POW2 lets the GEMM fold the group scales into the
    codes (one FFMA per element and group instead of two, and no per-(token, group) scale loads;
    one scale per token is applied in the epilogue). The Hopper kernels and the reference path
    (any device: w4a4_linear(..., pow2_activations=True)) compute it; the Ampere/Ada kernels do
    not (a layer set to POW2 there raises).
    Post-GELU (unsigned) inputs, and layers quantized in groups other than 64, keep INT4 in
    either case.
    """

    INT4 = "int4"
    POW2 = "pow2"


def requested_sm90_activations() -> Sm90Activations:
    """NUNCHAKU_SM90_ACTIVATIONS: "int4" (default) or "pow2" (see Sm90Activations)."""
    return _enum_from_env("NUNCHAKU_SM90_ACTIVATIONS", Sm90Activations, "int4")


def w4a4_kernel_problem(device: torch.device, n: int, k: int, rank: int = 32,
                        kernels: W4A4Kernels | None = None,
                        dtype: torch.dtype = torch.bfloat16,
                        group_size: int = 64) -> tuple[W4A4Kernels | None, str | None]:
    """(the kernel family for a [N, K] layer with a rank-`rank` low-rank branch, quantized in
    groups of `group_size` channels, computing in `dtype`, on `device`, None) or (None, why no
    kernel can run it). `kernels` asks for one family; None picks by GPU."""
    if device.type != "cuda":
        return None, f"the layer is on {device}, not a CUDA GPU"
    if dtype not in (torch.bfloat16, torch.float16):
        return None, f"the kernels compute in bfloat16 or float16, the layer is {dtype}"
    major, minor = torch.cuda.get_device_capability(device)
    cc = 10 * major + minor
    name = f"{torch.cuda.get_device_name(device)} (sm_{cc})"
    if kernels is None:
        if cc == 90:
            kernels = W4A4Kernels.SM90
        elif 80 <= cc < 90:
            kernels = W4A4Kernels.SM80
        else:
            return None, f"{name} has no W4A4 kernels: they are built for Ampere/Ada (sm_80-sm_89) and Hopper (sm_90)"
    if kernels is W4A4Kernels.SM90 and cc != 90:
        return None, f"the sm90 W4A4 kernels need a Hopper GPU (sm_90), this is {name}"
    if kernels is W4A4Kernels.SM80 and not 80 <= cc <= 90:
        return None, f"the sm80 W4A4 kernels need an sm_80 to sm_90 GPU, this is {name}"
    if n % 128 or k % 64:
        return None, f"the kernels need N % 128 == 0 and K % 64 == 0, the layer is N={n}, K={k}"
    if group_size != 64:
        return None, f"the kernels quantize in groups of 64 channels, the layer's groups are {group_size}"
    if rank < 16 or rank % 16 or rank > 128:
        return None, f"the kernels need a low-rank branch of rank 16, 32, ..., 128, the layer has rank {rank}"
    from .extension import extension_available

    if not extension_available():
        return None, "the CUDA extension nunchaku._C is not built (pip install --no-build-isolation -e . with nvcc)"
    return kernels, None


def w4a4_kernels_for(device: torch.device, n: int, k: int, rank: int = 32,
                     dtype: torch.dtype = torch.bfloat16, group_size: int = 64) -> W4A4Kernels | None:
    """Which kernels a layer on `device` should run (None: the reference), per NUNCHAKU_BACKEND
    and NUNCHAKU_W4A4_KERNELS."""
    backend = requested_backend()
    if backend is Backend.REFERENCE:
        return None
    kernels, problem = w4a4_kernel_problem(device, n, k, rank, requested_w4a4_kernels(), dtype, group_size)
    if backend is Backend.CUDA and problem is not None:
        raise RuntimeError(f"NUNCHAKU_BACKEND=cuda, but {problem}")
    return kernels


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
    gelu_from: int | None = None,
    pow2_activations: bool = False,
) -> torch.Tensor:
    """SVDQuant W4A4 linear on x [M, K] -> [M, N] in x.dtype (see nunchaku.quant.svdquant), with
    GELU (tanh) on the output columns from gelu_from on. pow2_activations: the activations in the
    pow2 format (Sm90Activations.POW2; signed layers), as the Hopper kernels compute it."""
    if pow2_activations:
        if act_unsigned:
            raise ValueError("the pow2 activation format is for signed layers only (post-GELU layers keep int4)")
        return reference.w4a4_linear_pow2(x, qweight_packed, wscales, smooth, lora_down, lora_up, bias, group_size,
                                          gelu_from)
    codes, scales, lora_act = reference.w4a4_quantize_act_fuse_lora(x, smooth, lora_down, act_unsigned, group_size)
    return reference.w4a4_gemm(codes, scales, qweight_packed, wscales, lora_act, lora_up, bias, x.dtype, group_size,
                               gelu_from)


def use_triton_w4a16(x: torch.Tensor, group_size: int) -> bool:
    """Whether a W4A16 call on x goes to the Triton kernels (a GEMV for a few rows, a GEMM for
    many; CUDA GPU with triton) rather than the reference, per NUNCHAKU_BACKEND."""
    if requested_backend() is Backend.REFERENCE:
        return False
    from .w4a16_triton import triton_problem

    problem = triton_problem(x, group_size)
    if requested_backend() is Backend.CUDA and problem is not None and x.is_cuda:
        raise RuntimeError(f"NUNCHAKU_BACKEND=cuda, but the W4A16 kernels cannot run: {problem}")
    return problem is None


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
        from .w4a16_triton import w4a16_triton

        return w4a16_triton(x, qweight_packed, wscales, wzeros, bias)
    return reference.w4a16_gemm(x, qweight_packed, wscales, wzeros, bias, group_size)

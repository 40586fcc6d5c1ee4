"""Fused per-head RMSNorm + rotary embedding of the FLUX attention queries and keys, in Triton.

diffusers computes `apply_rotary_emb(RMSNorm(q))` as about a dozen elementwise kernels (fp32
up-casts, pow, mean, rsqrt, two casts, the weight, the pair swap, two products, a sum), each a
full pass over a [B, T, H, 128] tensor; in an eager FLUX.1 step that is ~20 ms on an H100. This
op reads q (or k) once, from any token/head strides (the views the fused q/k/v projection
produces), and writes the result once, contiguous. It reproduces the roundings of both RMSNorm flavours FLUX models carry:

    h   = x * rsqrt(mean(x_f32^2) + eps)           (fp32)
    h16 = round16(h * weight)                       torch.nn.RMSNorm (diffusers' FLUX attention)
    h16 = round16(round16(h) * weight)              diffusers' RMSNorm class (round_before_weight)
    out = round16(h16 * cos + rot(h16) * sin)       (fp32 products and sum, rot(h)[2i] = -h[2i+1],
                                                     rot(h)[2i+1] = h[2i]; no FMA contraction)

Only the sum of squares may add in another order than PyTorch's, which moves an output by one
16-bit ulp now and then. Registered as nunchaku::rmsnorm_rope with a fake; the modules use it in
eager mode on CUDA (torch.compile fuses diffusers' version by itself).
"""

from __future__ import annotations

import torch

from .triton_device import on_device_of


def rmsnorm_rope_problem(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor,
                         sin: torch.Tensor) -> str | None:
    """Why the fused op cannot take this call, or None if it can."""
    if not x.is_cuda:
        return "x is not on a CUDA GPU"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x is {x.dtype}"
    if x.dim() != 4 or x.shape[-1] not in (32, 64, 128, 256) or x.stride(-1) != 1:
        return f"x must be [B, T, H, 32|64|128|256] with a unit last stride, got {tuple(x.shape)}"
    if weight is None or weight.dtype != x.dtype or weight.shape != (x.shape[-1],) or weight.device != x.device:
        return f"the RMSNorm needs a weight [{x.shape[-1]}] in x's dtype on x's device"
    if cos.shape != (x.shape[1], x.shape[3]) or cos.device != x.device:
        return f"rotary tables {tuple(cos.shape)} on {cos.device} do not match x {tuple(x.shape)} on {x.device}"
    if sin.shape != cos.shape:
        return f"sin {tuple(sin.shape)} and cos {tuple(cos.shape)} differ"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def reference_rmsnorm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                           round_before_weight: bool = False) -> torch.Tensor:
    """Pure-PyTorch reference of nunchaku::rmsnorm_rope (any device), with the roundings in the
    module docstring."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if round_before_weight:
        normed = normed.to(x.dtype).float()
    h = (normed * weight.float()).to(x.dtype).float()
    even, odd = h[..., 0::2], h[..., 1::2]
    rotated = torch.stack([-odd, even], dim=-1).flatten(-2)
    c, s = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    return (h * c + rotated * s).to(x.dtype)


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rmsnorm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, T, H, eps, sxb, sxt, sxh, sob, sot,
                            D: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr):
        bt = tl.program_id(0).to(tl.int64)  # batch and token strides can exceed 2^31 elements
        b = bt // T
        t = bt % T
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, D)
        h_ok = h < H
        x = tl.load(x_ptr + b * sxb + t * sxt + h[:, None] * sxh + d[None, :], mask=h_ok[:, None], other=0.0)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=1) / D
        normed = xf * tl.math.rsqrt(var + eps)[:, None]
        if ROUND_BEFORE_WEIGHT:
            normed = normed.to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + d)
        hw = (normed * w.to(tl.float32)).to(x.dtype).to(tl.float32)
        even, odd = tl.split(tl.reshape(hw, (BLOCK_H, D // 2, 2)))
        cos_e, cos_o = tl.split(tl.reshape(tl.load(cos_ptr + t * D + d), (D // 2, 2)))
        sin_e, sin_o = tl.split(tl.reshape(tl.load(sin_ptr + t * D + d), (D // 2, 2)))
        out_e = even * cos_e[None, :] + (-odd) * sin_e[None, :]
        out_o = odd * cos_o[None, :] + even * sin_o[None, :]
        out = tl.interleave(out_e, out_o).to(x.dtype)
        tl.store(out_ptr + b * sob + t * sot + h[:, None] * D + d[None, :], out, mask=h_ok[:, None])

    return rmsnorm_rope_kernel


_KERNEL = None


@torch.library.custom_op("nunchaku::rmsnorm_rope", mutates_args=())
def rmsnorm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                 round_before_weight: bool = False) -> torch.Tensor:
    """x [B, T, H, D] (unit last stride) -> contiguous [B, T, H, D] in x.dtype; cos, sin [T, D].
    round_before_weight: diffusers' RMSNorm class (else torch.nn.RMSNorm's single rounding)."""
    problem = rmsnorm_rope_problem(x, weight, cos, sin)
    if problem is not None:
        raise ValueError(f"rmsnorm_rope: {problem}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    run_rmsnorm_rope_into(x, weight, cos, sin, eps, round_before_weight, out)
    return out


def rmsnorm_rope_out_problem(x: torch.Tensor, out: torch.Tensor) -> str | None:
    """Why run_rmsnorm_rope_into cannot write x's result into `out`, or None if it can."""
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        return f"out is {tuple(out.shape)} {out.dtype} on {out.device}, x is {tuple(x.shape)} {x.dtype} on {x.device}"
    if out.stride(3) != 1 or out.stride(2) != out.shape[3]:
        return "out needs contiguous heads (strides [..., ..., D, 1])"
    return None


def run_rmsnorm_rope_into(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                          round_before_weight: bool, out: torch.Tensor) -> None:
    """nunchaku::rmsnorm_rope written into `out` (any batch and token strides, contiguous heads: e.g.
    the text or image part of the joined q/k the attention reads, so they need no concatenation),
    without the dispatcher; the caller has checked rmsnorm_rope_problem / rmsnorm_rope_out_problem."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel()
    bsz, t, h, d = x.shape
    if out.numel() == 0:
        return
    block_h = 1 << (h - 1).bit_length()
    with on_device_of(x):
        _KERNEL[(bsz * t,)](x, weight.contiguous(), cos.float().contiguous(), sin.float().contiguous(), out, t, h, eps,
                            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), D=d, BLOCK_H=block_h,
                            ROUND_BEFORE_WEIGHT=round_before_weight, num_warps=4, enable_fp_fusion=False)


@rmsnorm_rope.register_fake
def _(x, weight, cos, sin, eps, round_before_weight=False):
    return x.new_empty(x.shape)

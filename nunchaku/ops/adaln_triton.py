"""Fused AdaLN-Zero elementwise work of the FLUX blocks (LayerNorm + modulation, gated residual
adds), in Triton.

Around each attention and MLP, a diffusers FLUX block runs its elementwise work as separate
PyTorch kernels, each a full pass over a [B, T, C] activation:

    h   = h + gate[:, None] * out                              (2 kernels, the first broadcast)
    y   = LayerNorm(h) * (1 + scale[:, None]) + shift[:, None]  (4 kernels, two broadcast)

In an eager FLUX.1 step that is ~25 ms on an H100 (RESULTS.md, "Where the step's time goes"),
most of it in PyTorch's slow broadcasting kernel. These ops read every operand once and write
every result once. They keep diffusers' roundings, every intermediate rounded to the 16-bit dtype
as PyTorch's per-op kernels do (round16 below), so they compute what the block computes:

    o   = out                    or round16(out + out2)        (the single block's two proj_out halves)
    h'  = round16(h + round16(gate * o))                       (clamped to +-65504 first if clip_fp16)
    n   = round16((h' - mean) * rsqrt(var + eps))               (mean, biased var in fp32)
    y   = round16(round16(n * round16(1 + scale)) + shift)

Only the LayerNorm's sums may add in another order than PyTorch's (fp32, two-pass here, Welford
there), which moves n by one 16-bit ulp now and then. The ops (nunchaku::adaln_modulate,
nunchaku::gated_residual, nunchaku::gated_residual_adaln) are registered with fakes; the FLUX
blocks run the same code in eager mode on CUDA through run_* (checked once, no dispatcher round
trip); under torch.compile they keep diffusers' code, which inductor fuses by itself.
"""

from __future__ import annotations

import torch

from .triton_device import on_device_of


def _operand_problem(name: str, t: torch.Tensor, x: torch.Tensor) -> str | None:
    """gate, shift and scale are per-sample vectors [B, C]; the other operands rows like x [B, T, C]."""
    vector = name in ("gate", "shift", "scale")
    expected = (x.shape[0], x.shape[2]) if vector else tuple(x.shape)
    if tuple(t.shape) != expected:
        return f"{name} is {tuple(t.shape)}, expected {'[B, C] = ' if vector else ''}{list(expected)}"
    if t.dtype != x.dtype or t.device != x.device:
        return f"{name} is {t.dtype} on {t.device}, expected {x.dtype} on {x.device}"
    if t.stride(-1) != 1:
        return f"{name} needs a unit last stride"
    return None


def fused_adaln_problem(x: torch.Tensor, **others: torch.Tensor | None) -> str | None:
    """Why the fused ops cannot take x [B, T, C] with these operands ([B, T, C] rows or [B, C]
    per-sample vectors, by name: residual/out/out2 are rows, gate/shift/scale vectors), or None."""
    if not x.is_cuda:
        return "x is not on a CUDA GPU"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"x is {x.dtype}"
    if x.dim() != 3 or x.stride(-1) != 1:
        return f"x must be [B, T, C] with a unit last stride, got {tuple(x.shape)}"
    if x.shape[2] > 16384:
        return f"C = {x.shape[2]} is above the 16384 channels a row program holds"
    for name, t in others.items():
        if t is None:
            continue
        problem = _operand_problem(name, t, x)
        if problem is not None:
            return problem
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _check(op: str, x: torch.Tensor, **others: torch.Tensor | None) -> None:
    problem = fused_adaln_problem(x, **others)
    if problem is not None:
        raise ValueError(f"{op}: {problem}")


def reference_adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' `LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]` (any device): the
    specification of nunchaku::adaln_modulate."""
    normed = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
    return normed * (1 + scale[:, None]) + shift[:, None]


def reference_gated_residual(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor,
                             out2: torch.Tensor | None = None, clip_fp16: bool = False) -> torch.Tensor:
    """`residual + gate[:, None] * (out [+ out2])` as the FLUX blocks compute it (any device)."""
    if out2 is not None:
        out = out + out2
    h = residual + gate[:, None] * out
    if clip_fp16 and h.dtype == torch.float16:
        h = h.clip(-65504, 65504)
    return h


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def residual_adaln_kernel(x_ptr, gate_ptr, out_ptr, out2_ptr, shift_ptr, scale_ptr, h_ptr, y_ptr,
                              T, C, eps, sxb, sxt, sob, sot, so2b, so2t, sgb, sshb, sscb,
                              BLOCK_C: tl.constexpr, GATED: tl.constexpr, HAS_OUT2: tl.constexpr,
                              NORM: tl.constexpr, CLIP_FP16: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # B * T * C can exceed 2^31 elements
        b = row // T
        t = row % T
        c = tl.arange(0, BLOCK_C)
        ok = c < C
        x = tl.load(x_ptr + b * sxb + t * sxt + c, mask=ok, other=0.0)
        dtype = x.dtype
        if GATED:
            o = tl.load(out_ptr + b * sob + t * sot + c, mask=ok, other=0.0).to(tl.float32)
            if HAS_OUT2:
                o2 = tl.load(out2_ptr + b * so2b + t * so2t + c, mask=ok, other=0.0).to(tl.float32)
                o = (o + o2).to(dtype).to(tl.float32)
            g = tl.load(gate_ptr + b * sgb + c, mask=ok, other=0.0).to(tl.float32)
            hf = x.to(tl.float32) + (g * o).to(dtype).to(tl.float32)
            if CLIP_FP16:
                # where() rather than min/max: a NaN stays NaN, as with torch.clip.
                hf = tl.where(hf > 65504.0, 65504.0, tl.where(hf < -65504.0, -65504.0, hf))
            h = hf.to(dtype)
            tl.store(h_ptr + row * C + c, h, mask=ok)
        else:
            h = x
        if NORM:
            hf = h.to(tl.float32)
            mean = tl.sum(hf, axis=0) / C
            centered = tl.where(ok, hf - mean, 0.0)
            var = tl.sum(centered * centered, axis=0) / C
            n = (centered * tl.math.rsqrt(var + eps)).to(dtype).to(tl.float32)
            shift = tl.load(shift_ptr + b * sshb + c, mask=ok, other=0.0).to(tl.float32)
            scale = tl.load(scale_ptr + b * sscb + c, mask=ok, other=0.0).to(tl.float32)
            one_plus_scale = (1.0 + scale).to(dtype).to(tl.float32)
            y = ((n * one_plus_scale).to(dtype).to(tl.float32) + shift).to(dtype)
            tl.store(y_ptr + row * C + c, y, mask=ok)

    return residual_adaln_kernel


_KERNEL = None


def _launch(x, gate, out, out2, shift, scale, h, y, eps, clip_fp16):
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel()
    bsz, t, c = x.shape
    if bsz * t == 0 or c == 0:
        return
    block_c = 1 << (c - 1).bit_length()
    # The operands a variant does not read get x as a placeholder pointer (never dereferenced).
    gate_, out_, out2_, shift_, scale_, h_, y_ = (
        a if a is not None else x for a in (gate, out, out2, shift, scale, h, y))
    with on_device_of(x):
        _KERNEL[(bsz * t,)](
            x, gate_, out_, out2_, shift_, scale_, h_, y_, t, c, eps,
            x.stride(0), x.stride(1), out_.stride(0), out_.stride(1), out2_.stride(0), out2_.stride(1),
            gate_.stride(0), shift_.stride(0), scale_.stride(0),
            BLOCK_C=block_c, GATED=out is not None, HAS_OUT2=out2 is not None, NORM=y is not None,
            CLIP_FP16=clip_fp16 and x.dtype == torch.float16, num_warps=8 if block_c >= 4096 else 4,
            enable_fp_fusion=False)


def run_adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """nunchaku::adaln_modulate without the dispatcher and the argument checks, for a caller that
    has checked fused_adaln_problem (the FLUX blocks, in eager mode, where a step launches ~2,000
    kernels and the CPU time per launch shows)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, None, None, shift, scale, None, y, eps, False)
    return y


def run_gated_residual(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, out2: torch.Tensor | None,
                       clip_fp16: bool) -> torch.Tensor:
    """nunchaku::gated_residual, unchecked (see run_adaln_modulate)."""
    h = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    _launch(residual, gate, out, out2, None, None, h, None, 0.0, clip_fp16)
    return h


def run_gated_residual_adaln(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, shift: torch.Tensor,
                             scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """nunchaku::gated_residual_adaln, unchecked (see run_adaln_modulate)."""
    h = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    y = torch.empty_like(h)
    _launch(residual, gate, out, None, shift, scale, h, y, eps, False)
    return h, y


@torch.library.custom_op("nunchaku::adaln_modulate", mutates_args=())
def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, T, C], shift/scale [B, C] -> contiguous LayerNorm(x) * (1 + scale) + shift (module docstring)."""
    _check("adaln_modulate", x, shift=shift, scale=scale)
    return run_adaln_modulate(x, shift, scale, eps)


@adaln_modulate.register_fake
def _(x, shift, scale, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("nunchaku::gated_residual", mutates_args=())
def gated_residual(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, out2: torch.Tensor | None = None,
                   clip_fp16: bool = False) -> torch.Tensor:
    """residual + gate[:, None] * (out [+ out2]) for [B, T, C] rows and a [B, C] gate, contiguous;
    clip_fp16 clamps an fp16 result to +-65504 as the FLUX blocks do."""
    _check("gated_residual", residual, gate=gate, out=out, out2=out2)
    return run_gated_residual(residual, gate, out, out2, clip_fp16)


@gated_residual.register_fake
def _(residual, gate, out, out2=None, clip_fp16=False):
    return residual.new_empty(residual.shape)


@torch.library.custom_op("nunchaku::gated_residual_adaln", mutates_args=())
def gated_residual_adaln(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, shift: torch.Tensor,
                         scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = residual + gate[:, None] * out, y = LayerNorm(h) * (1 + scale) + shift, both
    contiguous, from one read of each operand."""
    _check("gated_residual_adaln", residual, gate=gate, out=out, shift=shift, scale=scale)
    return run_gated_residual_adaln(residual, gate, out, shift, scale, eps)


@gated_residual_adaln.register_fake
def _(residual, gate, out, shift, scale, eps):
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape)

"""Activation-aware weight-only 4-bit quantization (W4A16) for the AdaLN modulation linears and
the T5 encoder.

AWQ's channel scaling needs a preceding op to fold 1/s into; the FLUX modulation linears read
SiLU(temb) and the checkpoint formats store no per-channel factor, so there is nowhere to fold
it. What stays activation-aware here is the range search: per (row, group) a clipping ratio is
chosen that minimizes the output error weighted by the calibration inputs' second moments,
E[(x_g·(w_g − ŵ_g))²] ≈ Σ_k E[x_k²]·(w_k − ŵ_k)² (cross terms dropped), instead of the plain
weight error. Channels the inputs use heavily are thus represented more precisely.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .int4 import _grouped, quantize_weight_uint4_asym
from .weights import W4A16Weights

DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(10))


def quantize_w4a16(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int = 64,
    act_sq_mean: torch.Tensor | None = None,
    clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
    storage_dtype: torch.dtype = torch.bfloat16,
) -> W4A16Weights:
    """weight float [N, K], bias [N] or None, act_sq_mean float [K] = mean of x_k² over the
    calibration tokens (None: plain weight error). Returns W4A16Weights whose scales/zeros/bias
    are in storage_dtype; the search accounts for that rounding."""
    n, k = weight.shape
    w = weight.float()
    importance = (
        torch.ones(k, device=w.device) if act_sq_mean is None else act_sq_mean.float().clamp(min=1e-12)
    )
    imp_g = _grouped(importance, group_size)[None]  # [1, G, group]
    wg = _grouped(w, group_size)  # [N, G, group]

    best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
    best = None
    for ratio in clip_grid:
        codes, scales, zeros = quantize_weight_uint4_asym(w, group_size, ratio)
        scales, zeros = scales.to(storage_dtype).float(), zeros.to(storage_dtype).float()
        deq = _grouped(codes.float(), group_size) * scales[..., None] + zeros[..., None]
        err = ((deq - wg).pow(2) * imp_g).sum(-1)
        if best is None:
            best = [codes.clone(), scales.clone(), zeros.clone()]
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[0] = torch.where(better.repeat_interleave(group_size, 1), codes, best[0])
        best[1] = torch.where(better, scales, best[1])
        best[2] = torch.where(better, zeros, best[2])
    codes, scales, zeros = best
    return W4A16Weights(
        qweight=codes,
        wscales=scales.to(storage_dtype),
        wzeros=zeros.to(storage_dtype),
        bias=None if bias is None else bias.to(storage_dtype),
        group_size=group_size,
    )


def simulate_w4a16(x: torch.Tensor, layer: W4A16Weights) -> torch.Tensor:
    """What a W4A16 layer computes, float32 (x float [..., K])."""
    y = x.float() @ layer.dequantize().T
    return y if layer.bias is None else y + layer.bias.float()

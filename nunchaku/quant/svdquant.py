"""SVDQuant: smoothing + a 16-bit low-rank branch + a 4-bit residual.

For a linear y = x·Wᵀ + b (W float [N, K]) and smoothing factors λ [K]:

    W_s = W·diag(λ)                        the weight that sees the smoothed input x/λ
    L   = U_r·S_r·V_rᵀ                     top-r part of W_s (from its SVD)
    R   = W_s − L                          the residual, quantized to int4 per (row, 64 group)
    y  ≈ Q4(x/λ)·Q4(R)ᵀ + (x·lora_down)·lora_upᵀ + b
        lora_up = U_r·S_r [N, r], lora_down = diag(1/λ)·V_r [K, r]  (so it reads the raw x)

Smoothing moves activation outliers into the weight; the low-rank branch then absorbs the
weight's dominant (outlier) directions, leaving a residual with a small range that 4 bits hold.
This module is pure math on tensors: no model, no diffusers.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import GELU_SHIFT
from .int4 import dequantize_int4, fake_quantize_act_int4, quantize_weight_int4
from .weights import W4A4Weights

DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class SVDMethod(str, enum.Enum):
    EXACT = "exact"  # torch.linalg.svd: the true top-r subspace
    RANDOMIZED = "randomized"  # torch.svd_lowrank: much faster on large matrices, near-exact


def smoothing_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant migration: λ_k = max|x_k|^α / max_n|W_nk|^(1−α), float32 [K].

    α = 0 leaves activations alone (up to the weight's column range), α = 1 flattens them fully.
    """
    a = act_absmax.float().clamp(min=eps)
    w = weight.float().abs().amax(dim=0).clamp(min=eps)
    smooth = a.pow(alpha) / w.pow(1.0 - alpha)
    # Normalizing to geometric mean 1 changes nothing mathematically (group scales absorb any
    # global factor) but keeps λ far from the float16/bfloat16 range limits.
    return (smooth / smooth.log().mean().exp()).clamp(min=1e-4, max=1e4)


def top_r_svd(
    matrix: torch.Tensor, rank: int, method: SVDMethod = SVDMethod.EXACT, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation A ≈ up·downᵀ of a float [N, K] matrix: up [N, r] = U_r·S_r,
    down [K, r] = V_r (orthonormal columns). float32 results."""
    if rank == 0:
        n, k = matrix.shape
        empty = matrix.new_zeros
        return empty((n, 0), dtype=torch.float32), empty((k, 0), dtype=torch.float32)
    a = matrix.float()
    if method is SVDMethod.RANDOMIZED:
        with torch.random.fork_rng(devices=[a.device] if a.is_cuda else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(a, q=min(rank + 16, *a.shape), niter=6)
        return u[:, :rank] * s[:rank], v[:, :rank]
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank].T


@dataclass(frozen=True)
class DecomposeOptions:
    rank: int = 32
    group_size: int = 64
    refine_iters: int = 0  # alternate SVD of (W_s − Q(R)) and requantization of R
    svd_method: SVDMethod = SVDMethod.EXACT
    storage_dtype: torch.dtype = torch.bfloat16  # dtype of smooth/lora/scales/bias in checkpoints


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def svdquant_decompose(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor,
    options: DecomposeOptions = DecomposeOptions(),
    act_unsigned: bool = False,
) -> W4A4Weights:
    """Splits a float [N, K] weight into an int4 residual and a rank-r branch (see module doc).

    Every tensor that a checkpoint stores in 16 bits is rounded to options.storage_dtype before
    the quantities that depend on it are computed, so the residual absorbs that rounding.
    For act_unsigned layers the bias compensates the GELU shift of the quantized input:
    bias −= GELU_SHIFT·Σ_k Rq[n,k]/λ_k, with Rq the dequantized (rounded) residual, which
    cancels the shift exactly up to activation quantization.
    Returns W4A4Weights with float tensors in storage_dtype.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got {list(weight.shape)}")
    n, k = weight.shape
    if smooth.shape != (k,):
        raise ValueError(f"smooth must have shape [{k}], got {list(smooth.shape)}")
    dt = options.storage_dtype
    w = weight.float()
    smooth_f = _round(smooth, dt)
    w_s = w * smooth_f[None, :]

    def split(lowrank_target: torch.Tensor):
        up, down_s = top_r_svd(lowrank_target, options.rank, options.svd_method)
        up = _round(up, dt)
        down = _round(down_s / smooth_f[:, None], dt)  # reads the raw x
        resid = w_s - up @ (down * smooth_f[:, None]).T
        codes, scales = quantize_weight_int4(resid, options.group_size, scale_dtype=dt)
        err = torch.linalg.matrix_norm(resid - dequantize_int4(codes, scales, options.group_size))
        return codes, scales, up, down, err

    best = split(w_s)
    for _ in range(options.refine_iters):
        codes, scales = best[0], best[1]
        candidate = split(w_s - dequantize_int4(codes, scales, options.group_size))
        if candidate[4] >= best[4]:
            break
        best = candidate
    codes, scales, up, down, _ = best

    b = torch.zeros(n, dtype=torch.float32, device=w.device) if bias is None else bias.float()
    if act_unsigned:
        main_raw = dequantize_int4(codes, scales, options.group_size) / smooth_f[None, :]
        b = b - GELU_SHIFT * main_raw.sum(dim=1)
    return W4A4Weights(
        qweight=codes,
        wscales=scales.to(dt),
        smooth=smooth_f.to(dt),
        lora_down=down.to(dt),
        lora_up=up.to(dt),
        bias=b.to(dt),
        act_unsigned=act_unsigned,
        group_size=options.group_size,
    )


def simulate_w4a4(x: torch.Tensor, layer: W4A4Weights) -> torch.Tensor:
    """What a W4A4 layer computes, float32, from logical tensors (x float [..., K]).

    This is the specification the ops' reference path and the CUDA kernels implement.
    """
    xf = x.float()
    v = xf + GELU_SHIFT if layer.act_unsigned else xf
    qa = fake_quantize_act_int4(v / layer.smooth.float(), layer.group_size, layer.act_unsigned)
    w_main = dequantize_int4(layer.qweight, layer.wscales, layer.group_size)
    lowrank = (xf @ layer.lora_down.float()) @ layer.lora_up.float().T
    return qa @ w_main.T + lowrank + layer.bias.float()


@dataclass(frozen=True)
class SmoothSearchResult:
    layer: W4A4Weights
    alpha: float
    mse: float  # mean squared output error on the calibration sample
    mse_by_alpha: dict[float, float]


def search_smoothing(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act_absmax: torch.Tensor,
    x_sample: torch.Tensor,
    options: DecomposeOptions = DecomposeOptions(),
    alphas: Sequence[float] = DEFAULT_ALPHA_GRID,
    act_unsigned: bool = False,
    refine_grid: bool = True,
) -> SmoothSearchResult:
    """Picks the migration strength α per layer by the output error of the *whole* quantized
    layer (4-bit activations, 4-bit residual and the low-rank branch) on sampled inputs.

    weight float [N, K]; act_absmax float [K] over all calibration tokens (post-shift for
    unsigned layers, since that is what gets quantized); x_sample float [T, K] raw inputs.
    With refine_grid, the two midpoints around the best grid value are tried as well.
    """
    xs = x_sample.float()
    y_ref = xs @ weight.float().T + (0 if bias is None else bias.float())
    results: dict[float, tuple[float, W4A4Weights]] = {}

    def evaluate(alpha: float):
        alpha = round(float(alpha), 6)
        if alpha in results or not 0.0 <= alpha <= 1.0:
            return
        smooth = smoothing_factors(act_absmax, weight, alpha)
        layer = svdquant_decompose(weight, bias, smooth, options, act_unsigned)
        mse = (simulate_w4a4(xs, layer) - y_ref).pow(2).mean().item()
        results[alpha] = (mse, layer)

    for a in alphas:
        evaluate(a)
    if refine_grid and len(alphas) > 1:
        ordered = sorted(results)
        best_alpha = min(results, key=lambda a: results[a][0])
        i = ordered.index(best_alpha)
        for j in (i - 1, i + 1):
            if 0 <= j < len(ordered):
                evaluate((best_alpha + ordered[j]) / 2)
    best_alpha = min(results, key=lambda a: results[a][0])
    mse, layer = results[best_alpha]
    return SmoothSearchResult(layer, best_alpha, mse, {a: r[0] for a, r in sorted(results.items())})


def fuse_shared_input(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]):
    """Layers reading the same input (q/k/v; in FLUX single blocks also the MLP up-projection)
    are quantized as one [ΣN, K] matrix: one smoothing vector and one low-rank branch serve all.
    Returns the fused weight and bias (zeros where a part has none)."""
    k = weights[0].shape[1]
    for w in weights:
        if w.shape[1] != k:
            raise ValueError(f"layers fused on a shared input must have the same K, got {[list(w.shape) for w in weights]}")
    fused_w = torch.cat([w.float() for w in weights], dim=0)
    fused_b = torch.cat(
        [b.float() if b is not None else torch.zeros(w.shape[0], device=w.device) for w, b in zip(weights, biases)]
    )
    return fused_w, fused_b


def with_rank(options: DecomposeOptions, rank: int) -> DecomposeOptions:
    return dataclasses.replace(options, rank=rank)

"""Layer-level quality: output SQNR (dB) against BF16 of 4-bit schemes on FLUX-shaped linears.

    python benchmarks/quality_layers.py            # FLUX shapes (a few minutes on a GPU, ~20 on 2 CPU cores)
    python benchmarks/quality_layers.py --quick    # shapes / 4, seconds

Why synthetic data: no FLUX weights or activations can be downloaded here. The synthesis follows
what is reported for diffusion transformers (SVDQuant paper, fig. 3 and section 3): activations
carry a few channels that are 10-100x larger than the rest, consistently across tokens, on top of
per-channel and per-token magnitude spread; weights are nearly Gaussian with a few outlier
input columns and a decaying low-rank component. Concretely, with T tokens and K channels:

    x[t, k] = z[t, k] · c[k] · s[t],  z ~ N(0, 1), c ~ LogNormal(0, 0.5), s ~ LogNormal(0, 0.3),
              and 0.5% of the channels (at least 4) get c *= U(20, 100)
    fc2 inputs (post-GELU): x = GELU(h) with h synthesized as above (the MLP hidden state)
    W = (G + Σ_{i<16} 0.5·0.8^i·u_i·v_iᵀ) / sqrt(K),  G, u_i, v_i ~ N(0, 1)
        (a decaying rank-16 part holding about 40% of the energy of the Gaussian part),
        then 0.5% of the input columns are scaled by U(5, 20)

Calibration (smoothing α search, AWQ clip search) uses one set of tokens; SQNR is measured on
a held-out set drawn from the same distribution. The reference is the BF16 layer: BF16 inputs
and weights, float32 accumulation (what cuBLAS does).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nunchaku.ops.sm90_layout import dequantize_act_sm90, reference_quantize_act_pow2_sm90  # noqa: E402
from nunchaku.quant.awq import quantize_w4a16, simulate_w4a16  # noqa: E402
from nunchaku.quant.int4 import dequantize_int4  # noqa: E402
from nunchaku.quant.svdquant import (  # noqa: E402
    DecomposeOptions,
    SVDMethod,
    search_smoothing,
    simulate_w4a4,
    svdquant_decompose,
)

# (name, K, N, post-GELU input)
FLUX_LAYERS = [
    ("attn.to_out (3072→3072)", 3072, 3072, False),
    ("attn.qkv (3072→9216)", 3072, 9216, False),
    ("mlp.fc1 (3072→12288)", 3072, 12288, False),
    ("mlp.fc2 (12288→3072)", 12288, 3072, True),
]


def synth_activations(t: int, k: int, gen: torch.Generator, channel_scale: torch.Tensor) -> torch.Tensor:
    z = torch.randn(t, k, generator=gen)
    token_scale = torch.exp(0.3 * torch.randn(t, 1, generator=gen))
    return z * channel_scale * token_scale


def channel_scales(k: int, gen: torch.Generator) -> torch.Tensor:
    c = torch.exp(0.5 * torch.randn(k, generator=gen))
    n_out = max(4, k // 200)
    idx = torch.randperm(k, generator=gen)[:n_out]
    c[idx] *= 20 + 80 * torch.rand(n_out, generator=gen)
    return c


def synth_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    u = torch.randn(n, 16, generator=gen)
    v = torch.randn(16, k, generator=gen)
    w += (u * 0.5 * 0.8 ** torch.arange(16)) @ v
    n_out = max(4, k // 200)
    idx = torch.randperm(k, generator=gen)[:n_out]
    w[:, idx] *= 5 + 15 * torch.rand(n_out, generator=gen)
    return w / math.sqrt(k)


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum().item() / (y - ref).pow(2).sum().item())


def fake_int8_rowwise(t: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one scale per row (per output channel for W, per token for x)."""
    scale = (t.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.clamp(torch.round(t / scale), -127, 127) * scale


def simulate_w4_pow2(x: torch.Tensor, layer) -> torch.Tensor:
    """simulate_w4a4 with the Hopper kernels' pow2 activation format (nunchaku.ops.Sm90Activations.POW2,
    signed layers only): the activations exactly as the pow2 quantizer and GEMM see them."""
    xb = x.to(torch.bfloat16)
    codes, scales, _ = reference_quantize_act_pow2_sm90(xb, layer.smooth.to(torch.bfloat16),
                                                        layer.lora_down.to(torch.bfloat16))
    qa = dequantize_act_sm90(codes, scales).float()
    w_main = dequantize_int4(layer.qweight, layer.wscales, layer.group_size)
    lowrank = (x.float() @ layer.lora_down.float()) @ layer.lora_up.float().T
    return qa @ w_main.T + lowrank + layer.bias.float()


def run_layer(name, k, n, post_gelu, tokens, device, svd_method, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cs = channel_scales(k, gen)
    calib = synth_activations(tokens, k, gen, cs)
    test = synth_activations(tokens, k, gen, cs)
    if post_gelu:
        calib, test = torch.nn.functional.gelu(calib / cs.mean()), torch.nn.functional.gelu(test / cs.mean())
    w = synth_weight(n, k, gen).to(torch.bfloat16).float()
    calib = calib.to(torch.bfloat16).float().to(device)
    test = test.to(torch.bfloat16).float().to(device)
    w = w.to(device)
    ref = test @ w.T
    absmax_raw = calib.abs().amax(0)
    shift = 0.171875 if post_gelu else 0.0
    absmax = (calib + shift).abs().amax(0) if post_gelu else absmax_raw
    opts = lambda r: DecomposeOptions(rank=r, svd_method=svd_method)  # noqa: E731
    rows = {}
    t0 = time.time()
    naive = svdquant_decompose(w, None, torch.ones(k, device=device), opts(0), act_unsigned=post_gelu)
    rows["naive W4A4 (RTN)"] = sqnr_db(simulate_w4a4(test, naive), ref)
    sq = search_smoothing(w, None, absmax, calib, opts(0), act_unsigned=post_gelu)
    rows[f"SmoothQuant W4A4 (α={sq.alpha:.2f})"] = sqnr_db(simulate_w4a4(test, sq.layer), ref)
    for r in (16, 32, 64):
        res = search_smoothing(w, None, absmax, calib, opts(r), act_unsigned=post_gelu)
        rows[f"SVDQuant W4A4 r={r} (α={res.alpha:.2f})"] = sqnr_db(simulate_w4a4(test, res.layer), ref)
        if r == 32:
            # The same quantized layer with pow2 activations (post-GELU layers keep int4 there).
            y = simulate_w4a4(test, res.layer) if post_gelu else simulate_w4_pow2(test, res.layer)
            rows[f"SVDQuant W4 r=32, Hopper pow2 activations (α={res.alpha:.2f})"] = sqnr_db(y, ref)
    w4a16 = quantize_w4a16(w, None, 64, calib.pow(2).mean(0))
    rows["W4A16 (AWQ-style g64)"] = sqnr_db(simulate_w4a16(test, w4a16), ref)
    rows["W8A8 (per-channel / per-token)"] = sqnr_db(fake_int8_rowwise(test) @ fake_int8_rowwise(w).T, ref)
    return rows, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="shapes divided by 4 (a first look, about a minute)")
    p.add_argument("--shrink", type=int, default=1, help="divide every shape by this (power of 2, ≤ 48)")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (and as many held-out tokens)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--svd", choices=[m.value for m in SVDMethod], default="randomized")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    shrink = 4 if args.quick else args.shrink
    if 3072 % (64 * shrink):
        p.error(f"--shrink {shrink} would break the 64-channel groups (3072 / shrink must be a multiple of 64)")
    layers = [(nm, k // shrink, n // shrink, g) for nm, k, n, g in FLUX_LAYERS]
    results = {}
    for nm, k, n, g in layers:
        rows, secs = run_layer(nm, k, n, g, args.tokens, args.device, SVDMethod(args.svd))
        results[nm] = rows
        print(f"[{secs:6.1f} s] {nm}: " + ", ".join(f"{m.split(' (')[0]}={v:.1f}" for m, v in rows.items()),
              flush=True)
    methods = []
    for rows in results.values():
        for m in rows:
            base = m.split(" (α")[0]
            if base not in methods:
                methods.append(base)
    header = "| method | " + " | ".join(nm if shrink == 1 else f"{nm} / {shrink}" for nm in results) + " |"
    lines = [header, "|" + " --- |" * (len(results) + 1)]
    for base in methods:
        cells = []
        for rows in results.values():
            m = next(m for m in rows if m.split(" (α")[0] == base)
            alpha = m.split("(α=")[1].rstrip(")") if "(α=" in m else None
            cells.append(f"{rows[m]:.2f}" + (f" (α {alpha})" if alpha else ""))
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\nOutput SQNR vs BF16 (dB, higher is better), held-out tokens:\n")
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()

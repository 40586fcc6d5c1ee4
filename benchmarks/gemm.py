"""Benchmark of the sm_90a W4A4 linear against cuBLAS BF16 and torch FP8 rowwise.

For each M and FLUX (K, N): median µs (triton.testing.do_bench, CUDA events) of
  bf16      torch.matmul(x, w^T)                                  (cuBLAS)
  fp8       torch._scaled_mm, e4m3 operands, rowwise fp32 scales   (cuBLASLt)
  gemm      nunchaku w4a4_gemm_sm90 alone (codes + scales given)
  quant     nunchaku w4a4_quantize_act_sm90 alone
  fused     quantize + GEMM + rank-32 branch: the whole W4A4 layer
  pow2      the same three with the pow2 activation format (nunchaku.ops.Sm90Activations.POW2):
            gemm_pow2, quant_pow2, fused_pow2
Inputs rotate among several copies so that no operand of a timed call sits in L2 from the
previous call. TOPS = 2*M*N*K / t. Prints a markdown table last.
Usage: python benchmarks/gemm.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nunchaku.ops import sm90  # noqa: E402
from nunchaku.ops.sm90_layout import pack_weights_sm90, reference_gemm_sm90  # noqa: E402

MS = [256, 1024, 4608]
KNS = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]
RANK = 32
L2_BYTES = 50 * 2**20


def bench(fn_of_set, n_sets: int) -> float:
    from triton.testing import do_bench

    state = {"i": 0}

    def call():
        fn_of_set(state["i"] % n_sets)
        state["i"] += 1

    return do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3


def sets_for(bytes_per_set: int) -> int:
    return max(2, min(16, -(-3 * L2_BYTES // bytes_per_set)))


def run_shape(m: int, k: int, n: int) -> dict:
    dev = "cuda"
    dt = torch.bfloat16
    res = {"M": m, "K": k, "N": n}
    flops = 2 * m * n * k

    # BF16 cuBLAS.
    nb = sets_for(2 * (m * k + n * k + m * n))
    xs = [torch.randn(m, k, device=dev, dtype=dt) for _ in range(nb)]
    ws = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(nb)]
    res["bf16_us"] = bench(lambda i: torch.matmul(xs[i], ws[i].t()), nb)
    del ws

    # FP8 rowwise (activation quantization not included: best case for FP8).
    nf = sets_for(m * k + n * k + 2 * m * n)
    xq = [torch.randn(m, k, device=dev).to(torch.float8_e4m3fn) for _ in range(nf)]
    wq = [torch.randn(n, k, device=dev).to(torch.float8_e4m3fn) for _ in range(nf)]
    sa = [torch.rand(m, 1, device=dev) + 0.5 for _ in range(nf)]
    sb = [torch.rand(1, n, device=dev) + 0.5 for _ in range(nf)]
    try:
        res["fp8_us"] = bench(lambda i: torch._scaled_mm(xq[i], wq[i].t(), sa[i], sb[i], out_dtype=dt), nf)
    except RuntimeError as exc:
        print(f"fp8 rowwise unavailable: {exc}")
        res["fp8_us"] = float("nan")
    del xq, wq, sa, sb

    # W4A4.
    nw = sets_for(m * k * 3 + n * k // 2 + 2 * m * n)
    layers = []
    for _ in range(nw):
        wcodes = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8)
        wscales = (torch.rand(n, k // 64, device=dev) * 0.02 + 0.001).to(dt)
        wp, wsp = pack_weights_sm90(wcodes, wscales)
        layers.append(
            dict(
                smooth=(torch.rand(k, device=dev) + 0.5).to(dt),
                lora_down=(torch.randn(k, RANK, device=dev) / k**0.5).to(dt),
                lora_up=(torch.randn(n, RANK, device=dev) * 0.1).to(dt),
                bias=torch.randn(n, device=dev).to(dt),
                wp=wp,
                wsp=wsp,
            )
        )
    xs = xs[:nw] + [torch.randn(m, k, device=dev, dtype=dt) for _ in range(max(0, nw - len(xs)))]
    acts = [sm90.w4a4_quantize_act_sm90(xs[i], layers[i]["smooth"], layers[i]["lora_down"]) for i in range(nw)]

    def gemm(i):
        L = layers[i]
        c, s, la = acts[i]
        return sm90.w4a4_gemm_sm90(c, s, L["wp"], L["wsp"], la, L["lora_up"], L["bias"])

    def quant(i):
        return sm90.w4a4_quantize_act_sm90(xs[i], layers[i]["smooth"], layers[i]["lora_down"])

    def fused(i):
        L = layers[i]
        return sm90.w4a4_linear_sm90(xs[i], L["smooth"], L["lora_down"], L["wp"], L["wsp"], L["lora_up"], L["bias"])

    def quant_pow2(i):
        return sm90.w4a4_quantize_act_pow2_sm90(xs[i], layers[i]["smooth"], layers[i]["lora_down"])

    acts_pow2 = [quant_pow2(i) for i in range(nw)]

    def gemm_pow2(i):
        L = layers[i]
        c, s, la = acts_pow2[i]
        return sm90.w4a4_gemm_sm90(c, s, L["wp"], L["wsp"], la, L["lora_up"], L["bias"])

    def fused_pow2(i):
        L = layers[i]
        return sm90.w4a4_linear_sm90(xs[i], L["smooth"], L["lora_down"], L["wp"], L["wsp"], L["lora_up"], L["bias"],
                                     pow2_activations=True)

    res["gemm_us"] = bench(gemm, nw)
    res["quant_us"] = bench(quant, nw)
    res["fused_us"] = bench(fused, nw)
    res["gemm_pow2_us"] = bench(gemm_pow2, nw)
    res["quant_pow2_us"] = bench(quant_pow2, nw)
    res["fused_pow2_us"] = bench(fused_pow2, nw)
    for key in ("bf16", "fp8", "gemm", "fused", "gemm_pow2", "fused_pow2"):
        res[f"{key}_tops"] = flops / (res[f"{key}_us"] * 1e-6) / 1e12
    for key in ("fused", "gemm", "fused_pow2", "gemm_pow2"):
        res[f"{key}_vs_bf16"] = res["bf16_us"] / res[f"{key}_us"]
    return res


def random_layer(m: int, k: int, n: int):
    """x and one random rank-RANK W4A4 layer (kernel layout), bf16, on the GPU."""
    dt = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dt)
    smooth = (torch.rand(k, device="cuda") + 0.5).to(dt)
    lora_down = (torch.randn(k, RANK, device="cuda") / k**0.5).to(dt)
    lora_up = (torch.randn(n, RANK, device="cuda") * 0.1).to(dt)
    bias = torch.randn(n, device="cuda").to(dt)
    wp, wsp = pack_weights_sm90(torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8),
                                (torch.rand(n, k // 64, device="cuda") * 0.02 + 0.001).to(dt))
    return x, smooth, lora_down, lora_up, bias, wp, wsp


def quantize_for(pow2: bool):
    return sm90.w4a4_quantize_act_pow2_sm90 if pow2 else sm90.w4a4_quantize_act_sm90


def gemm_only(m: int, k: int, n: int, pow2: bool = False) -> float:
    x, smooth, lora_down, lora_up, bias, wp, wsp = random_layer(m, k, n)
    c, s, la = quantize_for(pow2)(x, smooth, lora_down)
    return bench(lambda i: sm90.w4a4_gemm_sm90(c, s, wp, wsp, la, lora_up, bias), 1)


def quant_only(m: int, k: int, pow2: bool = False) -> float:
    """The activation quantizer alone (rank 32), inputs rotated through more than L2 holds."""
    n_sets = sets_for(3 * m * k)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)]
    smooth = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
    lora_down = (torch.randn(k, RANK, device="cuda") / k**0.5).to(torch.bfloat16)
    return bench(lambda i: quantize_for(pow2)(xs[i], smooth, lora_down), n_sets)


def check_gemm(m: int, k: int, n: int, pow2: bool = False) -> str:
    """Our GEMM against the float64 reference: relative error and that of rounding alone."""
    x, smooth, lora_down, lora_up, bias, wp, wsp = random_layer(m, k, n)
    c, s, la = quantize_for(pow2)(x, smooth, lora_down)
    y = sm90.w4a4_gemm_sm90(c, s, wp, wsp, la, lora_up, bias)
    ref = reference_gemm_sm90(c, s, wp, wsp, la, lora_up, bias, exact=True)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    rounding = ((ref.to(y.dtype).double() - ref).norm() / ref.norm()).item()
    verdict = "ok" if err <= 1.1 * rounding + 1e-6 else "WRONG"
    label = "check pow2" if pow2 else "check"
    return f"{label} M={m} K={k} N={n}: rel err {err:.3e} (rounding alone {rounding:.3e}) {verdict}"


def profile_once(m: int, k: int, n: int, pow2: bool = False) -> None:
    x, smooth, lora_down, lora_up, bias, wp, wsp = random_layer(m, k, n)
    for _ in range(3):
        sm90.w4a4_linear_sm90(x, smooth, lora_down, wp, wsp, lora_up, bias, pow2_activations=pow2)
    torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="M = 4608 only")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--gemm-only", action="store_true",
                    help="time only our GEMM (for ablation builds, whose results are wrong, and A/B builds)")
    ap.add_argument("--ms", type=int, nargs="+", default=[4608], help="token counts M for --gemm-only")
    ap.add_argument("--check", action="store_true", help="with --gemm-only: first compare against the reference")
    ap.add_argument("--pow2", action="store_true",
                    help="with --gemm-only: also time the pow2 activation format; with --profile: run it")
    ap.add_argument("--quant", action="store_true",
                    help="with --gemm-only: also time the activation quantizer alone at each M and K")
    ap.add_argument("--quant-only", action="store_true",
                    help="like --gemm-only --quant without the GEMM timings (quantizer A/B builds)")
    ap.add_argument("--profile", type=int, nargs=3, metavar=("M", "K", "N"), default=None,
                    help="run quantize + GEMM of one shape a few times (for ncu) and exit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if args.profile:
        profile_once(*args.profile, pow2=args.pow2)
        return 0
    if args.quant and not (args.gemm_only or args.quant_only):
        ap.error("--quant goes with --gemm-only (or use --quant-only)")
    if args.quant_only:
        args.gemm_only = args.quant = True
    if args.gemm_only:
        formats = [False, True] if args.pow2 else [False]
        if args.check and not args.quant_only:
            for pow2 in formats:
                for m, k, n in [(1000, 3072, 3072), (257, 320, 384), (4608, 12288, 3072)]:
                    print(check_gemm(m, k, n, pow2), flush=True)
        for m in args.ms:
            for k, n in [] if args.quant_only else KNS:
                for pow2 in formats:
                    us = gemm_only(m, k, n, pow2)
                    print(f"gemm-only{' pow2' if pow2 else ''} M={m} K={k} N={n}: {us:.1f} us, "
                          f"{2 * m * n * k / us / 1e6:.0f} TOPS", flush=True)
            if args.quant:
                for k in sorted({k for k, _ in KNS}):
                    for pow2 in formats:
                        us = quant_only(m, k, pow2)
                        # x read once, one code byte written per element (the floor's traffic).
                        print(f"quant-only{' pow2' if pow2 else ''} M={m} K={k} N=-: {us:.1f} us, "
                              f"{3 * m * k / us / 1e3:.0f} GB/s", flush=True)
        return 0
    print(torch.cuda.get_device_name(), torch.__version__)
    rows = []
    for m in [4608] if args.quick else MS:
        for k, n in KNS:
            r = run_shape(m, k, n)
            rows.append(r)
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print()
    print("| M | K | N | bf16 µs | fp8 µs | w4a4 gemm µs | quant µs | fused µs | bf16 TOPS | fp8 TOPS | gemm TOPS | fused TOPS | fused/bf16 | gemm/bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['M']} | {r['K']} | {r['N']} | {r['bf16_us']:.1f} | {r['fp8_us']:.1f} | {r['gemm_us']:.1f} | "
            f"{r['quant_us']:.1f} | {r['fused_us']:.1f} | {r['bf16_tops']:.0f} | {r['fp8_tops']:.0f} | "
            f"{r['gemm_tops']:.0f} | {r['fused_tops']:.0f} | {r['fused_vs_bf16']:.2f}x | {r['gemm_vs_bf16']:.2f}x |"
        )
    print()
    print("pow2 activation format (same run):")
    print("| M | K | N | bf16 µs | gemm µs | quant µs | fused µs | gemm TOPS | fused TOPS | fused/bf16 | gemm/bf16 "
          "| fused vs int4 fused |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['M']} | {r['K']} | {r['N']} | {r['bf16_us']:.1f} | {r['gemm_pow2_us']:.1f} | "
            f"{r['quant_pow2_us']:.1f} | {r['fused_pow2_us']:.1f} | {r['gemm_pow2_tops']:.0f} | "
            f"{r['fused_pow2_tops']:.0f} | {r['fused_pow2_vs_bf16']:.2f}x | {r['gemm_pow2_vs_bf16']:.2f}x | "
            f"{r['fused_us'] / r['fused_pow2_us']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

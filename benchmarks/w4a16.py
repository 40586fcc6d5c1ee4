"""Benchmark of the Triton W4A16 kernels against cuBLAS BF16 and the reference path.

Shapes: the T5-XXL encoder's linears at 512 tokens (q/k/v/o 4096x4096, wi_0/wi_1 4096->10240,
wo 10240->4096) and FLUX's AdaLN modulation linears at one row (3072 -> 18432 / 9216).
For each: median µs (triton.testing.do_bench) of
  bf16       torch.matmul(x, w^T) on the BF16 weight (cuBLAS)
  w4a16      nunchaku.ops.w4a16_linear: the Triton GEMM (M > 16) or GEMV (M <= 16)
  reference  the reference path: dequantize W on every call, then matmul
and the T5-XXL encoder's linear time per 512-token prompt (24 layers) for each.
Usage: python benchmarks/w4a16.py [--json PATH] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nunchaku import ops
from nunchaku.ops import reference
from nunchaku.quant.int4 import pack_int4_nibbles, quantize_weight_uint4_asym

# (name, M, K, N, group size as our checkpoints use it, how many of this linear the T5-XXL
# encoder has: 24 layers)
SHAPES = [
    ("t5 q/k/v/o", 512, 4096, 4096, 128, 24 * 4),
    ("t5 wi_0/wi_1", 512, 4096, 10240, 128, 24 * 2),
    ("t5 wo", 512, 10240, 4096, 128, 24),
    ("adaln double", 1, 3072, 18432, 64, 0),
    ("adaln single", 1, 3072, 9216, 64, 0),
]


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def random_layer(m: int, k: int, n: int, group: int):
    """x [M, K] and a random [N, K] weight: W4A16-quantized (qweight, scales, zeros) and in BF16."""
    dt = torch.bfloat16
    w = torch.randn(n, k, device="cuda") / k**0.5
    codes, scales, zeros = quantize_weight_uint4_asym(w, group)
    qp, s, z = pack_int4_nibbles(codes), scales.to(dt), zeros.to(dt)
    x = torch.randn(m, k, device="cuda", dtype=dt)
    return x, qp, s, z, w.to(dt)


def run(name: str, m: int, k: int, n: int, group: int) -> dict:
    x, qp, s, z, w_bf16 = random_layer(m, k, n, group)
    res = {"name": name, "M": m, "K": k, "N": n, "group": group}
    res["bf16_us"] = bench(lambda: torch.matmul(x, w_bf16.t()))
    res["w4a16_us"] = bench(lambda: ops.w4a16_linear(x, qp, s, z, None, group))
    res["reference_us"] = bench(lambda: reference.w4a16_gemm(x, qp, s, z, None, group))
    y, exact = ops.w4a16_linear(x, qp, s, z, None, group), reference.w4a16_gemm(x.float(), qp, s, z, None, group)
    res["rel_err"] = ((y.float() - exact).norm() / exact.norm()).item()
    res["tflops_w4a16"] = 2 * m * n * k / res["w4a16_us"] / 1e6
    return res


# (BLOCK_M, BLOCK_N, warps, stages), timed besides the kernel's GEMM_CONFIG.
GEMM_SWEEP = [(128, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3),
              (64, 256, 4, 3), (64, 256, 8, 3), (128, 64, 4, 4), (256, 128, 8, 3)]


def sweep() -> None:
    """Time the GEMM's tile configurations (each checked against the reference; a configuration
    Triton cannot compile is reported and skipped)."""
    for name, m, k, n, group, _ in SHAPES:
        sweep_shape(name, m, k, n, group)


def sweep_shape(name: str, m: int, k: int, n: int, group: int) -> None:
    from nunchaku.ops import w4a16_triton

    if m <= w4a16_triton.MAX_ROWS:  # the GEMV's shapes: nothing to sweep
        return
    x, qp, s, z, w_bf16 = random_layer(m, k, n, group)
    exact = reference.w4a16_gemm(x.float(), qp, s, z, None, group)
    bf16_us = bench(lambda: torch.matmul(x, w_bf16.t()))
    configs = [w4a16_triton.GEMM_CONFIG] + [c for c in GEMM_SWEEP if c != w4a16_triton.GEMM_CONFIG]
    variants = [(f"gemm {c}", lambda c=c: w4a16_triton.launch_gemm(x, qp, s, z, None, c)) for c in configs]
    for label, fn in variants:
        try:
            y = fn()
        except Exception as exc:  # a tile Triton cannot fit (shared memory, registers): report it
            print(f"sweep {name} {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            continue
        err = ((y.float() - exact).norm() / exact.norm()).item()
        if err > 4e-3:  # a wrong kernel: one bf16 rounding of the output is ~1.7e-3
            print(f"sweep {name} {label}: WRONG, rel err {err:.1e}")
            continue
        us = bench(fn)
        print(f"sweep {name} M={m} K={k} N={n}: {label}: {us:.1f} us ({us / bf16_us:.2f}x bf16 {bf16_us:.1f}), "
              f"rel err {err:.1e}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--sweep", action="store_true",
                        help="time the GEMM's tile configurations instead")
    args = parser.parse_args()
    if args.sweep:
        sweep()
        return 0
    rows = [run(name, m, k, n, group) | {"count": count} for name, m, k, n, group, count in SHAPES]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| linear | M | K | N | group | bf16 µs | w4a16 µs | reference µs | w4a16/bf16 time | w4a16 TFLOPS | rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['M']} | {r['K']} | {r['N']} | {r['group']} | {r['bf16_us']:.1f} | {r['w4a16_us']:.1f} | "
              f"{r['reference_us']:.1f} | {r['w4a16_us'] / r['bf16_us']:.2f}x | {r['tflops_w4a16']:.0f} | "
              f"{r['rel_err']:.1e} |")
    totals = {key: sum(r[key] * r["count"] for r in rows) / 1e3 for key in ("bf16_us", "w4a16_us", "reference_us")}
    print(f"T5-XXL encoder linears, one 512-token prompt: bf16 {totals['bf16_us']:.1f} ms, "
          f"w4a16 {totals['w4a16_us']:.1f} ms, reference {totals['reference_us']:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows,
                                         "t5_linears_ms": totals}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

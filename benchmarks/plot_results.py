"""Draw the README's benchmark figures from the JSON the benchmarks write.

    python benchmarks/plot_results.py            # every JSON found in benchmarks/results/ -> docs/images/

Inputs (each optional; a missing one is reported and skipped):
  benchmarks/results/quality_demo.json   benchmarks/quality_demo.py --json
  benchmarks/results/flux_step.json      benchmarks/flux_step.py --json
  benchmarks/results/gemm.json           benchmarks/gemm.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plot_quality_demo(data: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = data["results"]
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    quantized = [n for n in names if "psnr_db" in rows[n]]
    axes[0].bar(quantized, [rows[n]["psnr_db"] for n in quantized], color="#3b6fb6")
    axes[0].set_title("PSNR vs BF16 (dB, higher is better)")
    axes[1].bar(quantized, [rows[n]["ssim"] for n in quantized], color="#3b6fb6")
    axes[1].set_title("SSIM vs BF16")
    axes[1].set_ylim(min(rows[n]["ssim"] for n in quantized) - 0.05, 1.0)
    kinds = [k for k in rows[names[0]]["pass_rate"] if k != "all"]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        axes[2].bar([x + i * width for x in range(len(names))], [100 * rows[n]["pass_rate"][kind] for n in names],
                    width, label=kind)
    axes[2].set_xticks([x + width * (len(kinds) - 1) / 2 for x in range(len(names))], names)
    axes[2].set_title("faithfulness pass rate (%)")
    axes[2].legend(fontsize=8, loc="center right")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"Demo model, {data['prompts']} held-out prompts, {data['steps']} steps, "
                 f"true CFG {data['true_cfg_scale']:g}")
    fig.tight_layout()
    path = out / "quality_demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_flux_step(data: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["batch"] == min(r["batch"] for r in data["rows"])]
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].bar(names, [r["step_ms"] for r in rows], color="#3b6fb6")
    axes[0].set_title(f"step time, ms (batch {rows[0]['batch']}, lower is better)")
    axes[1].bar(names, [r["weights_gib"] for r in rows], color="#6a9f3b", label="weights")
    axes[1].bar(names, [r["peak_gib"] - r["weights_gib"] for r in rows], bottom=[r["weights_gib"] for r in rows],
                color="#c8d9b5", label="peak above weights")
    axes[1].set_title("GPU memory, GiB")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"FLUX.1 12B shape, 1024x1024, one transformer step ({data['device']})")
    fig.tight_layout()
    path = out / "flux_step.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gemm(data: list[dict], out: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = [r for r in data if r["M"] == max(r["M"] for r in data)]
    labels = [f"{r['K']}x{r['N']}" for r in rows]
    series = {"FP8 rowwise": [r["bf16_us"] / r["fp8_us"] for r in rows],
              "W4A4 GEMM": [r["bf16_us"] / r["gemm_us"] for r in rows],
              "W4A4 fused layer": [r["bf16_us"] / r["fused_us"] for r in rows]}
    if all("fused_pow2_us" in r for r in rows):
        series["pow2 activations: GEMM"] = [r["bf16_us"] / r["gemm_pow2_us"] for r in rows]
        series["pow2 activations: fused layer"] = [r["bf16_us"] / r["fused_pow2_us"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 3.4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(rows))], values, width, label=name)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.5, color="#b33", lw=0.8, ls="--", label="target 1.5x")
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(rows))], labels)
    ax.set_ylabel("speed vs cuBLAS BF16")
    ax.set_title(f"GEMM on FLUX shapes (K x N), M = {rows[0]['M']} tokens")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = out / "gemm.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = {"quality_demo.json": plot_quality_demo, "flux_step.json": plot_flux_step, "gemm.json": plot_gemm}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    drawn = 0
    for name, plot in PLOTS.items():
        source = args.results / name
        if not source.is_file():
            print(f"{source}: not there, skipped")
            continue
        print(f"{source} -> {plot(json.loads(source.read_text()), args.out)}")
        drawn += 1
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main())

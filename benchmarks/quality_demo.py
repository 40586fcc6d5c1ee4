"""Quality on a trained network: the embedded demo model in BF16, SVDQuant INT4 (also with the pow2
activation format), naive W4A4 and W4A16.

    python benchmarks/quality_demo.py                       # 200 held-out prompts, assets/demo
    python benchmarks/quality_demo.py --prompts 16 --json out.json

Every variant draws the same held-out prompts with the same seeds. Reported per variant: the
relative error of the transformer's one-step output (velocity) against BF16 on fixed noisy
latents of the first --probe-prompts prompts at t = 0.25/0.5/0.75 (no sampling chaos: the
quantization error alone), PSNR and SSIM of its images against the BF16 images (torchmetrics,
images in [0, 1], mean over images; a few images that drift to another composition dominate
these), and the faithfulness pass rate of `nunchaku.demo.checker` per prompt kind. The SVDQuant INT4 row
uses the shipped checkpoint (MODEL/svdq-int4) when there is one, so the figure is that of what
ships, and so does the pow2 row (the same weights, pow2 activations on the signed layers); the
other variants are quantized here by `nunchaku.demo.variants` on training-split captions. A grid
of the first prompts (one row per variant) is written next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nunchaku.apps.evaluation import psnr_ssim  # noqa: E402
from nunchaku.demo.checker import pass_rates  # noqa: E402
from nunchaku.demo.scenes import held_out_prompts  # noqa: E402
from nunchaku.demo.variants import (  # noqa: E402
    DEMO_SAMPLING, POW2_VARIANTS, DemoSampling, DemoVariant, calibration_prompts, quantize_demo_transformer,
    set_variant_activations,
)
from nunchaku.apps.common import compute_dtype  # noqa: E402
from nunchaku.pipelines import flux as nunchaku_flux  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo"


def load_variant(model: Path, variant: DemoVariant, args, sampling: DemoSampling, device: str):
    """A pipeline of `variant` on `device` and how it was made."""
    shipped = model / "svdq-int4"
    uses_shipped = variant in (DemoVariant.SVDQUANT_INT4, DemoVariant.SVDQUANT_POW2)
    if uses_shipped and shipped.is_dir() and not args.requantize:
        pipe = nunchaku_flux.from_pretrained(model, torch_dtype=compute_dtype(device), qmodel_path=shipped)
        set_variant_activations(pipe.transformer, variant)
        origin = f"shipped checkpoint {shipped.name}"
        if variant is DemoVariant.SVDQUANT_POW2:
            origin += ", pow2 activations on its signed layers"
        return pipe.to(device), origin
    pipe = nunchaku_flux.from_pretrained(model, torch_dtype=compute_dtype(device)).to(device)
    if variant is DemoVariant.BF16:
        return pipe, "trained weights"
    prompts = calibration_prompts(args.calib_prompts)
    quantize_demo_transformer(pipe, variant, prompts, sampling, rank=args.rank, progress=False)
    return pipe, f"quantized here on {len(prompts)} calibration prompts"


def generate(pipe, prompts: list[str], sampling: DemoSampling, seed: int, batch: int, device: str,
             label: str = "") -> list[np.ndarray]:
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in tqdm(range(0, len(prompts), batch), desc=label, unit="batch"):
        chunk = prompts[start:start + batch]
        out = pipe(chunk, output_type="np", generator=torch.Generator(device).manual_seed(seed + start),
                   **sampling.pipeline_kwargs(len(chunk))).images
        images.extend(np.clip(out, 0.0, 1.0))
    return images


@torch.no_grad()
def velocity_probe(pipe, prompts: list[str], sampling: DemoSampling, seed: int, device: str,
                   timesteps: tuple[float, ...] = (0.25, 0.5, 0.75)) -> torch.Tensor:
    """The transformer's output (the flow velocity) for each prompt at a few noise levels, from
    fixed noisy latents: one step, so unlike the images it carries no sampling chaos and shows
    the quantization error alone. float32 [len(prompts) * len(timesteps), tokens, channels]."""
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
    channels = pipe.transformer.config.in_channels // 4
    latents, image_ids = pipe.prepare_latents(len(prompts), channels, sampling.size, sampling.size, embeds.dtype,
                                              device, torch.Generator(device).manual_seed(seed))
    outputs = []
    for t in timesteps:
        timestep = torch.full((len(prompts),), t, device=device, dtype=embeds.dtype)
        outputs.append(pipe.transformer(hidden_states=latents, timestep=timestep, guidance=None,
                                        pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                        img_ids=image_ids, return_dict=False)[0].float().cpu())
    return torch.cat(outputs)


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def image_metrics(images: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
    psnr, ssim = psnr_ssim(_batch(images), _batch(reference))
    return {"psnr_db": psnr.value, "ssim": ssim.value}


def faithfulness(prompts: list[str], images: list[np.ndarray]) -> dict[str, float]:
    return pass_rates(prompts, [(image * 255).round().astype(np.uint8) for image in images])


def save_grid(rows: dict[str, list[np.ndarray]], path: Path, columns: int = 8) -> None:
    from PIL import Image, ImageDraw

    size = next(iter(rows.values()))[0].shape[0]
    label = 110
    grid = Image.new("RGB", (label + columns * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, r * size + size // 2 - 6), name, fill="black")
        for c, image in enumerate(images[:columns]):
            grid.paste(Image.fromarray((image * 255).round().astype(np.uint8)), (label + c * size, r * size))
    grid.save(path)


def run(args) -> dict:
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"{model} is not a diffusers pipeline folder (the demo model is made by "
                         "scripts/train_demo_model.py and shipped in assets/demo)")
    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = DemoSampling(args.steps or DEMO_SAMPLING.steps,
                            DEMO_SAMPLING.true_cfg_scale if args.cfg is None else args.cfg, DEMO_SAMPLING.size)
    prompts = held_out_prompts(args.prompts, seed=args.prompt_seed)
    variants = [DemoVariant(v) for v in args.variants]
    if variants[0] is not DemoVariant.BF16:
        variants = [DemoVariant.BF16, *[v for v in variants if v is not DemoVariant.BF16]]
    results, images, velocities = {}, {}, {}
    probe_prompts = prompts[:args.probe_prompts]
    for variant in variants:
        t0 = time.perf_counter()
        pipe, origin = load_variant(model, variant, args, sampling, args.device)
        images[variant.value] = generate(pipe, prompts, sampling, args.seed, args.batch, args.device, variant.value)
        velocities[variant.value] = velocity_probe(pipe, probe_prompts, sampling, args.seed, args.device)
        row = {"origin": origin, "seconds": round(time.perf_counter() - t0, 1),
               "pass_rate": faithfulness(prompts, images[variant.value])}
        if variant is not DemoVariant.BF16:
            row.update(image_metrics(images[variant.value], images["bf16"]))
            ref = velocities["bf16"]
            row["velocity_rel_err"] = float((velocities[variant.value] - ref).norm() / ref.norm())
        results[variant.value] = row
        print(f"{variant.value}: {row}", file=sys.stderr, flush=True)
        del pipe
    report = {"model": str(model), "prompts": len(prompts), "steps": sampling.steps,
              "true_cfg_scale": sampling.true_cfg_scale, "size": sampling.size, "seed": args.seed,
              "results": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        save_grid(images, Path(args.json).with_suffix(".png"))
    return report


def format_table(report: dict) -> str:
    kinds = sorted({k for r in report["results"].values() for k in r["pass_rate"] if k != "all"})
    head = ["variant", "velocity rel. err", "PSNR vs BF16 (dB)", "SSIM vs BF16", *[f"pass {k}" for k in kinds],
            "pass all"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in report["results"].items():
        psnr = f"{r['psnr_db']:.2f}" if "psnr_db" in r else "-"
        ssim = f"{r['ssim']:.4f}" if "ssim" in r else "-"
        vel = f"{r['velocity_rel_err']:.4f}" if "velocity_rel_err" in r else "-"
        rates = [f"{100 * r['pass_rate'].get(k, float('nan')):.1f}%" for k in kinds]
        lines.append("| " + " | ".join([name, vel, psnr, ssim, *rates, f"{100 * r['pass_rate']['all']:.1f}%"]) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="demo pipeline folder (default assets/demo)")
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts")
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (the same for every variant)")
    # The pow2 variants only on request: the Ampere/Ada kernels do not run that format.
    p.add_argument("--variants", nargs="+", default=[v.value for v in DemoVariant if v not in POW2_VARIANTS],
                   choices=[v.value for v in DemoVariant])
    p.add_argument("--steps", type=int, help=f"sampling steps (default {DEMO_SAMPLING.steps})")
    p.add_argument("--cfg", type=float, help=f"true CFG scale, 1 = off (default {DEMO_SAMPLING.true_cfg_scale})")
    p.add_argument("--calib-prompts", type=int, default=64)
    p.add_argument("--probe-prompts", type=int, default=32, help="prompts of the one-step velocity error")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--requantize", action="store_true", help="quantize SVDQuant INT4 here even if a checkpoint ships")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="write the report here (and the image grid next to it, .png)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    report = run(parse_args(argv))
    print(f"{report['prompts']} held-out prompts, {report['steps']} steps, true CFG {report['true_cfg_scale']:g}, "
          f"{report['size']}x{report['size']}")
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `nunchaku` command.

    nunchaku quantize MODEL --out DIR     calibrate a local diffusers FLUX folder and write an SVDQuant INT4 checkpoint
    nunchaku quantize-t5 MODEL --out FILE W4A16 T5 text encoder of a local FLUX folder
    nunchaku convert CHECKPOINT --out DIR turn an official SVDQuant INT4 checkpoint into ours
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "calibration_prompts.txt"
DTYPES = {"bfloat16": "bfloat16", "float16": "float16"}


def _read_prompts(path: Path, limit: int) -> list[str]:
    try:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise SystemExit(f"nunchaku: cannot read prompts from {path}: {e}") from None
    if not prompts:
        raise SystemExit(f"nunchaku: {path} holds no prompts")
    return prompts[:limit]


def _quantize(args) -> int:
    import torch

    from .models.flux import quant_plan, quantize_transformer_in_place, to_nunchaku_layout
    from .models.flux_loading import save_quantized_transformer
    from .pipelines.flux import NunchakuFluxPipeline
    from .quant.calibration import CalibrationCollector
    from .quant.quantizer import QuantizerOptions, format_report, quantize_model
    from .quant.svdquant import DecomposeOptions, SVDMethod

    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"nunchaku: {model} is not a local diffusers pipeline folder (no model_index.json)")
    dtype = getattr(torch, args.dtype)
    pipe = NunchakuFluxPipeline.from_pretrained(model, torch_dtype=dtype).to(args.device)
    transformer = to_nunchaku_layout(pipe.transformer)
    is_dev = bool(transformer.config.guidance_embeds)
    steps = args.steps or (20 if is_dev else 4)
    guidance = args.guidance if args.guidance is not None else (3.5 if is_dev else 0.0)
    prompts = _read_prompts(Path(args.prompts), args.num_prompts)
    plan = quant_plan(transformer, unsigned_fc2=not args.diffusers_compatible)
    print(f"calibrating on {len(prompts)} prompts x {steps} steps ({'dev' if is_dev else 'schnell'}-style), "
          f"{args.height}x{args.width}", file=sys.stderr)
    with CalibrationCollector(transformer, plan.calibration_targets(), max_samples=args.max_samples,
                              seed=args.seed) as calib:
        for i in range(0, len(prompts), args.batch_size):
            pipe(prompts[i:i + args.batch_size], num_inference_steps=steps, guidance_scale=guidance,
                 height=args.height, width=args.width, output_type="latent",
                 generator=torch.Generator(args.device).manual_seed(args.seed + i))
    stats = calib.stats()
    options = QuantizerOptions(
        decompose=DecomposeOptions(rank=args.rank, refine_iters=args.refine_iters, svd_method=SVDMethod(args.svd),
                                   storage_dtype=dtype),
        alphas=tuple(args.alphas), device=args.device,
    )
    result = quantize_model(transformer, plan, stats, options, work_dir=args.work_dir)
    quantize_transformer_in_place(transformer, result)
    out = save_quantized_transformer(args.out, transformer, diffusers_compatible=args.diffusers_compatible)
    print(format_report(result.reports))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _convert(args) -> int:
    from .models.flux_loading import MissingBaseModelError, save_quantized_transformer
    from .pipelines.flux import load_transformer

    try:
        transformer = load_transformer(args.base, args.checkpoint)
    except MissingBaseModelError as e:
        raise SystemExit(f"nunchaku: {e.detail}: pass --base MODEL (the BF16 FLUX.1 it was made from)") from None
    out = save_quantized_transformer(args.out, transformer)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _quantize_t5(args) -> int:
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    from .models.text_encoders import quantize_t5_encoder, save_quantized_t5, t5_memory_report

    model = Path(args.model)
    if not (model / "text_encoder_2").is_dir():
        raise SystemExit(f"nunchaku: {model} has no text_encoder_2/ folder (a local diffusers FLUX.1 pipeline?)")
    encoder = T5EncoderModel.from_pretrained(model / "text_encoder_2", torch_dtype=getattr(torch, args.dtype))
    encoder = encoder.to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer_2")
    prompts = _read_prompts(Path(args.prompts), args.num_prompts)
    quantize_t5_encoder(encoder, prompts, tokenizer, group_size=args.group_size)
    save_quantized_t5(encoder, args.out)
    report = t5_memory_report(encoder.config, args.group_size)
    print(f"wrote {args.out}: weights {report['bf16_bytes'] / 2**30:.2f} GiB in BF16 -> "
          f"{report['w4a16_bytes'] / 2**30:.2f} GiB in W4A16", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nunchaku", description="SVDQuant 4-bit FLUX: quantize and convert checkpoints")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a local diffusers FLUX.1 folder (schnell, dev or a fine-tune)")
    q.add_argument("model", help="local diffusers FluxPipeline folder (with model_index.json)")
    q.add_argument("--out", required=True, help="output folder (a nunchaku_lite transformer folder)")
    q.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="calibration prompts, one per line "
                   "(default: the set shipped with nunchaku)")
    q.add_argument("--num-prompts", type=int, default=32)
    q.add_argument("--steps", type=int, help="denoising steps per prompt (default: 4 schnell, 20 dev)")
    q.add_argument("--guidance", type=float, help="guidance scale (default: 0 schnell, 3.5 dev)")
    q.add_argument("--height", type=int, default=1024)
    q.add_argument("--width", type=int, default=1024)
    q.add_argument("--batch-size", type=int, default=1)
    q.add_argument("--rank", type=int, default=32, help="rank of the 16-bit low-rank branch (multiple of 16)")
    q.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                   help="smoothing strengths searched per layer")
    q.add_argument("--refine-iters", type=int, default=0, help="low-rank refinement iterations against the "
                   "quantized residual")
    q.add_argument("--svd", choices=["exact", "randomized"], default="randomized")
    q.add_argument("--max-samples", type=int, default=256, help="calibration tokens kept per layer")
    q.add_argument("--device", default="cuda" if _cuda() else "cpu")
    q.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    q.add_argument("--work-dir", help="keep finished blocks here; a rerun resumes after the last one")
    q.add_argument("--diffusers-compatible", action="store_true",
                   help="signed fc2 activations, one rank: loadable by diffusers' own nunchaku_lite runtime")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_quantize)

    t = sub.add_parser("quantize-t5", help="quantize the T5 text encoder of a local FLUX.1 folder to W4A16 (g128)")
    t.add_argument("model", help="local diffusers FluxPipeline folder")
    t.add_argument("--out", required=True, help="output .safetensors file")
    t.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    t.add_argument("--num-prompts", type=int, default=32)
    t.add_argument("--group-size", type=int, choices=[64, 128], default=128)
    t.add_argument("--device", default="cuda" if _cuda() else "cpu")
    t.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    t.set_defaults(func=_quantize_t5)

    c = sub.add_parser("convert", help="convert an official SVDQuant INT4 checkpoint to a nunchaku_lite folder")
    c.add_argument("checkpoint", help="local file/folder or Hub path org/repo/file.safetensors")
    c.add_argument("--out", required=True)
    c.add_argument("--base", help="the BF16 FLUX.1 model (needed for v0.1 files, which hold the blocks only)")
    c.set_defaults(func=_convert)
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "quantize" and args.rank % 16:
        raise SystemExit(f"nunchaku: --rank must be a multiple of 16, got {args.rank}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

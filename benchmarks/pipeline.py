"""FLUX.1-schnell end to end on the GPU: text encoders + 4 transformer steps + VAE decode, 1024x1024.

    python benchmarks/pipeline.py                      # bf16, int4, int4 + W4A16 T5
    python benchmarks/pipeline.py --variants int4 --steps 4 --json out.json

Random weights at the real shapes (FLUX.1 12B transformer, T5-XXL encoder, CLIP-L text encoder,
the FLUX VAE), word-level tokenizers (token ids do not change the cost), 512 T5 tokens. Variants:
  bf16        everything in BF16 (diffusers eager)
  int4        our SVDQuant INT4 transformer (quantized here by the quantizer), BF16 encoders
  int4-qenc   the same with the W4A16 T5 encoder (nunchaku.models.text_encoders)
  int4-qenc-graph  the same with the transformer's forward replayed as a CUDA graph
              (nunchaku.cuda_graph.CUDAGraphForward: no CPU launch overhead in the steps)
  int4-pow2-qenc-graph  int4-qenc-graph with the Hopper kernels' pow2 activation format
              (nunchaku.ops.Sm90Activations.POW2)
Reported: median end-to-end latency over --repeats calls after --warmup, peak GPU memory of a
call, and the weight memory of the transformer and the T5 encoder; with --breakdown also the
stages outside the denoising loop (text encoders, VAE decode, conversion to PIL), timed alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flux_step import (  # noqa: E402
    FLUX_12B, GIB, SMALL, _peak_gib, _reset_peak, _sync, build_bf16, on_device_bf16, quantize_int4,
    step_inputs, weight_bytes,
)

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=3,
              decoder_start_token_id=0)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, pad_token_id=0, bos_token_id=2, eos_token_id=3)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)
WORDS = ("a", "cat", "holding", "sign", "that", "says", "hello", "world", "red", "circle", "in", "the", "park",
         "at", "night", "photo", "of", "mountain", "lake", "sunset")
PROMPT = "a photo of a cat holding a sign that says hello world in the park at night"
VARIANTS = ("bf16", "int4", "int4-qenc", "int4-qenc-graph", "int4-pow2-qenc-graph")
# --small: a smoke check of the script itself (CPU too), not a measurement
SMALL_T5 = {**T5_XXL, "vocab_size": 64, "d_model": 128, "d_kv": 32, "d_ff": 128, "num_layers": 2, "num_heads": 4}
SMALL_CLIP = {**CLIP_L, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "projection_dim": 32}
SMALL_VAE = {**FLUX_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8}


def build_pipeline(seed: int, small: bool, device: str):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from nunchaku.models.tiny import make_word_tokenizer
    from nunchaku.pipelines.flux import NunchakuFluxPipeline

    if small:
        small_transformer = {**SMALL, "in_channels": 64, "joint_attention_dim": 128}
        transformer_config, t5_config, clip_config, vae_config = small_transformer, SMALL_T5, SMALL_CLIP, SMALL_VAE
    else:
        transformer_config, t5_config, clip_config, vae_config = FLUX_12B, T5_XXL, CLIP_L, FLUX_VAE
    transformer = build_bf16(seed, transformer_config, device)
    t5 = on_device_bf16(lambda: T5EncoderModel(T5Config(**t5_config)), device)
    clip = on_device_bf16(lambda: CLIPTextModel(CLIPTextConfig(**clip_config)), device)
    vae = on_device_bf16(lambda: AutoencoderKL(**vae_config), device)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return NunchakuFluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, text_encoder_2=t5,
                                transformer=transformer, tokenizer=make_word_tokenizer(WORDS, 77, add_bos=True),
                                tokenizer_2=make_word_tokenizer(WORDS, 512, add_bos=False))


def _call(pipe, args):
    pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=0.0,
         max_sequence_length=512, generator=torch.Generator(args.device).manual_seed(0), output_type="pil")


# The pipeline's stages that are not the denoising loop, as (label, owner, method name).
STAGES = (("text encoders", None, "encode_prompt"), ("VAE decode", "vae", "decode"),
          ("to PIL", "image_processor", "postprocess"))


def time_stages(pipe, args) -> dict:
    """Median seconds per stage over --repeats more calls, each stage between two device syncs
    (separate calls from the latency's: the syncs add a little to a call). The rest of a call
    (denoising steps, scheduler, latent packing) is its total minus the stages."""
    records = {label: [] for label, _, _ in STAGES}
    totals = []
    saved = []
    for label, owner_name, method in STAGES:
        owner = pipe if owner_name is None else getattr(pipe, owner_name)
        original = getattr(owner, method)

        def timed(*a, _original=original, _label=label, **kw):
            _sync(args.device)
            start = time.perf_counter()
            out = _original(*a, **kw)
            _sync(args.device)
            records[_label].append(time.perf_counter() - start)
            return out

        saved.append((owner, method, vars(owner).get(method)))
        setattr(owner, method, timed)
    try:
        for _ in range(args.repeats):
            _sync(args.device)
            start = time.perf_counter()
            _call(pipe, args)
            _sync(args.device)
            totals.append(time.perf_counter() - start)
    finally:
        for owner, method, own_attribute in saved:
            if own_attribute is None:
                delattr(owner, method)
            else:
                setattr(owner, method, own_attribute)
    stages = {label: statistics.median(times) for label, times in records.items()}
    stages["denoising and the rest"] = statistics.median(totals) - sum(stages.values())
    return {label: round(seconds, 4) for label, seconds in stages.items()}


def time_pipeline(pipe, args, graph_pools: bool = False) -> tuple[float, float]:
    """(median s, peak GiB of a call). graph_pools: the transformer replays a CUDA graph, whose
    intermediates live in a private pool the allocated-bytes peak misses: the pool is added."""
    def call():
        _call(pipe, args)

    for _ in range(args.warmup):
        call()
    _sync(args.device)
    _reset_peak(args.device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        _sync(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), _peak_gib(args.device, graph_pools)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5], help="smoothing grid of the quick quantization")
    p.add_argument("--max-samples", type=int, default=256)
    p.add_argument("--calib-inputs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signed-post-gelu", action="store_true",
                   help="quantize the post-GELU layers' activations signed (quant_plan(unsigned_fc2=False)), "
                        "so that the pow2 variant covers them too")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the text encoders, the VAE decode and the conversion to PIL images on their "
                        "own (extra calls, each stage between device syncs)")
    p.add_argument("--small", action="store_true", help="tiny shapes: a smoke check of the script, CPU too")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("pipeline.py measures the GPU pipeline: no CUDA device here (--small --device cpu to "
                         "smoke-test it)")
    from nunchaku.ops import sm90

    pipe = build_pipeline(args.seed, args.small, args.device)
    pipe.set_progress_bar_config(disable=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    report = {"device": device_name, "torch": torch.__version__, "steps": args.steps, "size": args.size,
              "signed_post_gelu": args.signed_post_gelu,
              "kernels": "sm90 extension" if sm90.extension_available() else "reference",
              "rows": []}

    def record(variant: str, extra: dict | None = None, graph_pools: bool = False):
        latency, peak = time_pipeline(pipe, args, graph_pools)
        row = {"variant": variant, "latency_s": round(latency, 3), "peak_gib": round(peak, 2),
               "transformer_gib": round(weight_bytes(pipe.transformer) / GIB, 2),
               "t5_gib": round(weight_bytes(pipe.text_encoder_2) / GIB, 2), **(extra or {})}
        if args.breakdown:
            row["stages_s"] = time_stages(pipe, args)
        report["rows"].append(row)
        print(row, flush=True)

    wanted = set(args.variants)
    if "bf16" in wanted:
        record("bf16")
    if wanted & {"int4", "int4-qenc", "int4-qenc-graph", "int4-pow2-qenc-graph"}:
        tokens = (args.size // 16) ** 2, 512
        calib = [step_inputs(1, 1000 + i, dict(pipe.transformer.config), tokens, args.device)
                 for i in range(args.calib_inputs)]
        quant = quantize_int4(pipe.transformer, calib, args)
        del calib
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if "int4" in wanted:
            record("int4", {"quantize_s": quant["quantize_s"]})
        if wanted & {"int4-qenc", "int4-qenc-graph", "int4-pow2-qenc-graph"}:
            from nunchaku.models.text_encoders import quantize_t5_encoder

            start = time.perf_counter()
            quantize_t5_encoder(pipe.text_encoder_2, [PROMPT, "a mountain lake at sunset"], pipe.tokenizer_2,
                                group_size=128, progress=False)
            t5_quantize_s = round(time.perf_counter() - start, 1)
            if "int4-qenc" in wanted:
                record("int4-qenc", {"t5_quantize_s": t5_quantize_s})
            for variant in ("int4-qenc-graph", "int4-pow2-qenc-graph"):
                if variant not in wanted:
                    continue
                if not args.device.startswith("cuda"):
                    print(f"{variant}: CUDA graphs need a CUDA device; skipped", flush=True)
                    continue
                from nunchaku.cuda_graph import CUDAGraphForward
                from nunchaku.nn import set_sm90_activations
                from nunchaku.ops import Sm90Activations

                pow2 = variant == "int4-pow2-qenc-graph"
                set_sm90_activations(pipe.transformer, Sm90Activations.POW2 if pow2 else Sm90Activations.INT4)
                pipe.transformer.forward = CUDAGraphForward(pipe.transformer)
                record(variant, graph_pools=True)
                del pipe.transformer.forward
                set_sm90_activations(pipe.transformer, Sm90Activations.INT4)
    base = next((r["latency_s"] for r in report["rows"] if r["variant"] == "bf16"), None)
    print(f"{report['device']}, {args.steps} steps, {args.size}x{args.size}, kernels: {report['kernels']}")
    print("| variant | end to end s | vs bf16 | peak GiB | transformer GiB | T5 GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in report["rows"]:
        ratio = f"{base / r['latency_s']:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['latency_s']:.3f} | {ratio} | {r['peak_gib']:.2f} | {r['transformer_gib']:.2f} | "
              f"{r['t5_gib']:.2f} |")
    if args.breakdown:
        labels = list(report["rows"][0]["stages_s"]) if report["rows"] else []
        print("| variant | " + " | ".join(f"{label} s" for label in labels) + " |")
        print("| --- |" + " --- |" * len(labels))
        for r in report["rows"]:
            print(f"| {r['variant']} | " + " | ".join(f"{r['stages_s'][label]:.3f}" for label in labels) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

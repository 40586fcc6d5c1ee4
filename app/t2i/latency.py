"""Latency of text-to-image generation: end to end, or one transformer step.

    python app/t2i/latency.py -m demo -p int4                  # end to end, the model's steps
    python app/t2i/latency.py -m schnell -p int4 bf16 --mode step --repeats 20

end2end times whole pipeline calls (text encoding, every denoising step, VAE decode); step times
one transformer forward on inputs prepared once (packed latents, prompt embeddings, ids), which
is the part the 4-bit engine speeds up. Both run --warmup untimed calls first and report the
median, mean and min of --repeats timed ones (synchronizing the GPU around each), and the peak
GPU memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout too

from nunchaku.apps.common import MODELS, choose_model, default_device, load_pipelines  # noqa: E402
from nunchaku.apps.t2i import precisions_from_flags  # noqa: E402

PROMPT = "a red circle above a blue square on a yellow background"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, warmup: int, repeats: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def step_inputs(pipe, prompt: str, size: int, device: str, guidance: float) -> dict:
    """One denoising step's transformer inputs, as FluxPipeline builds them."""
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device)
    channels = pipe.transformer.config.in_channels // 4
    latents, image_ids = pipe.prepare_latents(1, channels, size, size, embeds.dtype, device,
                                              torch.Generator("cpu").manual_seed(0))
    guidance_t = (torch.full((1,), guidance, device=device, dtype=torch.float32)
                  if pipe.transformer.config.guidance_embeds else None)
    return dict(hidden_states=latents, timestep=torch.full((1,), 0.5, device=device, dtype=embeds.dtype),
                guidance=guidance_t, pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                img_ids=image_ids, return_dict=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", choices=sorted(MODELS), default=None)
    p.add_argument("-p", "--precisions", nargs="+", default=["int4"], metavar="{int4,bf16}")
    p.add_argument("--model-path")
    p.add_argument("--qmodel-path")
    p.add_argument("--use-qencoder", action="store_true")
    p.add_argument("--qencoder-path")
    p.add_argument("--mode", choices=["end2end", "step"], default="end2end")
    p.add_argument("--steps", type=int, help="denoising steps for end2end (default: the model's)")
    p.add_argument("--guidance", type=float)
    p.add_argument("--size", type=int)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--device", default=default_device())
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")

    spec = choose_model(args.model, args.model_path, args.qmodel_path)
    precisions = precisions_from_flags(args.precisions)
    pipes = load_pipelines(spec, precisions, args.device, args.use_qencoder, args.qencoder_path)
    steps = args.steps or spec.steps
    guidance = spec.guidance if args.guidance is None else args.guidance
    size = args.size or spec.size
    cuda = args.device.startswith("cuda")
    print(f"{spec.name}, {args.mode}, {size}x{size}" + (f", {steps} steps" if args.mode == "end2end" else "")
          + f", device {args.device}, {args.warmup} warm-up + {args.repeats} timed runs")
    print(f"{'precision':<10} {'median s':>10} {'mean s':>10} {'min s':>10} {'peak GiB':>9}")
    for precision, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        if args.mode == "end2end":
            def run(pipe=pipe):
                pipe(args.prompt, height=size, width=size, generator=torch.Generator("cpu").manual_seed(0),
                     **spec.pipeline_kwargs(steps, guidance))
        else:
            inputs = step_inputs(pipe, args.prompt, size, args.device, guidance)

            def run(pipe=pipe, inputs=inputs):
                with torch.inference_mode():
                    pipe.transformer(**inputs)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = _timed(run, args.warmup, args.repeats, args.device)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:9.2f}" if cuda else f"{'-':>9}"
        print(f"{precision.value:<10} {statistics.median(times):10.4f} {statistics.mean(times):10.4f} "
              f"{min(times):10.4f} {peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

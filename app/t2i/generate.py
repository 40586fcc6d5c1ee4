"""Generate images from a prompt file or a dataset folder, for evaluate.py.

    python app/t2i/generate.py -m demo -p int4 --prompts prompts.txt --out out/int4
    python app/t2i/generate.py -m schnell -p bf16 --prompts dataset/ --out out/bf16

--prompts is a text file (one prompt per line; images 00000.png, 00001.png, ...), a JSON file
({name: prompt} or a list of prompts), or a dataset folder of captions (name.txt next to name.png;
each image is generated as name.png so evaluate.py pairs it with the reference). The prompts used
go to OUT/prompts.json. Seeds are --seed + the prompt's index, so runs are reproducible and two
precisions get the same noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout too

from nunchaku.apps.common import MODELS, Precision, choose_model, default_device, load_pipelines  # noqa: E402


def read_prompt_source(source: Path) -> dict[str, str]:
    if source.is_dir():
        prompts = {p.stem: p.read_text().strip() for p in sorted(source.glob("*.txt"))}
    elif source.suffix == ".json":
        data = json.loads(source.read_text())
        prompts = data if isinstance(data, dict) else {f"{i:05d}": p for i, p in enumerate(data)}
    elif source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        prompts = {f"{i:05d}": line for i, line in enumerate(x for x in lines if x)}
    else:
        raise SystemExit(f"--prompts: {source} does not exist")
    empty = [name for name, p in prompts.items() if not isinstance(p, str) or not p.strip()]
    if empty:
        raise SystemExit(f"--prompts: empty prompt for {empty[:5]}")
    if not prompts:
        raise SystemExit(f"--prompts: no prompts in {source}")
    return prompts


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", choices=sorted(MODELS), default=None)
    p.add_argument("-p", "--precision", choices=[x.value for x in Precision], default="int4")
    p.add_argument("--model-path", help="a local diffusers FLUX pipeline folder instead of -m's")
    p.add_argument("--qmodel-path", help="its SVDQuant INT4 checkpoint")
    p.add_argument("--use-qencoder", action="store_true")
    p.add_argument("--qencoder-path")
    p.add_argument("--prompts", required=True, type=Path, help="text file, JSON file or dataset folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--steps", type=int, help="default: the model's")
    p.add_argument("--guidance", type=float, help="default: the model's")
    p.add_argument("--size", type=int, help="height and width (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device())
    args = p.parse_args(argv)

    spec = choose_model(args.model, args.model_path, args.qmodel_path)
    prompts = read_prompt_source(args.prompts)
    if args.limit:
        prompts = dict(list(prompts.items())[:args.limit])
    precision = Precision(args.precision)
    pipe = load_pipelines(spec, [precision], args.device, args.use_qencoder, args.qencoder_path)[precision]
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps or spec.steps
    guidance = spec.guidance if args.guidance is None else args.guidance
    size = args.size or spec.size
    args.out.mkdir(parents=True, exist_ok=True)
    for index, (name, prompt) in enumerate(tqdm(prompts.items(), desc=f"{spec.name} {precision.value}")):
        image = pipe(prompt, height=size, width=size, generator=torch.Generator("cpu").manual_seed(args.seed + index),
                     **spec.pipeline_kwargs(steps, guidance)).images[0]
        image.save(args.out / f"{name}.png")
    (args.out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    settings = {"model": spec.name, "base": spec.base, "precision": precision.value, "steps": steps,
                "guidance": guidance, "size": size, "seed": args.seed, "device": args.device}
    (args.out / "settings.json").write_text(json.dumps(settings, indent=1))
    print(f"wrote {len(prompts)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Text-to-image Gradio app. See `python app/t2i/run_gradio.py --help` and the README."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout too

from nunchaku.apps.common import (  # noqa: E402
    APP_CSS,
    add_model_flags, add_safety_flags, add_server_flags, attach_loras, choose_model, load_pipelines,
    parse_lora_flags, safety_checker_from_flags,
)
from nunchaku.apps.t2i import build_app, precisions_from_flags  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="Nunchaku 4-bit FLUX text-to-image demo")
    add_model_flags(p)
    p.add_argument("-p", "--precisions", nargs="+", default=["int4"], metavar="{int4,bf16}",
                   help="one model, or two side by side (e.g. -p int4 bf16)")
    add_safety_flags(p)
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="offer a LoRA file in the app's LoRA menu (repeatable); diffusers/PEFT, BFL or kohya format")
    add_server_flags(p, port=7860)
    args = p.parse_args(argv)

    spec = choose_model(args.model, args.model_path, args.qmodel_path)
    loras = parse_lora_flags(args.lora)
    if loras:
        spec = dataclasses.replace(spec, loras={**spec.loras, **loras})
    precisions = precisions_from_flags(args.precisions)
    pipelines = load_pipelines(spec, precisions, args.device, args.use_qencoder, args.qencoder_path)
    if spec.loras:
        attach_loras(pipelines, spec.loras)
    checker, checker_note = safety_checker_from_flags(args)
    app = build_app(spec, pipelines, checker, args.device, checker_note)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, css=APP_CSS)


if __name__ == "__main__":
    main()

"""Sketch-to-image Gradio app. See `python app/i2i/run_gradio.py --help` and the README."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout too

from nunchaku.apps.common import (  # noqa: E402
    APP_CSS,
    add_model_flags, add_safety_flags, add_server_flags, choose_model, load_pipelines, safety_checker_from_flags,
)
from nunchaku.apps.i2i import build_app  # noqa: E402
from nunchaku.apps.t2i import precisions_from_flags  # noqa: E402
from nunchaku.pipelines.sketch import SketchMode, SketchToImagePipeline  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="Nunchaku 4-bit FLUX sketch-to-image demo")
    add_model_flags(p)
    p.add_argument("-p", "--precision", default="int4", choices=["int4", "bf16"])
    p.add_argument("--sketch-lora", help="a sketch LoRA file: one-step generation from binarized strokes "
                                         "(without it the sketch is the starting image of a few steps, SDEdit)")
    add_safety_flags(p)
    add_server_flags(p, port=7861)
    args = p.parse_args(argv)

    spec = choose_model(args.model, args.model_path, args.qmodel_path)
    (precision,) = precisions_from_flags([args.precision])
    flux = load_pipelines(spec, [precision], args.device, args.use_qencoder, args.qencoder_path)[precision]
    if args.sketch_lora:
        from nunchaku import lora
        from nunchaku.models.flux import to_nunchaku_layout

        if not Path(args.sketch_lora).is_file():
            raise SystemExit(f"--sketch-lora: no file at {args.sketch_lora}")
        to_nunchaku_layout(flux.transformer)
        lora.load_lora(flux.transformer, args.sketch_lora, "sketch", 1.0)
        pipeline = SketchToImagePipeline(flux, mode=SketchMode.ONE_STEP_LORA)
    else:
        pipeline = SketchToImagePipeline(flux, mode=SketchMode.SDEDIT)
    checker, checker_note = safety_checker_from_flags(args)
    app = build_app(spec, pipeline, precision, checker, args.device, checker_note)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, css=APP_CSS)


if __name__ == "__main__":
    main()

"""Text-to-image Gradio app. See `python app/t2i/run_gradio.py --help` and the README."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout too

from nunchaku.apps.common import MODELS, choose_model, default_device, load_pipelines, make_safety_checker  # noqa: E402
from nunchaku.apps.t2i import build_app, precisions_from_flags  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="Nunchaku 4-bit FLUX text-to-image demo")
    p.add_argument("-m", "--model", choices=sorted(MODELS), default=None,
                   help="schnell, dev, or demo (the embedded offline model); default: schnell when it is in "
                        "the local Hugging Face cache, demo otherwise")
    p.add_argument("-p", "--precisions", nargs="+", default=["int4"], metavar="{int4,bf16}",
                   help="one model, or two side by side (e.g. -p int4 bf16)")
    p.add_argument("--no-safety-checker", action="store_true", help="do not screen prompts")
    p.add_argument("--safety-checker-path", help="local ShieldGemma-compatible model (default google/shieldgemma-2b)")
    p.add_argument("--use-qencoder", action="store_true", help="W4A16 T5 text encoder (see --qencoder-path)")
    p.add_argument("--qencoder-path", help="W4A16 T5 file made by `nunchaku quantize-t5`")
    p.add_argument("--model-path", help="a local diffusers FLUX pipeline folder instead of -m's")
    p.add_argument("--qmodel-path", help="its SVDQuant INT4 checkpoint")
    p.add_argument("--device", default=default_device())
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    args = p.parse_args(argv)

    spec = choose_model(args.model, args.model_path, args.qmodel_path)
    precisions = precisions_from_flags(args.precisions)
    pipelines = load_pipelines(spec, precisions, args.device, args.use_qencoder, args.qencoder_path)
    checker = make_safety_checker(not args.no_safety_checker, args.safety_checker_path, args.device)
    app = build_app(spec, pipelines, checker, args.device)
    app.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()

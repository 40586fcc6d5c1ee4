"""Make the embedded demo model's SVDQuant INT4 checkpoint with our own quantizer.

    python scripts/quantize_demo_model.py                    # assets/demo -> assets/demo/svdq-int4
    python scripts/quantize_demo_model.py --model runs/demo/pipeline --calib-prompts 128

Calibrates on training-split captions (`nunchaku.demo.variants`), sampling as the demo samples
(true CFG included), quantizes every block linear to W4A4 with a rank-32 16-bit branch (the
AdaLN linears to W4A16, as for FLUX.1), writes a nunchaku_lite folder and prints the per-layer
errors and the shipped sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nunchaku.demo.variants import DemoVariant, calibration_prompts, quantize_demo_transformer  # noqa: E402
from nunchaku.models.flux_loading import save_quantized_transformer  # noqa: E402
from nunchaku.apps.common import compute_dtype  # noqa: E402
from nunchaku.pipelines import flux as nunchaku_flux  # noqa: E402
from nunchaku.quant.quantizer import format_report  # noqa: E402

MAX_FILE_BYTES = 16_000_000
MAX_TOTAL_BYTES = 32_000_000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "assets" / "demo"))
    p.add_argument("--out", help="output folder (default MODEL/svdq-int4)")
    p.add_argument("--calib-prompts", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"{model} is not a diffusers pipeline folder")
    out = Path(args.out) if args.out else model / "svdq-int4"
    pipe = nunchaku_flux.from_pretrained(model, torch_dtype=compute_dtype(args.device)).to(args.device)
    reports = quantize_demo_transformer(pipe, DemoVariant.SVDQUANT_INT4, calibration_prompts(args.calib_prompts),
                                        rank=args.rank)
    # Scales and low-rank factors were rounded to BF16 by the quantizer (DecomposeOptions.
    # storage_dtype), so this cast is exact; the 16-bit layers are stored in BF16 as trained.
    pipe.transformer.to("cpu", torch.bfloat16)
    save_quantized_transformer(out, pipe.transformer)
    print(format_report(reports))
    files = {f: f.stat().st_size for f in sorted(model.rglob("*.safetensors"))}
    for f, n in files.items():
        print(f"{n / 1e6:7.2f} MB  {f.relative_to(model)}")
    total = sum(files.values())
    print(f"{total / 1e6:7.2f} MB  total in {model}")
    too_big = [str(f) for f, n in files.items() if n > MAX_FILE_BYTES]
    if too_big or total > MAX_TOTAL_BYTES:
        print(f"over the shipping limits (files <= 16 MB, total <= 32 MB): {too_big or total}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

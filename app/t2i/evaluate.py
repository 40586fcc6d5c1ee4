"""Metrics between two image folders and against the prompts.

    python app/t2i/evaluate.py out/int4 --reference out/bf16
    python app/t2i/evaluate.py out/int4 --reference mjhq/images --prompts out/int4/prompts.json --json m.json

With --reference: PSNR, SSIM, LPIPS (pairs matched by file name) and FID (the two sets). With
prompts (default: GENERATED/prompts.json when generate.py wrote one): CLIP score, ImageReward and,
for prompts of the demo model's grammar, the demo faithfulness checker. A metric that cannot run
here says why (see nunchaku.apps.evaluation); nothing is downloaded without --allow-download.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout too

from nunchaku.apps.evaluation import CLIP_MODEL, evaluate_folders, read_prompts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("generated", type=Path, help="folder of generated images")
    p.add_argument("--reference", type=Path, help="folder of reference images (same file names)")
    p.add_argument("--prompts", type=Path, help="{name: prompt} JSON (default: GENERATED/prompts.json if present)")
    p.add_argument("--clip-model", default=CLIP_MODEL, help="CLIP model id or local folder for the CLIP score")
    p.add_argument("--allow-download", action="store_true", help="let metrics fetch their weights")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    prompts_path = args.prompts or (args.generated / "prompts.json")
    prompts = read_prompts(prompts_path) if prompts_path.is_file() else None
    if args.reference is None and prompts is None:
        raise SystemExit("nothing to compare against: give --reference and/or a prompts file")
    try:
        results = evaluate_folders(args.generated, args.reference, prompts, args.allow_download, args.clip_model,
                                   progress=lambda msg: print(msg, file=sys.stderr))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"evaluate: {e}") from None
    for r in results:
        print(r.line())
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

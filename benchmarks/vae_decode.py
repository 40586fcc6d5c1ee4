"""The stages after the denoising loop of a FLUX pipeline call, on the GPU: the VAE decode of a
1024x1024 latent and the conversion of the decoded image to a PIL image.

    python benchmarks/vae_decode.py [--size 1024] [--json PATH]

Random weights at the FLUX VAE's shapes (benchmarks/pipeline.py's FLUX_VAE). Timed (medians of
--repeats calls, each between two device syncs):
  decode, NCHW            AutoencoderKL.decode as diffusers runs it
  decode, channels_last   the same modules and latent in torch.channels_last (cuDNN's NHWC kernels)
  to PIL, diffusers       VaeImageProcessor.postprocess(output_type="pil"): scaling on the GPU,
                          float32 copied to the host, rounding to uint8 in numpy
  to PIL, ours            nunchaku.pipelines.flux.DevicePilImageProcessor: the same arithmetic in
                          the same dtypes on the GPU, then 8-bit pixels (channels last) copied to
                          the host
and the largest difference between the variants' outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import FLUX_VAE  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("vae_decode.py measures the GPU: no CUDA device here")
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from nunchaku.pipelines.flux import DevicePilImageProcessor

    torch.manual_seed(0)
    vae = AutoencoderKL(**FLUX_VAE).to("cuda", torch.bfloat16).eval()
    latent = torch.randn(1, 16, args.size // 8, args.size // 8, device="cuda", dtype=torch.bfloat16)
    processor = VaeImageProcessor(vae_scale_factor=8)
    ours = DevicePilImageProcessor(vae_scale_factor=8)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size}
    with torch.inference_mode():
        nchw = vae.decode(latent).sample
        report["decode_nchw_s"] = timed(lambda: vae.decode(latent), args.repeats)
        vae.to(memory_format=torch.channels_last)
        latent_cl = latent.contiguous(memory_format=torch.channels_last)
        nhwc = vae.decode(latent_cl).sample
        report["decode_channels_last_s"] = timed(lambda: vae.decode(latent_cl), args.repeats)
        report["decode_max_abs_diff"] = (nchw.float() - nhwc.float()).abs().max().item()
        report["decode_max_abs"] = nchw.float().abs().max().item()
        report["to_pil_diffusers_s"] = timed(lambda: processor.postprocess(nchw, output_type="pil"), args.repeats)
        report["to_pil_ours_s"] = timed(lambda: ours.postprocess(nchw, output_type="pil"), args.repeats)
        mine = np.asarray(ours.postprocess(nchw, output_type="pil")[0], dtype=np.int16)
        theirs = np.asarray(processor.postprocess(nchw, output_type="pil")[0], dtype=np.int16)
        report["to_pil_max_pixel_diff"] = int(np.abs(mine - theirs).max())
    for key, value in report.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time to load a LoRA onto the quantized FLUX.1 12B-shape transformer (random weights).

    python benchmarks/lora_load.py [--device cuda] [--rank 32]

Builds the full-size transformer in the nunchaku layout with random 4-bit modules (no
quantization run: the buffers are random, which is all loading a LoRA touches), makes a random
rank-r LoRA on every linear of the original diffusers FLUX in the diffusers (PEFT) key format,
and times load_lora, a strength change and unload_lora (median of --repeats).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import FluxTransformer2DModel  # noqa: E402

from nunchaku.lora import load_lora, set_lora_strength, unload_lora  # noqa: E402
from nunchaku.models.flux import quantized_module_specs, to_nunchaku_layout  # noqa: E402
from nunchaku.nn import AWQW4A16Linear, SVDQW4A4Linear  # noqa: E402
from nunchaku.nn.utils import set_submodule  # noqa: E402

FLUX1_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)


def random_quantized_flux(device, dtype=torch.bfloat16, rank=32) -> FluxTransformer2DModel:
    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX1_CONFIG)
    to_nunchaku_layout(model)
    for spec in quantized_module_specs(model):
        meta = model.get_submodule(spec.name)
        n, k = meta.out_features, meta.in_features
        if spec.kind == "w4a4":
            m = SVDQW4A4Linear(k, n, rank, act_unsigned=spec.act_unsigned, dtype=dtype, device=device)
            m.qweight.random_(0, 256)
        else:
            m = AWQW4A16Linear(k, n, dtype=dtype, device=device)
            m.qweight.random_(0, 256)
        set_submodule(model, spec.name, m)
    plain = {k: torch.randn(v.shape, dtype=dtype, device=device) * 0.02
             for k, v in model.state_dict(keep_vars=True).items() if v.device.type == "meta"}
    model.load_state_dict(plain, strict=False, assign=True)
    return model.eval()


def random_lora(rank: int, device) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**FLUX1_CONFIG)
    sd = {}
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, device=device) * 0.01
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, device=device) * 0.01
    return sd


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model = random_quantized_flux(args.device)
    lora = random_lora(args.rank, "cpu")
    n_params = sum(v.numel() for v in lora.values())
    print(f"built the 12B-shape model and a rank-{args.rank} LoRA ({n_params / 1e6:.1f} M params, "
          f"{len(lora) // 2} modules) in {time.perf_counter() - t0:.1f} s on {args.device}", flush=True)
    load, strength, unload = [], [], []
    for _ in range(args.repeats):
        sync(args.device)
        t = time.perf_counter()
        load_lora(model, lora, "bench")
        sync(args.device)
        load.append(time.perf_counter() - t)
        t = time.perf_counter()
        set_lora_strength(model, "bench", 0.5)
        sync(args.device)
        strength.append(time.perf_counter() - t)
        t = time.perf_counter()
        unload_lora(model, "bench")
        sync(args.device)
        unload.append(time.perf_counter() - t)
    print(f"| device | rank | load_lora | set strength | unload |\n| --- | --- | --- | --- | --- |\n"
          f"| {args.device} | {args.rank} | {statistics.median(load) * 1e3:.0f} ms | "
          f"{statistics.median(strength) * 1e3:.0f} ms | {statistics.median(unload) * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()

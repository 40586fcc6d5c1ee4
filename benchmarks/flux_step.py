"""One FLUX.1 12B-shape transformer step on the GPU: BF16 vs torchao FP8 vs our SVDQuant INT4.

    python benchmarks/flux_step.py                                  # batch 1, every variant that fits
    python benchmarks/flux_step.py --variants bf16 int4 --batch 1 4 --json out.json

Random weights (seeded), 1024x1024 (4096 image + 512 text tokens), schnell config (no guidance
embedding). Variants, all in one process and one run:
  bf16          diffusers eager            bf16-compile   + torch.compile
  fp8           torchao FP8 rowwise dynamic (eager; fp8-compile adds torch.compile, ~8 min of
                compile on an H100, so it is opt-in)
  int4          ours: the quantizer calibrates on --calib-inputs random inputs and quantizes
                every block (rank 32), then the engine runs (NUNCHAKU_BACKEND decides the path)
  int4-compile  + torch.compile(fullgraph=True)
  int4-offload  the low-memory mode: blocks in pinned CPU memory, streamed in one at a time
                (nunchaku.offload.BlockOffloader); "weights" is then what stays on the GPU
  int4-graph    the int4 step replayed as a CUDA graph (nunchaku.cuda_graph.CUDAGraphForward):
                the same kernels without the CPU's launch overhead; bf16-graph the same for bf16
  int4-pow2     the same quantized model with the Hopper kernels' pow2 activation format
                (nunchaku.ops.Sm90Activations.POW2, the signed layers; its own error figures);
                int4-pow2-graph as a CUDA graph
Reported per variant and batch: median step time (CUDA-synchronized, after warm-up), weight
memory (the transformer's parameters and buffers) and peak memory of a step; for int4 also the
quantization time and peak memory, and the relative error ||y_q - y|| / ||y|| of every block's
image-stream output and of the final output against the BF16 original on the same input.
Ratios to bf16 eager of the same run are printed with the table.
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

FLUX_12B = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
                axes_dims_rope=(16, 56, 56))
SMALL = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
             num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False,
             axes_dims_rope=(8, 12, 12))
TOKENS = {"flux": (4096, 512), "small": (64, 16)}  # (image, text)
VARIANTS = ("bf16", "bf16-compile", "bf16-graph", "fp8", "fp8-compile", "int4", "int4-compile", "int4-offload",
            "int4-graph", "int4-pow2", "int4-pow2-graph")
INT4_VARIANTS = {"int4", "int4-compile", "int4-offload", "int4-graph", "int4-pow2", "int4-pow2-graph"}
GIB = 2**30


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str, graph_pools: bool = False) -> float:
    """Peak allocated GiB since the last reset; graph_pools: plus the free part of the CUDA graphs'
    private pools (graph_pool_gib), where a replayed graph keeps its intermediates."""
    if not device.startswith("cuda"):
        return float("nan")
    return torch.cuda.max_memory_allocated() / GIB + (graph_pool_gib() if graph_pools else 0.0)


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def on_device_bf16(factory, device: str) -> torch.nn.Module:
    """factory() built directly on `device` in BF16 (no fp32 copy on the host), in eval mode."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return factory().eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)


def build_bf16(seed: int, config: dict, device: str):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return on_device_bf16(lambda: FluxTransformer2DModel(**config), device)


def step_inputs(batch: int, seed: int, config: dict, tokens: tuple[int, int], device: str) -> dict:
    g = torch.Generator(device).manual_seed(seed)
    dt, dev = torch.bfloat16, device
    image_tokens, text_tokens = tokens
    side = int(image_tokens ** 0.5)
    ids = torch.zeros(side, side, 3, device=dev)
    ids[..., 1] = torch.arange(side, device=dev)[:, None]
    ids[..., 2] = torch.arange(side, device=dev)[None, :]
    return dict(
        hidden_states=torch.randn(batch, image_tokens, config["in_channels"], generator=g, device=dev, dtype=dt),
        encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=g, device=dev,
                                          dtype=dt),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g, device=dev, dtype=dt),
        timestep=torch.full((batch,), 0.75, device=dev, dtype=dt),
        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text_tokens, 3, device=dev), guidance=None,
        return_dict=False,
    )


def _leaf_tensors(t: torch.Tensor):
    """The plain tensors holding t's data: t itself, or for a tensor subclass (torchao's float8
    weights) its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaf_tensors(getattr(t, name))
    else:
        yield t


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        for leaf in _leaf_tensors(t):
            key = leaf.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += leaf.untyped_storage().nbytes()
    return total


def time_step(model, inputs: dict, warmup: int, repeats: int, device: str,
              graph_pools: bool = False) -> tuple[float, float]:
    """(median ms, peak GiB during the timed steps). graph_pools: the model replays CUDA graphs,
    whose intermediate tensors live in the graphs' private memory pools, which the allocated-bytes
    peak does not count: the pools' free part (graph_pool_gib) is added to it."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
        _sync(device)
        _reset_peak(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), _peak_gib(device, graph_pools)


def graph_pool_gib() -> float:
    """Memory held by the CUDA graphs' private pools beyond their allocated tensors: the segments
    of every pool but the default one (pool id (0, 0)) in the allocator's snapshot, less what is
    allocated in them (the static inputs and outputs, already in the allocated peak)."""
    torch.cuda.empty_cache()
    held = 0
    for segment in torch.cuda.memory._snapshot()["segments"]:
        if tuple(segment["segment_pool_id"]) != (0, 0):
            held += segment["total_size"] - segment["allocated_size"]
    return held / GIB


KERNEL_CATEGORIES = (  # (category, substrings of CUDA kernel names), first match wins
    ("W4A4 GEMM (ours)", ("w4a4_gemm",)),
    ("W4A4 activation quantize (ours)", ("quantize_act",)),
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("16-bit GEMM (cuBLAS: W4A16 layers, embedders)", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
)


def profile_step(model, inputs: dict, steps: int = 3) -> dict:
    """Where a step's GPU time goes: per category (KERNEL_CATEGORIES, the rest is elementwise
    work: norms, RoPE, GELU, modulation, casts) and the top kernels, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(**inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                model(**inputs)
            torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0)
        if us > 0:
            per_kernel[event.key] = per_kernel.get(event.key, 0.0) + us / 1e3 / steps
    categories: dict[str, float] = {}
    for name, ms in per_kernel.items():
        lowered = name.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in lowered for k in keys)),
                        "elementwise and other")
        categories[category] = categories.get(category, 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {"categories_ms": {k: round(v, 2) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [(name[:90], round(ms, 2)) for name, ms in top]}


def block_outputs(model, inputs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The image-stream output of every block, and the model output."""
    captured: list[torch.Tensor] = []

    def hook(_module, _args, out):
        captured.append((out[-1] if isinstance(out, tuple) else out).float().cpu())

    handles = [b.register_forward_hook(hook) for b in (*model.transformer_blocks, *model.single_transformer_blocks)]
    try:
        with torch.inference_mode():
            out = model(**inputs)[0].float().cpu()
    finally:
        for h in handles:
            h.remove()
    return captured, out


def errors_vs_reference(model, inputs: dict, reference_blocks: list[torch.Tensor],
                        reference_out: torch.Tensor) -> dict:
    """The relative error of every block's output and of the model output against the reference's."""
    blocks, out = block_outputs(model, inputs)
    return {"block_rel_err": [round(rel(q, r), 5) for q, r in zip(blocks, reference_blocks, strict=True)],
            "output_rel_err": round(rel(out, reference_out), 5)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def quantize_int4(model, calib_inputs: list[dict], args) -> dict:
    from nunchaku.models.flux import quant_plan, quantize_transformer_in_place, to_nunchaku_layout
    from nunchaku.quant.calibration import CalibrationCollector
    from nunchaku.quant.quantizer import QuantizerOptions, quantize_model
    from nunchaku.quant.svdquant import DecomposeOptions, SVDMethod

    _sync(args.device)
    _reset_peak(args.device)
    start = time.perf_counter()
    to_nunchaku_layout(model)
    plan = quant_plan(model, unsigned_fc2=not args.signed_post_gelu)
    with CalibrationCollector(model, plan.calibration_targets(), max_samples=args.max_samples) as calib:
        with torch.inference_mode():
            for inputs in calib_inputs:
                model(**inputs)
    options = QuantizerOptions(decompose=DecomposeOptions(rank=32, svd_method=SVDMethod.RANDOMIZED),
                               alphas=tuple(args.alphas), device=args.device)
    result = quantize_model(model, plan, calib.stats(), options)
    quantize_transformer_in_place(model, result)
    del result
    from nunchaku.nn import set_sm90_activations
    from nunchaku.ops import Sm90Activations

    # The int4 rows measure the method's activations whatever NUNCHAKU_SM90_ACTIVATIONS says (the
    # layers take it when created); the pow2 variants switch explicitly.
    set_sm90_activations(model, Sm90Activations.INT4)
    _sync(args.device)
    return {"quantize_s": round(time.perf_counter() - start, 1),
            "quantize_peak_gib": round(_peak_gib(args.device), 2),
            "layers": len(plan.w4a4) + len(plan.w4a16)}


def apply_fp8(model):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["bf16", "bf16-compile", "fp8", "int4", "int4-compile"],
                   choices=VARIANTS)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--calib-inputs", type=int, default=2, help="random inputs the quantizer calibrates on")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="smoothing search grid")
    p.add_argument("--max-samples", type=int, default=256)
    p.add_argument("--layers", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"),
                   help="fewer blocks than FLUX.1's 19 + 38 (a quick check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also profile one int4 step (and one pow2 step when an int4-pow2 variant runs): "
                        "where the time goes")
    p.add_argument("--signed-post-gelu", action="store_true",
                   help="quantize the post-GELU layers' activations signed (quant_plan(unsigned_fc2=False)), "
                        "so that the pow2 variants cover them too")
    p.add_argument("--small", action="store_true", help="a tiny config and 64 + 16 tokens: a smoke check, on CPU too")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("flux_step.py measures GPU steps: no CUDA device here "
                         "(--small --device cpu for a smoke check)")
    config = dict(SMALL if args.small else FLUX_12B)
    tokens = TOKENS["small" if args.small else "flux"]
    if args.layers:
        config.update(num_layers=args.layers[0], num_single_layers=args.layers[1])
    from nunchaku.ops import sm90

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    report = {"device": device_name, "torch": torch.__version__, "config": config,
              "kernels": "sm90 extension" if sm90.extension_available() else "reference (no nunchaku._C)",
              "signed_post_gelu": args.signed_post_gelu, "rows": [], "int4": {}}
    inputs = {b: step_inputs(b, args.seed + b, config, tokens, args.device) for b in args.batch}

    def save():
        if args.json:  # after every row, so that a later failure keeps what was measured
            Path(args.json).write_text(json.dumps(report, indent=1))

    def record(variant: str, model, compile_s: float | None = None, batches=None, graph_pools: bool = False):
        for b in batches or args.batch:
            ms, peak = time_step(model, inputs[b], args.warmup, args.repeats, args.device, graph_pools)
            row = {"variant": variant, "batch": b, "step_ms": round(ms, 2),
                   "weights_gib": round(weight_bytes(model) / GIB, 2), "peak_gib": round(peak, 2)}
            if compile_s is not None:
                row["compile_s"] = round(compile_s, 1)
            report["rows"].append(row)
            print(row, flush=True)
            save()

    def compiled(model, variant: str, fullgraph: bool):
        compiled_model = torch.compile(model, fullgraph=fullgraph)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled_model(**inputs[args.batch[0]])
        _sync(args.device)
        record(variant, compiled_model, time.perf_counter() - start)

    def graphed(model, variant: str):
        from nunchaku.cuda_graph import CUDAGraphForward

        for b in args.batch:  # one graph at a time, so that each row's peak holds its own pool only
            model.forward = CUDAGraphForward(model, max_graphs=1)
            try:
                record(variant, model, batches=[b], graph_pools=True)
            finally:
                del model.forward  # back to the class's forward (and the graph's memory freed)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()

    wanted = set(args.variants)
    need_bf16 = wanted & ({"bf16", "bf16-compile", "bf16-graph"} | INT4_VARIANTS)
    if need_bf16:
        model = build_bf16(args.seed, config, args.device)
        if "bf16" in wanted:
            record("bf16", model)
            if args.profile and args.device.startswith("cuda"):
                report["bf16_profile"] = profile_step(model, inputs[args.batch[0]])
                print(json.dumps(report["bf16_profile"], indent=1), flush=True)
        if "bf16-graph" in wanted:
            graphed(model, "bf16-graph")
        if "bf16-compile" in wanted:
            compiled(model, "bf16-compile", fullgraph=True)
            torch._dynamo.reset()
        if wanted & INT4_VARIANTS:
            b0 = args.batch[0]
            reference_blocks, reference_out = block_outputs(model, inputs[b0])
            calib = [step_inputs(1, 1000 + i, config, tokens, args.device) for i in range(args.calib_inputs)]
            report["int4"].update(quantize_int4(model, calib, args))
            del calib
            report["int4"].update(errors_vs_reference(model, inputs[b0], reference_blocks, reference_out))
            if not wanted & {"int4-pow2", "int4-pow2-graph"}:
                del reference_blocks, reference_out
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            print({k: v for k, v in report["int4"].items() if k != "block_rel_err"}, flush=True)
            save()
            if "int4" in wanted:
                record("int4", model)
            if args.profile and args.device.startswith("cuda"):
                report["int4_profile"] = profile_step(model, inputs[b0])
                print(json.dumps(report["int4_profile"], indent=1), flush=True)
                save()
            if "int4-graph" in wanted:
                graphed(model, "int4-graph")
            if wanted & {"int4-pow2", "int4-pow2-graph"}:
                from nunchaku.nn import set_sm90_activations
                from nunchaku.ops import Sm90Activations

                set_sm90_activations(model, Sm90Activations.POW2)
                pow2_errors = errors_vs_reference(model, inputs[b0], reference_blocks, reference_out)
                report["int4"].update({f"pow2_{key}": value for key, value in pow2_errors.items()})
                del reference_blocks, reference_out
                print({"pow2_output_rel_err": report["int4"]["pow2_output_rel_err"]}, flush=True)
                if "int4-pow2" in wanted:
                    record("int4-pow2", model)
                if args.profile and args.device.startswith("cuda"):
                    report["int4_pow2_profile"] = profile_step(model, inputs[b0])
                    print(json.dumps(report["int4_pow2_profile"], indent=1), flush=True)
                    save()
                if "int4-pow2-graph" in wanted:
                    graphed(model, "int4-pow2-graph")
                set_sm90_activations(model, Sm90Activations.INT4)
            if "int4-offload" in wanted:
                from nunchaku.offload import BlockOffloader

                offloader = BlockOffloader(model, args.device)
                record("int4-offload", model)
                offloader.remove()
            if "int4-compile" in wanted:
                compiled(model, "int4-compile", fullgraph=True)
                torch._dynamo.reset()
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if wanted & {"fp8", "fp8-compile"}:
        try:
            model = apply_fp8(build_bf16(args.seed, config, args.device))
        except ImportError as e:
            print(f"fp8: torchao is not installed ({e}); skipped", flush=True)
            report["fp8_skipped"] = str(e)
        else:
            if "fp8" in wanted:
                record("fp8", model)
            if "fp8-compile" in wanted:
                compiled(model, "fp8-compile", fullgraph=False)
            del model
    print(format_table(report))
    save()
    return 0


def format_table(report: dict) -> str:
    base = {r["batch"]: r["step_ms"] for r in report["rows"] if r["variant"] == "bf16"}
    lines = [f"{report['device']}, torch {report['torch']}, kernels: {report['kernels']}",
             "| variant | batch | step ms | vs bf16 eager | weights GiB | peak GiB | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        ratio = f"{base[r['batch']] / r['step_ms']:.2f}x" if r["batch"] in base else "-"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['step_ms']:.1f} | {ratio} | {r['weights_gib']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r.get('compile_s', '-')} |")
    q = report.get("int4") or {}
    if q:
        errs = q.get("block_rel_err", [])
        lines.append(f"int4: quantized {q['layers']} layers in {q['quantize_s']} s "
                     f"(peak {q['quantize_peak_gib']} GiB); "
                     f"output rel. err {q['output_rel_err']}; per block min/median/max "
                     f"{min(errs):.4f}/{statistics.median(errs):.4f}/{max(errs):.4f}")
        if "pow2_output_rel_err" in q:
            errs = q["pow2_block_rel_err"]
            lines.append(f"int4-pow2 (same weights): output rel. err {q['pow2_output_rel_err']}; per block "
                         f"min/median/max {min(errs):.4f}/{statistics.median(errs):.4f}/{max(errs):.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

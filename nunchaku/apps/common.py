"""What the Gradio apps share: model choices, pipeline loading, GPU info, safety screening and a
timed generate call. The apps (app/t2i, app/i2i) are thin layers over this module."""

from __future__ import annotations

import enum
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL_DIR = REPO_ROOT / "assets" / "demo"
MAX_SEED = 2**31 - 1


class Precision(str, enum.Enum):
    INT4 = "int4"
    BF16 = "bf16"


@dataclass(frozen=True)
class ModelSpec:
    """A model the apps offer, with the sampling ranges that suit it."""

    name: str
    base: str  # diffusers pipeline: Hub id or local folder
    qmodel: str | None  # SVDQuant INT4 checkpoint (Hub path or local)
    steps: int
    steps_range: tuple[int, int]
    guidance: float
    guidance_range: tuple[float, float]
    description: str
    loras: dict[str, str] = field(default_factory=dict)  # display name -> LoRA file
    size: int = 1024  # default height and width in pixels


MODELS: dict[str, ModelSpec] = {
    "schnell": ModelSpec(
        "schnell", "black-forest-labs/FLUX.1-schnell",
        "mit-han-lab/svdquant-models/svdq-int4-flux.1-schnell.safetensors",
        steps=4, steps_range=(1, 8), guidance=0.0, guidance_range=(0.0, 0.0),
        description="FLUX.1-schnell (12B), timestep-distilled: 1-8 steps, no guidance.",
    ),
    "dev": ModelSpec(
        "dev", "black-forest-labs/FLUX.1-dev",
        "mit-han-lab/svdquant-models/svdq-int4-flux.1-dev.safetensors",
        steps=28, steps_range=(10, 50), guidance=3.5, guidance_range=(1.0, 10.0),
        description="FLUX.1-dev (12B), guidance-distilled: 10-50 steps, guidance 3.5.",
    ),
    "demo": ModelSpec(
        "demo", str(DEMO_MODEL_DIR), str(DEMO_MODEL_DIR / "svdq-int4"),
        steps=8, steps_range=(1, 32), guidance=0.0, guidance_range=(0.0, 0.0),
        description="The embedded demo model: a tiny FLUX-architecture model trained on simple shape scenes "
                    "(shipped in assets/, runs offline on a CPU). It draws shapes, colors and positions, not photos.",
        size=128,
    ),
}


def _native_size(model_path: str, fallback: int) -> int:
    """Image size a local pipeline was made for: its default sample size when small (tiny and
    demo models), FLUX's 1024 otherwise."""
    import json

    try:
        sample = int(json.loads((Path(model_path) / "vae" / "config.json").read_text()).get("sample_size", fallback))
    except (OSError, ValueError):
        return fallback
    return fallback if sample >= fallback else max(sample, 64)


def hub_model_available(repo_id: str) -> bool:
    """Whether a Hub model's index is in the local cache (no network call)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "model_index.json")
    return isinstance(found, str)


def choose_model(name: str | None, model_path: str | None = None, qmodel_path: str | None = None) -> ModelSpec:
    """The model to serve: an explicit local folder, a named model, or (name None) schnell when it
    is in the local Hub cache, the embedded demo model otherwise."""
    if model_path is not None:
        base = MODELS.get(name or "schnell", MODELS["schnell"])
        return ModelSpec(
            name=name or "custom", base=model_path, qmodel=qmodel_path, steps=base.steps,
            steps_range=base.steps_range, guidance=base.guidance, guidance_range=base.guidance_range,
            description=f"Local model at {model_path}.", size=_native_size(model_path, base.size),
        )
    if name is None:
        name = "schnell" if hub_model_available(MODELS["schnell"].base) else "demo"
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}: choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    if name == "demo" and not (DEMO_MODEL_DIR / "model_index.json").is_file():
        raise SystemExit(f"the embedded demo model is not in {DEMO_MODEL_DIR} (it is built by "
                         "scripts/train_demo_model.py); pass -m schnell|dev or --model-path")
    return spec if qmodel_path is None else ModelSpec(**{**spec.__dict__, "qmodel": qmodel_path})


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_summary(device: str) -> str:
    """'NVIDIA H100 80GB HBM3, 79.1 GiB' (GPUtil where it works, torch otherwise) or the CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        try:
            import GPUtil

            gpus = GPUtil.getGPUs()
            if gpus:
                return f"{gpus[0].name}, {gpus[0].memoryTotal / 1024:.1f} GiB"
        except Exception:  # GPUtil shells out to nvidia-smi, which may be missing or refuse
            pass
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    import platform

    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores): no GPU, the PyTorch reference path runs"


def load_pipelines(spec: ModelSpec, precisions: list[Precision], device: str, use_qencoder: bool = False,
                   qencoder_path: str | None = None):
    """One pipeline per precision, sharing text encoders and VAE (loaded once)."""
    from ..pipelines import flux as nunchaku_flux

    dtype = torch.bfloat16
    if Precision.INT4 in precisions and spec.qmodel is None:
        raise SystemExit(f"model {spec.name!r} has no INT4 checkpoint: pass --qmodel-path or -p bf16")
    qencoder = qencoder_path if use_qencoder else None
    if use_qencoder and qencoder is None:
        raise SystemExit("--use-qencoder needs a W4A16 T5 file: make one with `nunchaku quantize-t5` and pass "
                         "--qencoder-path")
    first = precisions[0]
    main = nunchaku_flux.from_pretrained(
        spec.base, torch_dtype=dtype, qmodel_path=spec.qmodel if first is Precision.INT4 else None,
        qencoder_path=qencoder,
    ).to(device)
    pipes = {first: main}
    for p in precisions[1:]:
        if p is Precision.INT4:
            transformer = nunchaku_flux.load_transformer(spec.base, spec.qmodel, dtype)
        else:
            transformer = nunchaku_flux.NunchakuFluxPipeline.from_pretrained(spec.base, torch_dtype=dtype).transformer
        pipes[p] = nunchaku_flux.with_transformer(main, transformer.to(device))
    return pipes


def make_safety_checker(enabled: bool, model_path: str | None = None, device: str | None = None):
    from ..models.safety import NoOpChecker, ShieldGemmaChecker

    if not enabled:
        return NoOpChecker()
    kwargs = {} if model_path is None else {"model_id_or_path": model_path}
    return ShieldGemmaChecker(device=device, **kwargs)


@dataclass
class GenerationResult:
    image: object  # PIL.Image
    latency_s: float
    peak_memory_gib: float | None  # None on the CPU


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def timed_generate(pipe, prompt: str, seed: int, steps: int, guidance: float, height: int, width: int,
                   device: str) -> GenerationResult:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance), height=int(height),
                 width=int(width), generator=torch.Generator("cpu").manual_seed(int(seed))).images[0]
    if cuda:
        torch.cuda.synchronize()
    latency = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return GenerationResult(image, latency, peak)


def validate_generation_inputs(spec: ModelSpec, prompt: str, seed, steps, guidance, height, width) -> None:
    """Raises ValueError with a message fit for the UI."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("The prompt is empty: type what you want to see.")
    lo, hi = spec.steps_range
    if not lo <= int(steps) <= hi:
        raise ValueError(f"Steps must be between {lo} and {hi} for {spec.name}, got {steps}.")
    glo, ghi = spec.guidance_range
    if not glo <= float(guidance) <= ghi:
        raise ValueError(f"Guidance must be between {glo} and {ghi} for {spec.name}, got {guidance}.")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"Seed must be between 0 and {MAX_SEED}, got {seed}.")
    for name, v in (("Height", height), ("Width", width)):
        if int(v) % 16 or int(v) <= 0:
            raise ValueError(f"{name} must be a positive multiple of 16, got {v}.")

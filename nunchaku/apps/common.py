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

from ..demo.variants import DEMO_SAMPLING

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL_DIR = REPO_ROOT / "assets" / "demo"
MAX_SEED = 2**31 - 1


class Precision(str, enum.Enum):
    INT4 = "int4"
    BF16 = "bf16"


class GuidanceKind(str, enum.Enum):
    """What the app's guidance slider drives."""

    NONE = "none"  # timestep-distilled (schnell): no guidance
    DISTILLED = "distilled"  # guidance-distilled (dev): FluxPipeline's guidance_scale embedding
    TRUE_CFG = "true-cfg"  # classifier-free guidance with the empty prompt (the demo model): true_cfg_scale


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
    guidance_kind: GuidanceKind = GuidanceKind.DISTILLED
    examples: tuple[str, ...] = (
        "A cat holding a sign that says hello world",
        "A watercolor painting of a quiet harbor town at dawn",
        "A cozy wooden cabin in a snowy forest at night, warm light in the windows",
    )

    def pipeline_kwargs(self, steps: int, guidance: float) -> dict:
        """The FluxPipeline arguments for the app's steps and guidance values."""
        kwargs: dict = {"num_inference_steps": int(steps), "guidance_scale": 0.0}
        if self.guidance_kind is GuidanceKind.DISTILLED:
            kwargs["guidance_scale"] = float(guidance)
        elif self.guidance_kind is GuidanceKind.TRUE_CFG and float(guidance) > 1.0:
            kwargs.update(true_cfg_scale=float(guidance), negative_prompt="")
        return kwargs


MODELS: dict[str, ModelSpec] = {
    "schnell": ModelSpec(
        "schnell", "black-forest-labs/FLUX.1-schnell",
        "mit-han-lab/svdquant-models/svdq-int4-flux.1-schnell.safetensors",
        steps=4, steps_range=(1, 8), guidance=0.0, guidance_range=(0.0, 0.0),
        description="FLUX.1-schnell (12B), timestep-distilled: 1-8 steps, no guidance.",
        guidance_kind=GuidanceKind.NONE,
    ),
    "dev": ModelSpec(
        "dev", "black-forest-labs/FLUX.1-dev",
        "mit-han-lab/svdquant-models/svdq-int4-flux.1-dev.safetensors",
        steps=28, steps_range=(10, 50), guidance=3.5, guidance_range=(1.0, 10.0),
        description="FLUX.1-dev (12B), guidance-distilled: 10-50 steps, guidance 3.5.",
    ),
    "demo": ModelSpec(
        "demo", str(DEMO_MODEL_DIR), str(DEMO_MODEL_DIR / "svdq-int4"),
        steps=DEMO_SAMPLING.steps, steps_range=(1, 50), guidance=DEMO_SAMPLING.true_cfg_scale,
        guidance_range=(1.0, 8.0),
        description="The embedded demo model (assets/demo): a 9.9M-parameter FLUX-architecture pipeline trained "
                    "from scratch on procedural shape scenes; guidance is classifier-free guidance (1 = off).",
        size=DEMO_SAMPLING.size, guidance_kind=GuidanceKind.TRUE_CFG,
        examples=(
            "a red circle above a blue square on a yellow background",
            "a large green star at the top left",
            "three small purple hearts on a white background",
            "a cyan triangle left of a red cross",
        ),
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
            guidance_kind=base.guidance_kind, examples=base.examples,
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


def compute_dtype(device: str) -> torch.dtype:
    """bfloat16 on GPUs; float32 on CPUs, where PyTorch's bfloat16 convolutions are ~200x slower
    (the demo model's VAE decode: 27 s vs 0.13 s on 2 cores). Weights stored in BF16 are then
    upcast exactly, so a "BF16" model computes the same function, in more precision."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


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
    return f"CPU ({cpu}, {os.cpu_count()} cores): no GPU, the PyTorch reference path runs (in float32)"


def load_pipelines(spec: ModelSpec, precisions: list[Precision], device: str, use_qencoder: bool = False,
                   qencoder_path: str | None = None):
    """One pipeline per precision, sharing text encoders and VAE (loaded once)."""
    from ..pipelines import flux as nunchaku_flux

    dtype = compute_dtype(device)
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


class SafetyCheckerKind(str, enum.Enum):
    AUTO = "auto"  # ShieldGemma when its weights are on this machine, the keyword list otherwise
    SHIELDGEMMA = "shieldgemma"
    KEYWORD = "keyword"
    OFF = "off"


def make_safety_checker(kind: SafetyCheckerKind, model_path: str | None = None, device: str | None = None):
    """(checker, a line for the UI saying which). AUTO never goes to the network: offline, or
    with ShieldGemma's gated weights not downloaded, prompts are screened by the keyword list."""
    from ..models.safety import DEFAULT_MODEL_ID, KeywordChecker, NoOpChecker, ShieldGemmaChecker, \
        shieldgemma_available

    kind = SafetyCheckerKind(kind)
    if kind is SafetyCheckerKind.OFF:
        return NoOpChecker(), "Safety checker: off."
    model = model_path or DEFAULT_MODEL_ID
    if kind is SafetyCheckerKind.SHIELDGEMMA or (kind is SafetyCheckerKind.AUTO and shieldgemma_available(model)):
        return ShieldGemmaChecker(model, device=device).load(), f"Safety checker: ShieldGemma ({model})."
    why = "" if kind is SafetyCheckerKind.KEYWORD else (
        f" ({model} is not on this machine; download it or pass --safety-checker-path for the model-based checker)")
    return KeywordChecker(), f"Safety checker: a keyword list{why}."


def add_model_flags(parser) -> None:
    """The model, text-encoder and device flags both apps take."""
    parser.add_argument("-m", "--model", choices=sorted(MODELS), default=None,
                        help="schnell, dev, or demo (the embedded offline model); default: schnell when it is in "
                             "the local Hugging Face cache, demo otherwise")
    parser.add_argument("--model-path", help="a local diffusers FLUX pipeline folder instead of -m's")
    parser.add_argument("--qmodel-path", help="its SVDQuant INT4 checkpoint")
    parser.add_argument("--use-qencoder", action="store_true", help="W4A16 T5 text encoder (see --qencoder-path)")
    parser.add_argument("--qencoder-path", help="W4A16 T5 file made by `nunchaku quantize-t5`")
    parser.add_argument("--device", default=default_device())


def add_server_flags(parser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")


def add_safety_flags(parser) -> None:
    parser.add_argument("--safety-checker", choices=[k.value for k in SafetyCheckerKind], default="auto",
                        help="auto (default): ShieldGemma when its weights are on this machine, else a keyword "
                             "list; shieldgemma: load it (from the Hub if needed); keyword; off")
    parser.add_argument("--no-safety-checker", action="store_true", help="same as --safety-checker off")
    parser.add_argument("--safety-checker-path",
                        help="local ShieldGemma-compatible model (default google/shieldgemma-2b)")


def safety_checker_from_flags(args):
    kind = SafetyCheckerKind.OFF if args.no_safety_checker else SafetyCheckerKind(args.safety_checker)
    return make_safety_checker(kind, args.safety_checker_path, args.device)


@dataclass
class GenerationResult:
    image: object  # PIL.Image
    latency_s: float
    peak_memory_gib: float | None  # None on the CPU


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def timed_call(fn, device: str) -> GenerationResult:
    """Runs fn() (which returns an image) and measures its latency and, on a GPU, its peak memory."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    image = fn()
    if cuda:
        torch.cuda.synchronize()
    latency = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return GenerationResult(image, latency, peak)


def timed_generate(pipe, spec: ModelSpec, prompt: str, seed: int, steps: int, guidance: float, height: int,
                   width: int, device: str) -> GenerationResult:
    return timed_call(lambda: pipe(prompt, height=int(height), width=int(width),
                                   generator=torch.Generator("cpu").manual_seed(int(seed)),
                                   **spec.pipeline_kwargs(steps, guidance)).images[0], device)


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


def parse_lora_flags(values: list[str] | None) -> dict[str, str]:
    """`--lora NAME=PATH` values -> {NAME: PATH}; the name is what the LoRA menu shows."""
    loras: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SystemExit(f"--lora takes NAME=PATH (a display name and a LoRA .safetensors file), got {value!r}")
        if not Path(path).is_file():
            raise SystemExit(f"--lora {name}: no file at {path}")
        loras[name.strip()] = path.strip()
    return loras


def _adapter_name(display_name: str) -> str:
    import re

    return "lora_" + re.sub(r"\W", "_", display_name)


def attach_loras(pipelines: dict, loras: dict[str, str]) -> None:
    """Loads every LoRA into every pipeline's transformer at strength 0 (INT4: as extra low-rank
    ranks; BF16: merged in 16 bits), so switching LoRAs is a strength change, not a reload."""
    from .. import lora as lora_mod
    from ..models.flux import to_nunchaku_layout

    for pipe in pipelines.values():
        to_nunchaku_layout(pipe.transformer)
        for name, path in loras.items():
            lora_mod.load_lora(pipe.transformer, path, _adapter_name(name), 0.0)


def select_lora(pipe, loras: dict[str, str], chosen: str | None, strength: float) -> None:
    """Makes `chosen` (a display name, or None) the one active LoRA at `strength`."""
    from .. import lora as lora_mod

    if chosen is not None and chosen not in loras:
        raise ValueError(f"Unknown LoRA {chosen!r}: choose one of {sorted(loras)}.")
    for name in loras:
        target = float(strength) if name == chosen else 0.0
        adapter = _adapter_name(name)
        if lora_mod.loaded_loras(pipe.transformer).get(adapter) != target:
            lora_mod.set_lora_strength(pipe.transformer, adapter, target)


# Small pictures (the demo model draws 128x128) fill their frame, with crisp pixels.
APP_CSS = (".output-image img, #result img, [id^=image-] img "
           "{width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}")

# Prompt templates of the style menus; "{prompt}" is the user's text.
PHOTO_STYLES: dict[str, str] = {
    "None": "{prompt}",
    "Photograph": "a photograph of {prompt}, natural light, sharp focus, 35mm",
    "Watercolor": "a watercolor painting of {prompt}, soft washes of color, paper texture",
    "Pencil drawing": "a detailed pencil drawing of {prompt}, graphite shading on white paper",
    "3D render": "a 3D render of {prompt}, studio lighting, soft shadows, clay material",
    "Pixel art": "pixel art of {prompt}, 16-bit game sprite, limited palette",
    "Anime": "an anime illustration of {prompt}, clean line art, cel shading",
}
# The demo model knows shapes, colors and backgrounds only, so its "styles" are backgrounds.
DEMO_STYLES: dict[str, str] = {
    "None": "{prompt}",
    **{f"On {c}": f"{{prompt}} on a {c} background" for c in ("white", "yellow", "blue", "black")},
}


def styles_for(spec: ModelSpec) -> dict[str, str]:
    return DEMO_STYLES if spec.name == "demo" else PHOTO_STYLES


def apply_style(styles: dict[str, str], style: str, prompt: str) -> str:
    if style not in styles:
        raise ValueError(f"Unknown style {style!r}: choose one of {list(styles)}.")
    return styles[style].format(prompt=prompt.strip())

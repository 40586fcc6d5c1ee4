"""Image-quality metrics for app/t2i/evaluate.py, from the field's libraries.

Pairwise (generated vs reference, matched by file name): PSNR and SSIM (torchmetrics), LPIPS
(torchmetrics, which needs torchvision and its pretrained backbone). Sets: FID (clean-fid, which
needs its Inception weights). Against the prompts: CLIP score (torchmetrics with a CLIP model from
the local Hugging Face cache), ImageReward (the image-reward package and its weights), and for
prompts of the demo grammar the faithfulness checker of nunchaku.demo.

A metric that cannot run here (library missing, weights not on this machine) reports why instead
of a number: MetricResult(value=None, reason=...). Nothing is downloaded unless allow_download.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CLIP_MODEL = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class MetricResult:
    name: str
    value: float | None
    reason: str = ""  # why value is None, or a note on how it was computed

    def line(self) -> str:
        if self.value is None:
            return f"{self.name:<16} not computed: {self.reason}"
        return f"{self.name:<16} {self.value:.4f}" + (f"  ({self.reason})" if self.reason else "")


def list_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    images = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def paired(generated: dict[str, Path], reference: dict[str, Path]) -> list[str]:
    names = sorted(set(generated) & set(reference))
    if not names:
        raise ValueError("no image names in common between the two folders (images are paired by file name)")
    return names


def load_batch(paths: Sequence[Path], size: tuple[int, int] | None = None) -> torch.Tensor:
    """float [N, 3, H, W] in [0, 1]; resized to `size` (W, H) when given."""
    arrays = []
    for p in paths:
        image = Image.open(p).convert("RGB")
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _missing(name: str, package: str, error: Exception) -> MetricResult:
    return MetricResult(name, None, f"needs {package} ({type(error).__name__}: {error})")


def psnr_ssim(gen: torch.Tensor, ref: torch.Tensor) -> list[MetricResult]:
    try:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    except ImportError as e:
        return [_missing("PSNR", "torchmetrics", e), _missing("SSIM", "torchmetrics", e)]
    psnr = peak_signal_noise_ratio(gen.double(), ref.double(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    finite = psnr[torch.isfinite(psnr)]
    note = "" if len(finite) == len(psnr) else f"{len(psnr) - len(finite)} identical pairs left out"
    ssim = structural_similarity_index_measure(gen.double(), ref.double(), data_range=1.0)
    return [MetricResult("PSNR (dB)", float(finite.mean()) if len(finite) else float("inf"), note),
            MetricResult("SSIM", float(ssim))]


def lpips(gen: torch.Tensor, ref: torch.Tensor) -> MetricResult:
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except ImportError as e:
        return _missing("LPIPS", "torchvision", e)
    except (OSError, RuntimeError) as e:  # the AlexNet weights are fetched by torchvision
        return MetricResult("LPIPS", None, f"AlexNet weights not available ({type(e).__name__}: {e})")
    return MetricResult("LPIPS", float(metric(gen.clamp(0, 1), ref.clamp(0, 1))), "AlexNet")


def fid(generated: Path, reference: Path, allow_download: bool) -> MetricResult:
    try:
        from cleanfid import fid as cleanfid
    except ImportError as e:
        return _missing("FID", "clean-fid", e)
    if not allow_download:
        return MetricResult("FID", None, "clean-fid fetches its Inception weights from the internet on first use; "
                                         "pass --allow-download where that is possible")
    try:
        return MetricResult("FID", float(cleanfid.compute_fid(str(generated), str(reference), mode="clean")),
                            "clean-fid, mode clean")
    except Exception as e:  # noqa: BLE001 - report whatever stopped it (download, too few images, ...)
        return MetricResult("FID", None, f"{type(e).__name__}: {e}")


def _hub_cached(repo_id: str, filename: str = "config.json") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def clip_score(images: torch.Tensor, prompts: Sequence[str], model: str, allow_download: bool) -> MetricResult:
    if not (Path(model).is_dir() or _hub_cached(model) or allow_download):
        return MetricResult("CLIP score", None, f"{model} is not on this machine (pass --clip-model PATH or "
                                                "--allow-download)")
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore

        metric = CLIPScore(model_name_or_path=model)
        return MetricResult("CLIP score", float(metric((images * 255).to(torch.uint8), list(prompts))), model)
    except ImportError as e:
        return _missing("CLIP score", "torchmetrics[multimodal] / transformers", e)
    except Exception as e:  # noqa: BLE001
        return MetricResult("CLIP score", None, f"{type(e).__name__}: {e}")


def image_reward(paths: Sequence[Path], prompts: Sequence[str], allow_download: bool) -> MetricResult:
    try:
        import ImageReward as RM  # noqa: N813 - the package's own spelling
    except ImportError as e:
        return _missing("ImageReward", "image-reward", e)
    if not (_hub_cached("THUDM/ImageReward", "ImageReward.pt") or allow_download):
        return MetricResult("ImageReward", None, "THUDM/ImageReward weights are not on this machine "
                                                 "(pass --allow-download)")
    try:
        model = RM.load("ImageReward-v1.0")
        scores = [float(model.score(p, str(path))) for p, path in zip(prompts, paths)]
        return MetricResult("ImageReward", float(np.mean(scores)))
    except Exception as e:  # noqa: BLE001
        return MetricResult("ImageReward", None, f"{type(e).__name__}: {e}")


def demo_faithfulness(paths: Sequence[Path], prompts: Sequence[str]) -> MetricResult:
    """Pass rate of the demo checker; only for prompts the demo grammar parses."""
    from ..demo.checker import pass_rates
    from ..demo.scenes import parse_prompt

    try:
        for p in prompts:
            parse_prompt(p)
    except ValueError as e:
        return MetricResult("demo faithful", None, f"prompts are not all of the demo grammar ({e})")
    rate = pass_rates(prompts, [Image.open(path).convert("RGB") for path in paths])["all"]
    return MetricResult("demo faithful", rate, "fraction of images the checker accepts")


def read_prompts(path: Path) -> dict[str, str]:
    """{image name: prompt} from generate.py's prompts.json."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object {{image name: prompt}} (as generate.py writes)")
    return data


def evaluate_folders(generated: Path, reference: Path | None, prompts: dict[str, str] | None,
                     allow_download: bool = False, clip_model: str = CLIP_MODEL,
                     progress: Callable[[str], None] | None = None) -> list[MetricResult]:
    gen_images = list_images(generated)
    results: list[MetricResult] = []
    if reference is not None:
        ref_images = list_images(reference)
        names = paired(gen_images, ref_images)
        size = Image.open(gen_images[names[0]]).size
        gen = load_batch([gen_images[n] for n in names], size)
        ref = load_batch([ref_images[n] for n in names], size)
        results += psnr_ssim(gen, ref)
        results.append(lpips(gen, ref))
        results.append(fid(generated, reference, allow_download))
        if progress:
            progress(f"{len(names)} image pairs")
    if prompts:
        names = [n for n in gen_images if n in prompts]
        if not names:
            raise ValueError("none of the generated images has a prompt in the prompts file")
        paths, texts = [gen_images[n] for n in names], [prompts[n] for n in names]
        results.append(clip_score(load_batch(paths), texts, clip_model, allow_download))
        results.append(image_reward(paths, texts, allow_download))
        results.append(demo_faithfulness(paths, texts))
    return results

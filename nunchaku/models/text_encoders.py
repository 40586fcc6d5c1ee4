"""A W4A16 T5 encoder for FLUX's second text encoder (`text_encoder_2`, the `--use-qencoder` flag).

Every nn.Linear inside the encoder blocks (q, k, v, o, wi_0, wi_1, wo; wi for non-gated
configs) becomes a weight-only 4-bit layer (asymmetric uint4 codes, one BF16 scale and zero per
128 input channels, activation-aware clipping search from `nunchaku.quant.awq`). The token
embedding, the relative-position bias, the RMS norms and everything else stay in the model's
dtype. The result is still a `transformers.T5EncoderModel`, so diffusers' FluxPipeline takes it
as `text_encoder_2` unchanged.

Memory of the real T5-XXL encoder (d_model 4096, d_ff 10240, 24 layers, 64 heads x 64,
vocab 32128, gated-gelu), from `t5_memory_report`:
    BF16:   4,762,310,656 parameters -> 9,524,621,312 bytes (8.87 GiB)
    W4A16:  2,723,557,376 bytes (2.54 GiB): 2,315,255,808 B of packed codes, 144,703,488 B of
            scales + zeros, 263,598,080 B of BF16 embedding/norms/position bias; 3.50x smaller.

Quality: on random-weight T5 encoders (1 to 16 layers) the W4A16 output error stays a constant
27-28 dB above the error of running the same model in BF16 (each quantized layer alone: 20.3-20.6
dB SQNR); both SQNRs fall with depth because random deep networks amplify any perturbation, so a
random-weight T5-XXL gives only 7.1 dB against BF16 (H100). Real T5-XXL weights were not
available to measure here.

transformers' T5 feed-forward reads `self.wo.weight.dtype` to decide whether to cast its input
(`_keep_in_fp32_modules = ["wo"]`: in transformers 5.x that keeps `wo` in FP32 only when the
model is loaded in FP16). The quantized layers therefore carry a zero-element, non-persistent
`weight` buffer whose dtype is the dtype a dense layer would have had (see T5W4A16Linear).

File format (one safetensors file, `save_quantized_t5` / `load_quantized_t5`):
    <layer>.qweight  uint8 [N, K/2]   unsigned codes, two per byte, even k in the low nibble
    <layer>.wscales  bf16  [N, K/G]
    <layer>.wzeros   bf16  [N, K/G]   W[n, k] = code * wscales[n, k/G] + wzeros[n, k/G]
    <layer>.bias     [N]              only for layers that have one (T5 has none)
    <param>          every other parameter under its own name (tied weights once, under the
                     first name of state_dict(): shared.weight)
    metadata: format=nunchaku-t5-w4a16, version=1, config=<T5Config JSON>, group_size,
              quantized_modules=<JSON list of layer names>
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..formats.errors import CheckpointError, describe
from ..formats.safetensors_io import SAFETENSORS_DTYPES
from ..nn.linear import AWQW4A16Linear
from ..nn.utils import set_submodule
from ..quant.awq import DEFAULT_CLIP_GRID, quantize_w4a16
from ..quant.weights import W4A16Weights

if TYPE_CHECKING:
    from transformers import T5Config, T5EncoderModel

FORMAT_NAME = "nunchaku-t5-w4a16"
FORMAT_VERSION = "1"
SCALE_DTYPE = torch.bfloat16
_BLOCKS_PREFIX = "encoder.block."


class T5CheckpointError(CheckpointError):
    """A file cannot be read as a nunchaku W4A16 T5 checkpoint (a ValueError; `file` and `key`
    lead the message and are kept as attributes)."""


class T5KeyMismatchError(T5CheckpointError):
    """A tensor the model needs is missing from the file, or the file has one the model lacks."""


class T5ShapeMismatchError(T5CheckpointError):
    """A tensor of the file has another shape or dtype than the model expects."""


class T5W4A16Linear(AWQW4A16Linear):
    """AWQW4A16Linear that also answers `.weight` the way transformers' T5 code expects.

    T5DenseActDense / T5DenseGatedActDense cast their hidden states to `self.wo.weight.dtype`
    before `wo` (unless that dtype is int8). Here `weight` is a zero-element buffer, never the
    weight (use to_weights().dequantize() for that): its dtype is the dtype the dense layer had,
    so the cast happens exactly as it would have (FP32 for an FP16-loaded `wo`, none otherwise),
    and it follows `.to(dtype/device)` like a dense weight. It is non-persistent: not saved.
    """

    weight: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 128,
        dtype: torch.dtype = SCALE_DTYPE,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__(in_features, out_features, bias, group_size, dtype, device)
        self.register_buffer("weight", torch.empty(0, dtype=compute_dtype, device=device), persistent=False)

    @classmethod
    def from_weights(  # type: ignore[override]
        cls, w: W4A16Weights, dtype: torch.dtype = SCALE_DTYPE, compute_dtype: torch.dtype = torch.bfloat16
    ) -> T5W4A16Linear:
        m = cls(w.in_features, w.out_features, w.bias is not None, w.group_size, dtype, w.qweight.device,
                compute_dtype)
        m.load_weights(w)
        return m


def _target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if n.startswith(_BLOCKS_PREFIX) and isinstance(m, nn.Linear)]


def _calibrate(
    model: nn.Module,
    names: Sequence[str],
    texts: Sequence[str],
    tokenizer: Any,
    max_length: int,
    pad_to_max_length: bool,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Mean of x_k² [K] (float32) over all calibration tokens, per linear layer input."""
    from tqdm.auto import tqdm

    from ..quant.calibration import CalibrationCollector

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Only the second moments are used; a one-row reservoir keeps the hooks' memory negligible.
    collector = CalibrationCollector(model, names, max_samples=1, sample_dtype=torch.float32)
    try:
        with collector, torch.no_grad():
            for text in tqdm(texts, desc="calibrating T5", unit="text", disable=not progress):
                enc = tokenizer(
                    text,
                    return_tensors="pt",
                    truncation=True,
                    max_length=max_length,
                    padding="max_length" if pad_to_max_length else False,
                )
                # Like FluxPipeline, no attention mask: pad positions (if any) are real inputs there.
                model(input_ids=enc["input_ids"].to(device))
    finally:
        model.train(was_training)
    return {name: s.sq_mean() for name, s in collector.stats().items()}


def quantize_t5_encoder(
    model: T5EncoderModel,
    calibration_texts: Sequence[str] | None,
    tokenizer: Any = None,
    group_size: int = 128,
    progress: bool = True,
    *,
    max_length: int = 512,
    pad_to_max_length: bool = False,
    clip_grid: Sequence[float] = DEFAULT_CLIP_GRID,
) -> T5EncoderModel:
    """Replaces every nn.Linear of the encoder blocks by a T5W4A16Linear, in place; returns `model`.

    With calibration_texts (and the model's tokenizer) each layer's clipping search weights the
    weight error by E[x_k²] of its inputs over the texts' tokens (texts run one at a time,
    truncated to max_length; pad_to_max_length pads each like FluxPipeline does, which counts
    the pad positions FLUX's transformer also attends to). Without texts the search minimizes
    the plain weight error. clip_grid: the clipping ratios tried per (row, group); (1.0,) is
    plain round-to-nearest over the full range. Codes are computed on the device the weights
    are on; scales and zeros are BF16. The layers' in_features must be multiples of group_size.
    """
    from tqdm.auto import tqdm

    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    targets = _target_linears(model)
    if not targets:
        raise ValueError("the model has no nn.Linear under encoder.block.* (already quantized, or not a T5 encoder?)")
    for name, lin in targets:
        if lin.in_features % group_size:
            raise ValueError(f"{name}: in_features {lin.in_features} is not a multiple of group_size {group_size}")
        if lin.weight.device.type == "meta":
            raise ValueError(f"{name}: the weight is on the meta device; load the model's weights first")

    sq_means: dict[str, torch.Tensor] = {}
    if calibration_texts is not None:
        if isinstance(calibration_texts, str):
            raise TypeError("calibration_texts must be a list of strings, not one string")
        if len(calibration_texts) == 0:
            raise ValueError("calibration_texts is empty: pass texts, or None for the weight-error search")
        if tokenizer is None:
            raise ValueError("calibration_texts were given without a tokenizer to encode them")
        sq_means = _calibrate(model, [n for n, _ in targets], calibration_texts, tokenizer, max_length,
                              pad_to_max_length, progress)

    for name, lin in tqdm(targets, desc="quantizing T5", unit="layer", disable=not progress):
        with torch.no_grad():
            act = sq_means.get(name)
            w = quantize_w4a16(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), group_size,
                               act_sq_mean=None if act is None else act.to(lin.weight.device),
                               clip_grid=clip_grid, storage_dtype=SCALE_DTYPE)
        set_submodule(model, name, T5W4A16Linear.from_weights(w, SCALE_DTYPE, compute_dtype=lin.weight.dtype))
    return model


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with tied tensors once, under their first name."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of the W4A16 layers of a model, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, AWQW4A16Linear)]


def save_quantized_t5(model: T5EncoderModel, path: str | os.PathLike) -> None:
    """Writes the quantized encoder to one safetensors file (layout in the module docstring)."""
    from safetensors.torch import save_file

    qnames = quantized_module_names(model)
    if not qnames:
        raise ValueError("the model has no quantized layers: run quantize_t5_encoder first")
    group_sizes = {model.get_submodule(n).group_size for n in qnames}
    if len(group_sizes) != 1:
        raise ValueError(f"quantized layers use several group sizes {sorted(group_sizes)}; the format has one")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in _unique_state(model).items()}
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": model.config.to_json_string(use_diff=False),
        "group_size": str(group_sizes.pop()),
        "quantized_modules": json.dumps(qnames),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)




def _read_metadata(f: Any, path: str) -> tuple[T5Config, int, list[str]]:
    from transformers import T5Config

    meta = f.metadata() or {}
    if meta.get("format") != FORMAT_NAME:
        raise T5CheckpointError(
            f"not a nunchaku W4A16 T5 checkpoint (metadata format is {meta.get('format')!r}, "
            f"expected {FORMAT_NAME!r})", file=path)
    if meta.get("version") != FORMAT_VERSION:
        raise T5CheckpointError(
            f"unsupported {FORMAT_NAME} version {meta.get('version')!r} (this nunchaku reads {FORMAT_VERSION!r})",
            file=path)
    try:
        config = T5Config.from_dict(json.loads(meta["config"]))
        group_size = int(meta["group_size"])
        qnames = json.loads(meta["quantized_modules"])
    except (KeyError, ValueError, TypeError) as e:
        raise T5CheckpointError(f"unreadable metadata ({type(e).__name__}: {e})", file=path) from None
    if not (isinstance(qnames, list) and all(isinstance(n, str) for n in qnames)):
        raise T5CheckpointError("metadata quantized_modules is not a JSON list of names", file=path)
    if group_size <= 0:
        raise T5CheckpointError(f"metadata group_size {group_size} is not positive", file=path)
    return config, group_size, qnames


def _compute_dtype(name: str, torch_dtype: torch.dtype) -> torch.dtype:
    # What from_pretrained gives the dense layer: T5's _keep_in_fp32_modules (wo) become FP32
    # only when the model is loaded in FP16 (transformers 5.x).
    if name.rsplit(".", 1)[-1] == "wo" and torch_dtype == torch.float16:
        return torch.float32
    return torch_dtype


def load_quantized_t5(
    path: str | os.PathLike,
    torch_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> T5EncoderModel:
    """Builds the T5EncoderModel from the file's config (nothing is downloaded) and loads it strictly.

    Unquantized parameters are cast to torch_dtype; the quantized layers keep the codes (uint8)
    and their scales/zeros as stored (BF16). Raises T5CheckpointError for a file that is not
    ours, T5KeyMismatchError for a missing or unexpected tensor, T5ShapeMismatchError for a
    tensor of the wrong shape or dtype (both ValueErrors naming the key). Returns the model in
    eval mode on `device`.
    """
    from safetensors import SafetensorError, safe_open
    from transformers import T5EncoderModel

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    device = torch.device(device)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as e:
        raise T5CheckpointError(f"not a safetensors file ({e})", file=path) from None
    with handle as f:
        config, group_size, qnames = _read_metadata(f, path)
        with torch.device("meta"):
            model = T5EncoderModel(config)
        dense = dict(_target_linears(model))
        for name in qnames:
            lin = dense.get(name)
            if lin is None:
                raise T5CheckpointError(
                    f"quantized module {name!r} is not an nn.Linear of the encoder blocks of this config", file=path)
            if lin.in_features % group_size:
                raise T5CheckpointError(
                    f"{name}: in_features {lin.in_features} is not a multiple of group_size {group_size}", file=path)
            set_submodule(model, name, T5W4A16Linear(
                lin.in_features, lin.out_features, lin.bias is not None, group_size, SCALE_DTYPE, "meta",
                _compute_dtype(name, torch_dtype)))

        expected = _unique_state(model)
        found = set(f.keys())
        missing = [k for k in expected if k not in found]
        if missing:
            raise T5KeyMismatchError(f"missing from the file ({len(missing)} missing in all)", file=path,
                                     key=missing[0])
        unexpected = sorted(found - set(expected))
        if unexpected:
            raise T5KeyMismatchError(f"unexpected tensor, the model has no such key ({len(unexpected)} in all)",
                                     file=path, key=unexpected[0])

        qset = set(qnames)
        loaded: dict[str, torch.Tensor] = {}
        for key, ref in expected.items():
            sl = f.get_slice(key)
            shape, dtype = tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
            owner, _, leaf = key.rpartition(".")
            quantized = owner in qset
            if quantized and leaf == "qweight":
                ok_dtype = dtype == torch.uint8
            else:
                ok_dtype = isinstance(dtype, torch.dtype) and dtype.is_floating_point
            if shape != tuple(ref.shape) or not ok_dtype:
                want = ref.dtype if quantized and leaf == "qweight" else "floating point"
                raise T5ShapeMismatchError(
                    f"expected {describe(ref.shape, want)}, found {describe(shape, dtype)}", file=path, key=key)
            t = f.get_tensor(key)
            if not quantized:
                t = t.to(torch_dtype)
            loaded[key] = t.to(device)

    _assign(model, loaded, torch_dtype, device)
    return model.eval()


def _assign(model: nn.Module, loaded: Mapping[str, torch.Tensor], torch_dtype: torch.dtype,
            device: torch.device) -> None:
    """Puts the loaded tensors in place of the meta ones, keeping tied parameters tied."""
    by_id: dict[int, torch.Tensor | nn.Parameter] = {}
    canonical = {id(t): k for k, t in _unique_state(model).items()}
    for name, ref in model.state_dict(keep_vars=True).items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        new = by_id.get(id(ref))
        if new is None:
            new = loaded[canonical[id(ref)]]
            if isinstance(ref, nn.Parameter):
                new = nn.Parameter(new, requires_grad=False)
            by_id[id(ref)] = new
        if isinstance(new, nn.Parameter):
            owner._parameters[leaf] = new
        else:
            owner._buffers[leaf] = new
    for name, module in model.named_modules():
        if isinstance(module, T5W4A16Linear):
            module.weight = torch.empty(0, dtype=_compute_dtype(name, torch_dtype), device=device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"internal error: tensors left unloaded: {left[:5]}")


def t5_memory_report(config: T5Config | Mapping[str, Any], group_size: int = 128) -> dict[str, int | float]:
    """Weight bytes of a T5 encoder in BF16 and in W4A16, counted from the config's shapes.

    W4A16 = per quantized linear N*K/2 bytes of codes + 2 * N*(K/G) * 2 bytes of BF16 scales and
    zeros (no biases: T5 has none), plus the unquantized tensors in BF16: the token embedding
    (tied with the encoder's, counted once), the relative-position bias of block 0
    [num_buckets, heads] and the RMS norm weights (2 per block + the final one). Returns a dict
    of ints (bytes, parameter counts) and the BF16/W4A16 ratio.
    """
    get = (lambda k: config[k]) if isinstance(config, Mapping) else (lambda k: getattr(config, k))
    d_model, d_ff, layers, heads, d_kv = (int(get(k)) for k in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv"))
    vocab, buckets = int(get("vocab_size")), int(get("relative_attention_num_buckets"))
    proj = str(get("feed_forward_proj"))
    gated = proj.startswith("gated-")
    inner = heads * d_kv
    # (N, K) of each quantized linear of one block
    shapes = [(inner, d_model)] * 3 + [(d_model, inner)]
    shapes += [(d_ff, d_model)] * (2 if gated else 1) + [(d_model, d_ff)]
    for n, k in shapes:
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    quantized_params = layers * sum(n * k for n, k in shapes)
    group_count = layers * sum(n * (k // group_size) for n, k in shapes)
    unquantized_params = vocab * d_model + buckets * heads + (2 * layers + 1) * d_model
    bf16 = 2
    qweight_bytes = quantized_params // 2
    scales_bytes = zeros_bytes = group_count * bf16
    unquantized_bytes = unquantized_params * bf16
    w4a16_bytes = qweight_bytes + scales_bytes + zeros_bytes + unquantized_bytes
    bf16_bytes = (quantized_params + unquantized_params) * bf16
    return {
        "quantized_params": quantized_params,
        "unquantized_params": unquantized_params,
        "bf16_bytes": bf16_bytes,
        "w4a16_bytes": w4a16_bytes,
        "qweight_bytes": qweight_bytes,
        "scales_bytes": scales_bytes,
        "zeros_bytes": zeros_bytes,
        "unquantized_bytes": unquantized_bytes,
        "ratio": bf16_bytes / w4a16_bytes,
    }

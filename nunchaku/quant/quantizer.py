"""The quantizer: turns calibrated linear layers of any nn.Module into W4A4 / W4A16 weights.

A QuantPlan lists what to quantize. W4A4 groups name the linears that read one input (q/k/v,
or in FLUX single blocks q/k/v and the MLP up-projection): they are fused along the output
axis and share one smoothing vector and one low-rank branch. Work proceeds block by block;
with a work_dir every finished block is saved, and a restarted run skips the blocks already
there, so a crash or an out-of-memory on a 12B model costs one block, not the whole run.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .awq import quantize_w4a16, simulate_w4a16
from .calibration import ChannelStats
from .svdquant import (
    DEFAULT_ALPHA_GRID,
    DecomposeOptions,
    fuse_shared_input,
    search_smoothing,
    simulate_w4a4,
    svdquant_decompose,
)
from .weights import W4A4Weights, W4A16Weights


class QuantizationError(RuntimeError):
    """Quantization could not proceed (out of memory, inconsistent plan, ...)."""


@dataclass(frozen=True)
class W4A4Group:
    """Linears fused into one W4A4 layer called `name`; members are module names, in output order."""

    name: str
    members: tuple[str, ...]
    act_unsigned: bool = False
    block: str = ""


@dataclass(frozen=True)
class W4A16Target:
    name: str
    group_size: int = 64
    block: str = ""


@dataclass(frozen=True)
class QuantPlan:
    w4a4: tuple[W4A4Group, ...] = ()
    w4a16: tuple[W4A16Target, ...] = ()

    def calibration_targets(self) -> list[str]:
        """One module per distinct input: the first member of each W4A4 group, each W4A16 target."""
        return [g.members[0] for g in self.w4a4] + [t.name for t in self.w4a16]

    def blocks(self) -> list[str]:
        seen: dict[str, None] = {}
        for item in (*self.w4a4, *self.w4a16):
            seen.setdefault(item.block, None)
        return list(seen)


@dataclass(frozen=True)
class QuantizerOptions:
    decompose: DecomposeOptions = DecomposeOptions()
    alphas: tuple[float, ...] = DEFAULT_ALPHA_GRID
    device: str | None = None  # where the math runs; None: where each weight lives
    smoothing: bool = True  # False: λ = 1 (with rank 0 this is naive round-to-nearest W4A4)


@dataclass
class LayerReport:
    name: str
    kind: str  # "w4a4" | "w4a16"
    shape: tuple[int, int]  # (N, K)
    alpha: float | None
    rel_error: float  # ||y_q − y|| / ||y|| on the calibration sample
    sqnr_db: float


@dataclass
class QuantResult:
    w4a4: dict[str, W4A4Weights] = field(default_factory=dict)
    w4a16: dict[str, W4A16Weights] = field(default_factory=dict)
    reports: list[LayerReport] = field(default_factory=list)


def _linear(modules: dict[str, nn.Module], name: str) -> nn.Linear:
    m = modules.get(name)
    if not isinstance(m, nn.Linear):
        raise QuantizationError(f"{name!r} is not an nn.Linear of the model (found {type(m).__name__})")
    return m


def _errors(y: torch.Tensor, y_ref: torch.Tensor) -> tuple[float, float]:
    noise = (y - y_ref).pow(2).sum().item()
    signal = y_ref.pow(2).sum().item()
    rel = math.sqrt(noise / signal) if signal > 0 else float("inf")
    sqnr = 10 * math.log10(signal / noise) if noise > 0 else float("inf")
    return rel, sqnr


def _plan_fingerprint(plan: QuantPlan, options: QuantizerOptions) -> str:
    d = {"plan": asdict(plan), "options": repr(options)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _quantize_group(modules, group: W4A4Group, stats: ChannelStats, options: QuantizerOptions):
    linears = [_linear(modules, m) for m in group.members]
    device = options.device or linears[0].weight.device
    weight, bias = fuse_shared_input(
        [l.weight.detach().to(device) for l in linears],
        [None if l.bias is None else l.bias.detach().to(device) for l in linears],
    )
    x = stats.sample.to(device)
    if options.smoothing:
        result = search_smoothing(
            weight,
            bias,
            stats.absmax(shifted=group.act_unsigned).to(device),
            x,
            options.decompose,
            options.alphas,
            act_unsigned=group.act_unsigned,
        )
        layer, alpha = result.layer, result.alpha
    else:
        ones = torch.ones(weight.shape[1], device=device)
        layer, alpha = svdquant_decompose(weight, bias, ones, options.decompose, group.act_unsigned), None
    y_ref = x.float() @ weight.T + bias
    rel, sqnr = _errors(simulate_w4a4(x, layer), y_ref)
    return layer.to(device="cpu"), LayerReport(group.name, "w4a4", tuple(weight.shape), alpha, rel, sqnr)


def _quantize_w4a16(modules, target: W4A16Target, stats: ChannelStats, options: QuantizerOptions):
    lin = _linear(modules, target.name)
    device = options.device or lin.weight.device
    w = lin.weight.detach().to(device)
    b = None if lin.bias is None else lin.bias.detach().to(device)
    layer = quantize_w4a16(
        w, b, target.group_size, stats.sq_mean().to(device), storage_dtype=options.decompose.storage_dtype
    )
    x = stats.sample.to(device)
    y_ref = x.float() @ w.float().T + (0 if b is None else b.float())
    rel, sqnr = _errors(simulate_w4a16(x, layer), y_ref)
    return layer.to(device="cpu"), LayerReport(target.name, "w4a16", tuple(w.shape), None, rel, sqnr)


def quantize_model(
    model: nn.Module,
    plan: QuantPlan,
    stats: dict[str, ChannelStats],
    options: QuantizerOptions = QuantizerOptions(),
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> QuantResult:
    """Quantizes every item of the plan from calibration statistics (see CalibrationCollector,
    whose targets must be plan.calibration_targets()). Returns logical weights on the CPU."""
    from tqdm.auto import tqdm

    from .checkpoint_cache import BlockCache

    modules = dict(model.named_modules())
    missing = [n for n in plan.calibration_targets() if n not in stats]
    if missing:
        raise QuantizationError(f"no calibration statistics for {missing[:5]} ({len(missing)} missing)")
    cache = BlockCache(work_dir, _plan_fingerprint(plan, options)) if work_dir is not None else None
    result = QuantResult()
    blocks = plan.blocks()
    bar = tqdm(total=len(plan.w4a4) + len(plan.w4a16), desc="quantizing", unit="layer", disable=not progress)
    for block in blocks:
        groups = [g for g in plan.w4a4 if g.block == block]
        targets = [t for t in plan.w4a16 if t.block == block]
        cached = cache.load(block) if cache is not None else None
        if cached is not None:
            w4a4, w4a16, reports = cached
            result.w4a4.update(w4a4)
            result.w4a16.update(w4a16)
            result.reports.extend(reports)
            bar.update(len(groups) + len(targets))
            continue
        block_w4a4, block_w4a16, block_reports = {}, {}, []
        for item in (*groups, *targets):
            bar.set_postfix_str(item.name)
            try:
                if isinstance(item, W4A4Group):
                    layer, report = _quantize_group(modules, item, stats[item.members[0]], options)
                    block_w4a4[item.name] = layer
                else:
                    layer, report = _quantize_w4a16(modules, item, stats[item.name], options)
                    block_w4a16[item.name] = layer
            except torch.OutOfMemoryError as e:
                raise QuantizationError(
                    f"out of memory while quantizing {item.name!r}: {e}. Quantize on another device "
                    "(QuantizerOptions.device / --device), or collect fewer calibration samples "
                    "(--max-samples); with a work_dir the finished blocks are kept and a rerun resumes."
                ) from None
            block_reports.append(report)
            bar.update(1)
        if cache is not None:
            cache.save(block, block_w4a4, block_w4a16, block_reports)
        result.w4a4.update(block_w4a4)
        result.w4a16.update(block_w4a16)
        result.reports.extend(block_reports)
    bar.close()
    return result


def format_report(reports: Sequence[LayerReport]) -> str:
    """A plain-text table of per-layer errors, worst SQNR last."""
    lines = [f"{'layer':<48} {'kind':<6} {'N x K':>13} {'alpha':>6} {'rel.err':>9} {'SQNR dB':>8}"]
    for r in sorted(reports, key=lambda r: -r.sqnr_db):
        alpha = "-" if r.alpha is None else f"{r.alpha:.2f}"
        lines.append(
            f"{r.name:<48} {r.kind:<6} {r.shape[0]:>6}x{r.shape[1]:<6} {alpha:>6} {r.rel_error:>9.4f} {r.sqnr_db:>8.2f}"
        )
    return "\n".join(lines)

"""Calibration statistics captured by forward hooks while a model runs.

Statistics are streaming: per linear input channel a running max, min and sum of squares, plus
a bounded reservoir sample of input rows (tokens) for the per-layer error searches. Memory per
layer is O(max_samples · K) whatever the number of calibration prompts or denoising steps, so a
12B model can be calibrated without keeping its activations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import GELU_SHIFT


@dataclass
class ChannelStats:
    """Statistics of one linear layer's input x [T, K] over all calibration tokens.

    max/min: float32 [K] per-channel extremes; sq_sum: float64 [K] Σ x²; count: tokens seen;
    sample: [≤max_samples, K] uniform reservoir sample of rows (sample_dtype, sample_device).
    """

    max: torch.Tensor
    min: torch.Tensor
    sq_sum: torch.Tensor
    count: int = 0
    sample: torch.Tensor | None = None
    _generator: torch.Generator = field(default=None, repr=False)

    def absmax(self, shifted: bool = False) -> torch.Tensor:
        """max |x| per channel, or max |x + GELU_SHIFT| for unsigned (post-GELU) layers."""
        shift = GELU_SHIFT if shifted else 0.0
        return torch.maximum((self.max + shift).abs(), (self.min + shift).abs())

    def sq_mean(self) -> torch.Tensor:
        return (self.sq_sum / max(self.count, 1)).float()


class ReservoirStats:
    """Accumulates ChannelStats from batches of rows."""

    def __init__(self, max_samples: int, sample_dtype: torch.dtype, sample_device, seed: int):
        self.max_samples = max_samples
        self.sample_dtype = sample_dtype
        self.sample_device = torch.device(sample_device)
        self.seed = seed
        self.stats: ChannelStats | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        rows_f = rows.float()
        s = self.stats
        if s is None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            k = rows.shape[-1]
            s = self.stats = ChannelStats(
                max=torch.full((k,), -float("inf"), device=rows.device),
                min=torch.full((k,), float("inf"), device=rows.device),
                sq_sum=torch.zeros(k, dtype=torch.float64, device=rows.device),
                sample=torch.empty(0, k, dtype=self.sample_dtype, device=self.sample_device),
                _generator=gen,
            )
        s.max = torch.maximum(s.max, rows_f.amax(0))
        s.min = torch.minimum(s.min, rows_f.amin(0))
        s.sq_sum += rows_f.double().pow(2).sum(0)
        self._reservoir_add(s, rows)
        s.count += rows.shape[0]

    def _reservoir_add(self, s: ChannelStats, rows: torch.Tensor) -> None:
        t = rows.shape[0]
        free = self.max_samples - s.sample.shape[0]
        if free > 0:
            take = rows[:free].to(self.sample_device, self.sample_dtype)
            s.sample = torch.cat([s.sample, take])
        if t <= free:
            return
        # Algorithm R, vectorized: row i (global index n_i) replaces slot j ~ U[0, n_i] when
        # j < max_samples. Among rows hitting the same slot the last one wins, as it would
        # sequentially.
        start = max(free, 0)
        global_idx = s.count + torch.arange(start, t)
        slots = (torch.rand(t - start, generator=s._generator) * (global_idx + 1).double()).long()
        hit = slots < self.max_samples
        if not hit.any():
            return
        slots, src = slots[hit], torch.arange(start, t)[hit]
        order = torch.argsort(slots * t + src)  # by slot, then source order
        slots, src = slots[order], src[order]
        last = torch.ones_like(slots, dtype=torch.bool)
        last[:-1] = slots[1:] != slots[:-1]
        slots, src = slots[last], src[last]
        s.sample[slots.to(self.sample_device)] = rows[src.to(rows.device)].to(self.sample_device, self.sample_dtype)


class CalibrationCollector:
    """Context manager: while active, every named linear's input feeds its ReservoirStats.

        with CalibrationCollector(model, ["blocks.0.attn.to_q", ...]) as calib:
            run_the_model()
        stats = calib.stats()  # name -> ChannelStats
    """

    def __init__(
        self,
        model: nn.Module,
        module_names: Iterable[str],
        max_samples: int = 256,
        sample_dtype: torch.dtype = torch.bfloat16,
        sample_device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        modules = dict(model.named_modules())
        self._targets = {}
        for i, name in enumerate(module_names):
            if name not in modules:
                raise KeyError(f"calibration target {name!r} is not a module of the model")
            self._targets[name] = (modules[name], ReservoirStats(max_samples, sample_dtype, sample_device, seed + i))
        self._handles = []

    def __enter__(self) -> CalibrationCollector:
        for module, acc in self._targets.values():
            self._handles.append(module.register_forward_pre_hook(_make_hook(acc)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stats(self) -> dict[str, ChannelStats]:
        missing = [n for n, (_, acc) in self._targets.items() if acc.stats is None]
        if missing:
            raise RuntimeError(
                f"calibration saw no input for {len(missing)} layer(s), e.g. {missing[:3]}: "
                "did the calibration run call the model?"
            )
        return {n: acc.stats for n, (_, acc) in self._targets.items()}


def _make_hook(acc: ReservoirStats):
    def hook(module, args):
        acc.update(args[0])

    return hook

"""Replaying a module's forward as a CUDA graph, to take the CPU out of an eager step.

An eager FLUX.1 step on the engine launches ~2,000 kernels; on an H100 the GPU finishes some of
them faster than Python issues the next (RESULTS.md: ~23 ms of a 200 ms INT4 step had no kernel
running). A CUDA graph records the launches of one forward once and replays them with a single
call. Use it for inference with fixed shapes:

    transformer = pipe.transformer
    transformer.forward = CUDAGraphForward(transformer)   # pipelines keep calling transformer(...)

One graph is captured per input signature (tensor shapes, dtypes and devices, and every
non-tensor argument), the first time that signature is seen; at most `max_graphs` are kept, least
recently used first out. Each replay copies the call's tensors into the graph's static inputs and
returns a copy of its static outputs.

A graph reads the module's tensors at the addresses they had at capture. nunchaku's quantized
modules announce every change that replaces such tensors (a LoRA set, re-weighted or removed, a
weight-layout change, `.to()`; nunchaku.nn.linear.state_generation): the graphs are then dropped
and recaptured on the next call. Changes made in place (`copy_` into a weight) are simply seen by
the next replay. For any other change that replaces a tensor the forward reads, call `reset()`.

It serves inference: a call with autograd recording, with a tensor that is not on a CUDA device,
or with an argument that is neither a tensor nor hashable is refused with a ValueError naming the
problem (run the module's own forward for those). The memory of a graph's intermediate tensors
stays reserved while the graph is kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .nn.linear import state_generation


class CUDAGraphForward:
    """Callable to put in place of `module.forward` (see the module docstring)."""

    def __init__(self, module: nn.Module, max_graphs: int = 4, warmup_calls: int = 2):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.eager_forward = module.forward
        self.max_graphs = max_graphs
        self.warmup_calls = warmup_calls
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]] = OrderedDict()
        self._generation = state_generation()

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every graph (their memory returns to the allocator); the next calls recapture."""
        self._graphs.clear()

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if torch.is_grad_enabled():
            raise ValueError("CUDAGraphForward serves inference: call it under torch.no_grad() or "
                             "torch.inference_mode() (autograd cannot record a graph replay)")
        if not tensors or any(not t.is_cuda for t in tensors):
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(f"CUDAGraphForward needs the call's tensors on a CUDA device, got {devices or 'none'}")
        if self._generation != state_generation():
            self.reset()
            self._generation = state_generation()
        key = self._signature(spec, leaves)
        if key not in self._graphs:
            with torch.cuda.device(tensors[0].device):
                self._capture(key, leaves, spec)
        self._graphs.move_to_end(key)
        graph, static_inputs, static_output = self._graphs[key]
        for static, given in zip(static_inputs, tensors, strict=True):
            static.copy_(given)
        graph.replay()
        return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, static_output)

    @staticmethod
    def _signature(spec, leaves) -> Hashable:
        """Shapes/dtypes/devices of the tensors and the values of everything else."""
        parts = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                parts.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device))
            elif isinstance(leaf, Hashable):
                parts.append(("value", type(leaf), leaf))
            else:
                raise ValueError(f"CUDAGraphForward keys its graphs on the call's non-tensor arguments; "
                                 f"an argument of type {type(leaf).__name__} is not hashable")
        # Inference-mode tensors cannot be written outside inference mode, and autocast changes
        # which kernels run: a graph per mode.
        return (str(spec), tuple(parts), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"))

    def _capture(self, key, leaves, spec) -> None:
        while len(self._graphs) >= self.max_graphs:  # first, so that two graphs' pools never coexist
            self._graphs.popitem(last=False)
        static_leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(static_leaves, spec)
        # Warm-up on a side stream (lazy initialisations, autotuning, allocator growth happen
        # outside the capture), as torch.cuda.graphs recommends.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                self.eager_forward(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.eager_forward(*args, **kwargs)
        static_inputs = [leaf for leaf in static_leaves if isinstance(leaf, torch.Tensor)]
        self._graphs[key] = (graph, static_inputs, static_output)

"""Triton launches a kernel on the *current* CUDA device, not on its tensors' device; the Triton
ops of this package launch inside on_device_of(tensor)."""

from __future__ import annotations

import contextlib

import torch


def on_device_of(t: torch.Tensor):
    """A context making t's CUDA device the current one (nothing to do when it already is)."""
    if t.device.index is None or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)

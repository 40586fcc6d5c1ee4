"""Low-memory mode: transformer blocks live in (pinned) CPU memory and visit the GPU one at a time.

    from nunchaku.offload import BlockOffloader
    offloader = BlockOffloader(pipeline.transformer, "cuda")   # after .to("cuda")
    image = pipeline(prompt, ...).images[0]
    offloader.remove()                                         # blocks back on the GPU

Everything outside the blocks (embedders, norm_out, proj_out) stays on the GPU. Before a block
runs, its weights are copied to the GPU on a side stream; the copy of the next block starts as
soon as the current one begins, so transfers overlap compute. After a block has run, its GPU
copies are dropped. The weights keep the layout of the device the model was moved to (for the
sm_90 kernels, their packed layout): tensors' storage is swapped in place, not moved with
`.to()`, so nothing is repacked per step. Peak GPU memory is then the resident layers plus two
blocks and the activations; the cost is one host-to-device copy of every block per step.
Eager mode only (the hooks and storage swaps are not for torch.compile).
"""

from __future__ import annotations

import torch
from torch import nn


class BlockOffloader:
    def __init__(self, transformer: nn.Module, device: str | torch.device = "cuda", pin_memory: bool = True):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # tensors report cuda:N
        blocks = [*getattr(transformer, "transformer_blocks", []),
                  *getattr(transformer, "single_transformer_blocks", [])]
        if not blocks:
            raise ValueError("BlockOffloader needs a FLUX transformer (transformer_blocks / single_transformer_blocks)")
        wrong = [t.device for b in blocks for t in self._tensors(b) if t.device != self.device]
        if wrong:
            raise ValueError(f"move the transformer to {self.device} first (found a block tensor on {wrong[0]})")
        self.blocks = blocks
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        # per block: [(tensor whose storage is swapped, host copy)]
        self.host: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for block in blocks:
            pairs = []
            for t in self._tensors(block):
                copy = t.detach().to("cpu")
                if cuda and pin_memory:
                    copy = copy.pin_memory()
                pairs.append((t, copy))
                t.data = torch.empty(0, dtype=t.dtype, device=self.device)
            self.host.append(pairs)
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.handles = []
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._before(index)))
            self.handles.append(block.register_forward_hook(self._after(index)))
        if cuda:
            torch.cuda.empty_cache()

    @staticmethod
    def _tensors(block: nn.Module) -> list[torch.Tensor]:
        seen, out = set(), []
        for t in [*block.parameters(), *block.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    def _fetch(self, index: int) -> None:
        """Starts copying block `index` to the device (on the side stream)."""
        if index >= len(self.blocks) or index in self.ready:
            return
        if self.stream is None:
            for t, host in self.host[index]:
                t.data = host.to(self.device)
            self.ready[index] = None
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for t, host in self.host[index]:
                t.data = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[index] = event

    def _before(self, index: int):
        def hook(_module, _args):
            self._fetch(index)
            event = self.ready[index]
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            self._fetch(index + 1)  # overlaps this block's compute
        return hook

    def _after(self, index: int):
        def hook(_module, _args, _output):
            for t, _host in self.host[index]:
                if self.stream is not None:
                    # the side stream allocated it; tell the allocator the compute stream used it
                    t.data.record_stream(torch.cuda.current_stream(self.device))
                t.data = torch.empty(0, dtype=t.dtype, device=self.device)
            self.ready.pop(index, None)
        return hook

    def remove(self) -> None:
        """Back to normal: every block resident on the device, hooks removed."""
        for h in self.handles:
            h.remove()
        self.handles = []
        for pairs in self.host:
            for t, host in pairs:
                t.data = host.to(self.device)
        self.ready.clear()

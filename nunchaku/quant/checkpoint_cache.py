"""Per-block results of an unfinished quantization run, so a restart resumes where it stopped.

One safetensors file per block, logical tensors (see weights.py) under "<layer>.<tensor>", the
layer kinds and reports in the metadata. A fingerprint of the plan and options is stored too: a
cache made with other settings is ignored rather than silently mixed in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .weights import W4A4Weights, W4A16Weights

_W4A4_TENSORS = ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias")
_W4A16_TENSORS = ("qweight", "wscales", "wzeros", "bias")


class BlockCache:
    def __init__(self, work_dir: str | Path, fingerprint: str):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint

    def _path(self, block: str) -> Path:
        return self.dir / f"block-{block or 'root'}.safetensors"

    def save(self, block: str, w4a4: dict, w4a16: dict, reports: list) -> None:
        tensors, layers = {}, {}
        for name, layer in w4a4.items():
            layers[name] = {"kind": "w4a4", "act_unsigned": layer.act_unsigned, "group_size": layer.group_size}
            for t in _W4A4_TENSORS:
                tensors[f"{name}.{t}"] = getattr(layer, t).contiguous()
        for name, layer in w4a16.items():
            layers[name] = {"kind": "w4a16", "group_size": layer.group_size, "has_bias": layer.bias is not None}
            for t in _W4A16_TENSORS:
                if getattr(layer, t) is not None:
                    tensors[f"{name}.{t}"] = getattr(layer, t).contiguous()
        meta = {
            "fingerprint": self.fingerprint,
            "layers": json.dumps(layers),
            "reports": json.dumps([asdict(r) for r in reports]),
        }
        path = self._path(block)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated block behind

    def load(self, block: str):
        from safetensors import safe_open

        from .quantizer import LayerReport

        path = self._path(block)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint:
                return None
            tensors = load_file(str(path))
        except (SafetensorError, OSError):
            return None  # unreadable leftovers are recomputed, not trusted
        w4a4, w4a16 = {}, {}
        for name, info in json.loads(meta["layers"]).items():
            if info["kind"] == "w4a4":
                w4a4[name] = W4A4Weights(
                    **{t: tensors[f"{name}.{t}"] for t in _W4A4_TENSORS},
                    act_unsigned=info["act_unsigned"],
                    group_size=info["group_size"],
                )
            else:
                kw = {t: tensors.get(f"{name}.{t}") for t in _W4A16_TENSORS}
                w4a16[name] = W4A16Weights(**kw, group_size=info["group_size"])
        names = {f.name for f in fields(LayerReport)}
        reports = [LayerReport(**{k: (tuple(v) if k == "shape" else v) for k, v in r.items() if k in names})
                   for r in json.loads(meta["reports"])]
        return w4a4, w4a16, reports

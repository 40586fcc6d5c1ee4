"""safetensors reading and writing with `CheckpointError` messages (never torch.load/pickle).

The header is parsed here before safetensors sees the file, so a truncated download or a file
that is not safetensors at all is reported as such (with the file name) instead of as a bare
Rust error, and so readers can check shapes and dtypes without loading any tensor data.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

__all__ = ["SafetensorsHeader", "TensorInfo", "inspect_safetensors", "read_safetensors", "write_safetensors"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# A real header of a 12B model is a few MB; anything far larger is a corrupt length prefix.
_MAX_HEADER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor (no data read)."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def inspect_safetensors(path: str | os.PathLike) -> SafetensorsHeader:
    """Parses and validates the header of a safetensors file without reading tensor data.

    Raises CheckpointError when the file is missing, not safetensors, truncated (a tensor's byte
    range runs past the end of the file), or its header JSON is malformed.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"not a safetensors file: {size} bytes, shorter than the 8-byte header length", file=path
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or header_len > size - 8:
                raise CheckpointError(
                    f"not a safetensors file or truncated: header length {header_len} bytes but the file has "
                    f"{size - 8} bytes after the length prefix",
                    file=path,
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read file: {e.strerror or e}", file=path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not a safetensors file: header is not valid JSON ({e})", file=path) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"not a safetensors file: header is a JSON {type(header).__name__}, not an object", file=path
        )

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("header __metadata__ must map strings to strings", file=path, key="__metadata__")

    data_size = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"malformed header entry {entry!r}", file=path, key=key) from None
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"unsupported safetensors dtype {dtype_name!r}", file=path, key=key)
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(
                f"header byte range [{begin}, {end}) does not hold {list(shape)} {dtype_name}", file=path, key=key
            )
        if end > data_size:
            raise CheckpointError(
                f"truncated file: tensor bytes [{begin}, {end}) run past the {data_size} data bytes present",
                file=path,
                key=key,
            )
        tensors[key] = TensorInfo(dtype=dtype, shape=shape)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=dict(metadata))


def read_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Loads every tensor and the string metadata of a safetensors file.

    Returns (tensors by key, metadata). Raises CheckpointError for anything unreadable.
    """
    header = inspect_safetensors(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot load safetensors data: {e}", file=path) from e
    return tensors, header.metadata


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Writes tensors (+ string metadata) atomically: a temporary file in the same folder is
    renamed over `path` only once fully written, so a crash never leaves a truncated checkpoint.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    prepared: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage (e.g. smooth written again as smooth_orig).
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        prepared[key] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(prepared, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

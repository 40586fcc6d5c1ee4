"""Checkpoint formats: packing of the SVDQuant byte layouts, official checkpoints (read all
generations, write them for tests and conversion), our diffusers `nunchaku_lite` checkpoints,
safetensors I/O and Hub path resolution. Safetensors only, never pickle."""

from .errors import CheckpointError
from .lite import LITE_CONFIG, LITE_WEIGHTS, LiteCheckpoint, load_lite, save_lite
from .official import (
    Generation,
    OfficialCheckpoint,
    adanorm_splits_for,
    is_unsigned_act_layer,
    read_official,
    write_official,
    write_two_file,
    write_v01,
    write_v1,
)
from .resolve import parse_hub_path, resolve_checkpoint
from .safetensors_io import SafetensorsHeader, TensorInfo, inspect_safetensors, read_safetensors, write_safetensors

__all__ = [
    "CheckpointError",
    "Generation",
    "LITE_CONFIG",
    "LITE_WEIGHTS",
    "LiteCheckpoint",
    "OfficialCheckpoint",
    "SafetensorsHeader",
    "TensorInfo",
    "adanorm_splits_for",
    "inspect_safetensors",
    "is_unsigned_act_layer",
    "load_lite",
    "parse_hub_path",
    "read_official",
    "read_safetensors",
    "resolve_checkpoint",
    "save_lite",
    "write_official",
    "write_safetensors",
    "write_two_file",
    "write_v01",
    "write_v1",
]

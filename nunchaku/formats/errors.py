"""The one exception type of checkpoint reading."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import torch


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be read as the format it claims (or seems) to be.

    The message always starts with the file and, when one is involved, the key, so a user can
    find the offending tensor without a debugger. `file` and `key` are kept as attributes.
    """

    def __init__(self, message: str, *, file: str | PathLike | None = None, key: str | None = None):
        self.file = None if file is None else str(file)
        self.key = key
        self.detail = message
        where = []
        if self.file is not None:
            where.append(self.file)
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(": ".join([*where, message]))


def describe(shape: Sequence[int] | None, dtype: torch.dtype | str | None) -> str:
    """'[4, 256] bfloat16' — the form every shape/dtype mismatch message uses."""
    parts = []
    if shape is not None:
        parts.append("[" + ", ".join(str(s) if isinstance(s, str) else str(int(s)) for s in shape) + "]")
    if dtype is not None:
        parts.append(str(dtype).removeprefix("torch."))
    return " ".join(parts)


def mismatch(
    file,
    key: str,
    expected_shape: Sequence[int] | None,
    expected_dtype,
    found_shape: Sequence[int] | None,
    found_dtype,
    why: str = "",
) -> CheckpointError:
    """A CheckpointError for a tensor whose shape or dtype is not the expected one."""
    msg = f"expected {describe(expected_shape, expected_dtype)}, found {describe(found_shape, found_dtype)}"
    if why:
        msg += f" ({why})"
    return CheckpointError(msg, file=file, key=key)

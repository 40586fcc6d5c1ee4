"""Loading the optional CUDA extension ``nunchaku._C`` and registering the fakes of its ops.

``torch.library.register_fake`` needs the op to exist, and the ops exist only once
``nunchaku._C`` is loaded; so each wrapper module records its fakes with :func:`fake_for`, and
:func:`load_extension` registers them all right after the import.
"""

from __future__ import annotations

import torch

_LOADED = False
_PENDING_FAKES: list[tuple[str, object]] = []


def fake_for(qualname: str):
    """Decorator: `fn` becomes the fake of op `qualname` once the extension is loaded."""

    def record(fn):
        _PENDING_FAKES.append((qualname, fn))
        return fn

    return record


def load_extension() -> None:
    """Import nunchaku._C (which registers torch.ops.nunchaku.*) and the fakes, once."""
    global _LOADED
    if _LOADED:
        return
    try:
        import nunchaku._C  # noqa: F401  (registers torch.ops.nunchaku.*)
    except ImportError as exc:
        raise RuntimeError(
            "nunchaku._C is not built: the W4A4 kernels need the CUDA extension (pip install "
            "--no-build-isolation -e . on a machine with nvcc >= 12.3, or `python benchmarks/build_ext.py`); "
            f"the reference path (nunchaku.ops.reference) needs none. Import error: {exc}"
        ) from exc
    for qualname, fn in _PENDING_FAKES:
        torch.library.register_fake(qualname)(fn)
    _LOADED = True


def extension_available() -> bool:
    """True when nunchaku._C imports (the ops are registered); never touches the GPU."""
    try:
        load_extension()
    except RuntimeError:
        return False
    return True

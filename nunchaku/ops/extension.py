"""Loading the optional CUDA extension ``nunchaku._C`` and registering the fakes of its ops.

``torch.library.register_fake`` needs the op to exist, and the ops exist only once
``nunchaku._C`` is loaded; so each wrapper module records its fakes with :func:`fake_for`, and
:func:`load_extension` registers them all right after the import.
"""

from __future__ import annotations

import torch

from .sm90_layout import GROUP, scale_rows_padded, with_aligned_rows

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


def run_quantize_act(op_name: str, x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor,
                     act_unsigned: bool, codes_per_byte: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allocates the outputs of a W4A4 quantize op (torch.ops.nunchaku.<op_name>:
    w4a4_quantize_act_sm90 writes one code per byte, _sm80 two; same schema otherwise) and runs it
    on x [M, K]."""
    load_extension()
    op = getattr(torch.ops.nunchaku, op_name)
    x = with_aligned_rows(x)
    m, k = x.shape
    act_codes = torch.empty((m, k // codes_per_byte), dtype=torch.uint8, device=x.device)
    act_scales = torch.empty((k // GROUP, scale_rows_padded(m)), dtype=torch.float32, device=x.device)
    lora_act = torch.empty((m, lora_down.shape[1]), dtype=torch.float32, device=x.device)
    op(x, smooth, lora_down, act_unsigned, act_codes, act_scales, lora_act)
    return act_codes, act_scales, lora_act


def quantize_act_fake(codes_per_byte: int):
    """The fake of a W4A4 quantize op writing `codes_per_byte` codes per byte."""

    def fake(x, smooth, lora_down, act_unsigned, act_codes, act_scales, lora_act) -> None:
        torch._check(x.dim() == 2 and x.shape[1] % GROUP == 0)
        torch._check(act_codes.shape[0] == x.shape[0] and act_codes.shape[1] * codes_per_byte == x.shape[1])
        torch._check(lora_act.shape[0] == x.shape[0] and lora_act.shape[1] == lora_down.shape[1])

    return fake

"""Fixtures that skip a GPU test, saying why, where its kernels cannot run. A module opts in with
``pytestmark = pytest.mark.usefixtures("needs_sm90")`` (or ``needs_sm80_kernels``, ``needs_cuda``)."""

import pytest
import torch

SM90_REASON = "needs an sm_90 GPU (H100/H200) and the built nunchaku._C extension"
SM80_REASON = ("needs an sm_80..sm_90 GPU (A100/RTX 30xx/40xx, or an H100 in emulation) and the built "
               "nunchaku._C extension")


def _extension_built() -> bool:
    from nunchaku.ops.extension import extension_available

    return extension_available()


@pytest.fixture
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible)")


@pytest.fixture
def needs_sm90():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or not _extension_built():
        pytest.skip(SM90_REASON)


@pytest.fixture
def needs_sm80_kernels():
    if not torch.cuda.is_available() or not (8, 0) <= torch.cuda.get_device_capability() <= (9, 0):
        pytest.skip(SM80_REASON)
    if not _extension_built():
        pytest.skip(SM80_REASON)


# The sm_90 GEMM's two tiles, tokens x channels (the op picks one per call; NUNCHAKU_SM90_GEMM_TILE
# forces it).
SM90_GEMM_TILES = {"192x128": (192, 128), "128x192": (128, 192)}


@pytest.fixture(params=list(SM90_GEMM_TILES))
def gemm_tile(request, monkeypatch):
    """Runs the test once with each sm_90 GEMM tile forced; yields (tokens, channels) of the tile."""
    monkeypatch.setenv("NUNCHAKU_SM90_GEMM_TILE", request.param)
    return SM90_GEMM_TILES[request.param]

import pytest
import torch

SKIP_REASON = "needs an sm_90 GPU (H100/H200) and the built nunchaku._C extension"


@pytest.fixture(autouse=True)
def _needs_sm90():
    """Every test here runs the Hopper kernels; elsewhere they skip, saying why."""
    from nunchaku.ops import sm90

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(SKIP_REASON)
    if not sm90.extension_available():
        pytest.skip(SKIP_REASON)

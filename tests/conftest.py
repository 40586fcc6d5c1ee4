from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repo with the team's shared/ folder beside it; the vectors are not copied in.
SHARED_TESTDATA = REPO_ROOT.parent / "shared" / "testdata"


@pytest.fixture
def shared_testdata() -> Path:
    if not SHARED_TESTDATA.is_dir():
        pytest.skip(f"shared test vectors not found at {SHARED_TESTDATA} (../shared is absent beside the clone)")
    return SHARED_TESTDATA


@pytest.fixture(autouse=True)
def _seeded():
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny-tensor tests: on 2-core CI runners OpenMP's spinning workers make
    every small elementwise op cost milliseconds (the formats suite: 30 s instead of 8 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def browser():
    """A fresh headless Chromium per test (tests/browser_helpers.py); the app fixture that comes
    first in the test's arguments skips the test where no browser is installed."""
    from browser_helpers import chromium

    with chromium() as driver:
        yield driver

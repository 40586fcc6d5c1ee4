import pytest
import torch
from torch import nn

from nunchaku.config import GELU_SHIFT
from nunchaku.quant.calibration import CalibrationCollector, ReservoirStats


def test_streaming_statistics_match_full_batch_statistics():
    acc = ReservoirStats(max_samples=64, sample_dtype=torch.float32, sample_device="cpu", seed=0)
    chunks = [torch.randn(3, 7, 32) * (i + 1) for i in range(5)]
    for c in chunks:
        acc.update(c)
    full = torch.cat([c.reshape(-1, 32) for c in chunks])
    s = acc.stats
    assert s.count == full.shape[0]
    torch.testing.assert_close(s.max, full.amax(0))
    torch.testing.assert_close(s.min, full.amin(0))
    torch.testing.assert_close(s.sq_mean(), full.pow(2).mean(0))
    torch.testing.assert_close(s.absmax(), full.abs().amax(0))
    torch.testing.assert_close(s.absmax(shifted=True), (full + GELU_SHIFT).abs().amax(0))
    assert s.sample.shape == (64, 32)
    # Every sampled row is a real input row.
    assert (s.sample[:, None, :] == full[None]).all(-1).any(1).all()


def test_reservoir_is_bounded_and_uniform():
    acc = ReservoirStats(max_samples=100, sample_dtype=torch.float32, sample_device="cpu", seed=1)
    n = 20000
    rows = torch.arange(n, dtype=torch.float32)[:, None].expand(n, 2)
    for chunk in rows.split(777):
        acc.update(chunk)
    picked = acc.stats.sample[:, 0]
    assert acc.stats.sample.shape == (100, 2)
    assert len(picked.unique()) == 100
    # A uniform sample of 0..n-1 has mean ≈ n/2 (std of the mean ≈ n/sqrt(12*100) ≈ 577).
    assert abs(picked.mean().item() - n / 2) < 4 * 577
    # Later chunks are represented, not just the first rows.
    assert (picked > n / 2).sum() > 20


def test_collector_hooks_the_named_linears_and_detaches():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    with CalibrationCollector(model, ["0", "2"], max_samples=8) as calib:
        x = torch.randn(4, 16)
        model(x)
        model(x * 2)
    stats = calib.stats()
    torch.testing.assert_close(stats["0"].max, (x * 2).amax(0).clamp(min=x.amax(0)))
    assert stats["2"].count == 8 and stats["2"].sample.shape == (8, 32)
    model(torch.randn(4, 16))
    assert stats["0"].count == 8  # hooks are gone after the with-block


def test_collector_errors_are_named():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(KeyError, match="'missing' is not a module"):
        CalibrationCollector(model, ["missing"])
    with CalibrationCollector(model, ["0"]) as calib:
        pass
    with pytest.raises(RuntimeError, match="saw no input"):
        calib.stats()

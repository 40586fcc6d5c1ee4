
import pytest
import torch
from torch import nn

from nunchaku.nn import AWQW4A16Linear, SVDQW4A4Linear
from nunchaku.quant import quantizer as quantizer_mod
from nunchaku.quant.calibration import CalibrationCollector
from nunchaku.quant.quantizer import (
    QuantizationError,
    QuantizerOptions,
    QuantPlan,
    W4A4Group,
    W4A16Target,
    format_report,
    quantize_model,
)
from nunchaku.quant.svdquant import DecomposeOptions


class TinyBlock(nn.Module):
    """q/k/v on one input, an MLP whose fc2 reads GELU output, a modulation linear."""

    def __init__(self, d=128, hidden=256):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, d) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.mod = nn.Linear(d, 2 * d)

    def forward(self, x, temb):
        shift, scale = self.mod(nn.functional.silu(temb)).chunk(2, -1)
        x = x * (1 + scale[:, None]) + shift[:, None]
        attn = self.to_q(x) * torch.sigmoid(self.to_k(x)) + self.to_v(x)
        return attn + self.fc2(nn.functional.gelu(self.fc1(attn)))


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([TinyBlock(), TinyBlock()])

    def forward(self, x, temb):
        for b in self.blocks:
            x = b(x, temb)
        return x


def make_plan(model):
    groups, targets = [], []
    for i in range(len(model.blocks)):
        p = f"blocks.{i}"
        groups += [
            W4A4Group(f"{p}.qkv", (f"{p}.to_q", f"{p}.to_k", f"{p}.to_v"), block=p),
            W4A4Group(f"{p}.fc1", (f"{p}.fc1",), block=p),
            W4A4Group(f"{p}.fc2", (f"{p}.fc2",), act_unsigned=True, block=p),
        ]
        targets.append(W4A16Target(f"{p}.mod", block=p))
    return QuantPlan(tuple(groups), tuple(targets))


def inputs(n=4):
    x = torch.randn(n, 16, 128)
    x[..., :4] *= 20  # outlier channels
    return x, torch.randn(n, 128)


def calibrate(model, plan):
    with CalibrationCollector(model, plan.calibration_targets(), max_samples=128, sample_dtype=torch.float32) as c:
        for _ in range(3):
            model(*inputs())
    return c.stats()


OPTS = QuantizerOptions(decompose=DecomposeOptions(rank=16, storage_dtype=torch.float32), alphas=(0.2, 0.5, 0.8))


def test_quantize_model_produces_layers_close_to_the_originals():
    torch.manual_seed(0)
    model = TinyModel()
    plan = make_plan(model)
    stats = calibrate(model, plan)
    result = quantize_model(model, plan, stats, OPTS, progress=False)
    assert set(result.w4a4) == {g.name for g in plan.w4a4}
    assert set(result.w4a16) == {t.name for t in plan.w4a16}
    qkv = result.w4a4["blocks.0.qkv"]
    assert (qkv.out_features, qkv.in_features, qkv.rank) == (384, 128, 16)
    assert result.w4a4["blocks.1.fc2"].act_unsigned and not qkv.act_unsigned
    assert all(r.sqnr_db > 15 for r in result.reports), format_report(result.reports)
    text = format_report(result.reports)
    assert "blocks.0.qkv" in text and "w4a16" in text

    # The fused q/k/v layer computes all three projections of one input (from the calibration
    # distribution, which has the outlier channels the smoothing was fitted to).
    x = stats["blocks.0.to_q"].sample[:32]
    layer = SVDQW4A4Linear.from_weights(qkv, dtype=torch.float32)
    b0 = model.blocks[0]
    ref = torch.cat([b0.to_q(x), b0.to_k(x), b0.to_v(x)], -1)
    y = layer(x)
    rel = (y - ref).norm() / ref.norm()
    assert rel < 0.1
    mod = AWQW4A16Linear.from_weights(result.w4a16["blocks.0.mod"], dtype=torch.float32)
    t = stats["blocks.0.mod"].sample[:32]
    assert ((mod(t) - b0.mod(t)).norm() / b0.mod(t).norm()) < 0.1


def test_restart_resumes_from_finished_blocks(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyModel()
    plan = make_plan(model)
    stats = calibrate(model, plan)
    first = quantize_model(model, plan, stats, OPTS, work_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("block-*.safetensors"))) == 2

    def boom(*a, **k):
        raise AssertionError("a cached block was recomputed")

    monkeypatch.setattr(quantizer_mod, "_quantize_group", boom)
    monkeypatch.setattr(quantizer_mod, "_quantize_w4a16", boom)
    second = quantize_model(model, plan, stats, OPTS, work_dir=tmp_path, progress=False)
    for name, layer in first.w4a4.items():
        assert torch.equal(layer.qweight, second.w4a4[name].qweight)
        assert torch.equal(layer.lora_up, second.w4a4[name].lora_up)
        assert layer.act_unsigned == second.w4a4[name].act_unsigned
    assert [r.name for r in first.reports] == [r.name for r in second.reports]

    # Other options -> the cache is not trusted and the work is redone.
    other = QuantizerOptions(decompose=DecomposeOptions(rank=32, storage_dtype=torch.float32), alphas=(0.5,))
    with pytest.raises(AssertionError, match="recomputed"):
        quantize_model(model, plan, stats, other, work_dir=tmp_path, progress=False)


def test_partial_cache_after_a_crash(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyModel()
    plan = make_plan(model)
    stats = calibrate(model, plan)
    real = quantizer_mod._quantize_group
    calls = []

    def crash_in_block_1(modules, group, *a):
        if group.block == "blocks.1":
            raise RuntimeError("simulated crash")
        calls.append(group.name)
        return real(modules, group, *a)

    monkeypatch.setattr(quantizer_mod, "_quantize_group", crash_in_block_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        quantize_model(model, plan, stats, OPTS, work_dir=tmp_path, progress=False)
    monkeypatch.setattr(quantizer_mod, "_quantize_group", lambda m, g, *a: (calls.append(g.name), real(m, g, *a))[1])
    calls.clear()
    result = quantize_model(model, plan, stats, OPTS, work_dir=tmp_path, progress=False)
    assert all(c.startswith("blocks.1") for c in calls) and calls
    assert len(result.w4a4) == 6


def test_out_of_memory_gets_a_clear_error(monkeypatch):
    model = TinyModel()
    plan = make_plan(model)
    stats = calibrate(model, plan)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(quantizer_mod, "search_smoothing", oom)
    with pytest.raises(QuantizationError, match=r"out of memory while quantizing 'blocks.0.qkv'.*--device"):
        quantize_model(model, plan, stats, OPTS, progress=False)


def test_plan_errors_are_named():
    model = TinyModel()
    plan = make_plan(model)
    with pytest.raises(QuantizationError, match="no calibration statistics"):
        quantize_model(model, plan, {}, OPTS, progress=False)
    bad = QuantPlan((W4A4Group("x", ("blocks.0",)),))
    stats = {"blocks.0": calibrate(model, plan)["blocks.0.to_q"]}
    with pytest.raises(QuantizationError, match="'blocks.0' is not an nn.Linear"):
        quantize_model(model, bad, stats, OPTS, progress=False)

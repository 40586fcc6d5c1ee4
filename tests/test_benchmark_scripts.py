"""The FLUX benchmark scripts' --small smoke modes on the CPU (reference path): they parse their
flags, quantize, time and write their JSON. The figures themselves come from the H100
(benchmarks/RESULTS.md); here only the scripts' plumbing is checked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flux_step_small(tmp_path):
    reports = {}
    for signed_post_gelu in (False, True):
        out = tmp_path / f"step_{signed_post_gelu}.json"
        argv = ["--small", "--device", "cpu", "--variants", "bf16", "int4", "int4-pow2", "--repeats", "1",
                "--warmup", "0", "--calib-inputs", "1", "--alphas", "0.5", "--json", str(out)]
        assert load_script("flux_step").main(argv + (["--signed-post-gelu"] if signed_post_gelu else [])) == 0
        reports[signed_post_gelu] = report = json.loads(out.read_text())
        assert report["signed_post_gelu"] is signed_post_gelu
        assert [row["variant"] for row in report["rows"]] == ["bf16", "int4", "int4-pow2"]
        assert all(row["step_ms"] > 0 for row in report["rows"])
        assert 0 < report["int4"]["output_rel_err"] < 0.5
        # pow2 runs on the reference path here; its errors are measured on the same weights
        assert 0 < report["int4"]["pow2_output_rel_err"] < 0.5
        assert len(report["int4"]["pow2_block_rel_err"]) == len(report["int4"]["block_rel_err"])
    # The flag reaches the quantization: the post-GELU layers' activations are quantized otherwise.
    assert reports[True]["int4"]["output_rel_err"] != reports[False]["int4"]["output_rel_err"]


def test_pipeline_small(tmp_path):
    out = tmp_path / "pipe.json"
    argv = ["--small", "--device", "cpu", "--size", "128", "--steps", "2", "--variants", "bf16", "int4",
            "--repeats", "1", "--warmup", "0", "--signed-post-gelu", "--breakdown", "--json", str(out)]
    pipeline = load_script("pipeline")
    assert pipeline.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["signed_post_gelu"] is True
    assert [row["variant"] for row in report["rows"]] == ["bf16", "int4"]
    assert all(row["latency_s"] > 0 for row in report["rows"])
    for row in report["rows"]:
        stages = row["stages_s"]
        assert set(stages) == {"text encoders", "VAE decode", "to PIL", "denoising and the rest"}
        # Each wrapped stage ran (a positive time) and the stages fit inside the call.
        assert all(stages[label] > 0 for label in ("text encoders", "VAE decode", "to PIL"))
        assert stages["denoising and the rest"] > 0

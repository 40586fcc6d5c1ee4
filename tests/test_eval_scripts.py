"""The evaluation scripts of app/t2i on the embedded demo model: generate (INT4 and BF16), evaluate
one against the other and against the prompts, latency in both modes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
PROMPTS = ["a red circle", "a large green star at the top left", "two blue squares on a yellow background"]

pytestmark = pytest.mark.skipif(not (DEMO / "svdq-int4").is_dir(), reason="the demo model is not in assets/demo")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"t2i_{name}", ROOT / "app" / "t2i" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    generate = _script("generate")
    for precision in ("int4", "bf16"):
        assert generate.main(["-m", "demo", "-p", precision, "--prompts", str(root / "prompts.txt"),
                              "--out", str(root / precision), "--steps", "8", "--device", "cpu"]) == 0
    return root


def test_generate_writes_one_image_per_prompt_and_the_prompts(generated):
    from PIL import Image

    for precision in ("int4", "bf16"):
        out = generated / precision
        assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
        assert Image.open(out / "00001.png").size == (128, 128)
        assert json.loads((out / "prompts.json").read_text()) == {f"{i:05d}": p for i, p in enumerate(PROMPTS)}
        assert json.loads((out / "settings.json").read_text())["precision"] == precision


def test_evaluate_reports_numbers_and_says_why_for_the_rest(generated, capsys):
    evaluate = _script("evaluate")
    out_json = generated / "metrics.json"
    assert evaluate.main([str(generated / "int4"), "--reference", str(generated / "bf16"), "--json",
                          str(out_json)]) == 0
    text = capsys.readouterr().out
    results = {r["name"]: r for r in json.loads(out_json.read_text())}
    assert 15 < results["PSNR (dB)"]["value"] < 60, text  # INT4 close to, but not equal to, BF16
    assert 0.5 < results["SSIM"]["value"] <= 1.0
    assert 0.0 <= results["demo faithful"]["value"] <= 1.0
    for name in ("LPIPS", "FID", "CLIP score", "ImageReward"):
        r = results[name]
        if r["value"] is None:  # cannot run on this machine: it must say why, not print a number
            assert r["reason"] and re.search(rf"^{re.escape(name)}\s+not computed: \S", text, re.M), text


def test_evaluate_refuses_unpaired_folders(generated, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "other.png")
    with pytest.raises(SystemExit, match="no image names in common"):
        _script("evaluate").main([str(generated / "int4"), "--reference", str(tmp_path)])


@pytest.mark.parametrize("mode", ["end2end", "step"])
def test_latency_reports_median_for_each_precision(mode, capsys):
    latency = _script("latency")
    assert latency.main(["-m", "demo", "-p", "int4", "bf16", "--mode", mode, "--steps", "2", "--warmup", "1",
                         "--repeats", "2", "--device", "cpu"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("int4", "bf16"))]
    assert [r[0] for r in rows] == ["int4", "bf16"]
    assert all(float(r[1]) > 0 for r in rows)

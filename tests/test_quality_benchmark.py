import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_layers.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_layers", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_benchmark_ranks_svdquant_above_naive_and_smoothquant(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "table.md"
    results = bench.main(["--shrink", "16", "--tokens", "128", "--device", "cpu", "--markdown", str(out)])
    assert len(results) == len(bench.FLUX_LAYERS)
    for layer, rows in results.items():
        get = lambda prefix: next(v for k, v in rows.items() if k.startswith(prefix))  # noqa: E731
        naive, smooth, svdq32 = get("naive W4A4"), get("SmoothQuant W4A4"), get("SVDQuant W4A4 r=32")
        assert smooth > naive, (layer, rows)
        assert svdq32 > smooth + 2, (layer, rows)
        assert get("SVDQuant W4A4 r=64") >= get("SVDQuant W4A4 r=16") - 0.5, (layer, rows)
        # The Hopper pow2 activations quantize every group at least as finely as int4 (post-GELU
        # layers keep int4 there).
        pow2 = get("SVDQuant W4 r=32, Hopper pow2")
        if "fc2" in layer:
            assert pow2 == svdq32, (layer, rows)
        else:
            assert pow2 > svdq32, (layer, rows)
    table = out.read_text()
    assert table.startswith("| method |") and "SVDQuant W4A4 r=32" in table and "W8A8" in table

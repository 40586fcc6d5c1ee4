"""The nunchaku command, on a tiny FLUX pipeline saved to disk."""

import numpy as np
import pytest
import torch

from nunchaku.cli import main
from nunchaku.formats import Generation, load_lite, write_official
from nunchaku.models.flux_loading import layout_to_official, quantized_layers
from nunchaku.models.tiny import build_tiny_flux_pipeline
from nunchaku.pipelines import flux as nunchaku_flux

SMALL = ["--height", "64", "--width", "64", "--num-prompts", "3", "--steps", "2", "--max-samples", "64",
         "--alphas", "0.5", "--device", "cpu", "--rank", "16"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    build_tiny_flux_pipeline(torch_dtype=torch.bfloat16).save_pretrained(root / "base")
    return root


def test_quantize_writes_a_loadable_checkpoint_and_reports_layers(base, capsys):
    out = base / "int4"
    assert main(["quantize", str(base / "base"), "--out", str(out), "--work-dir", str(base / "work"), *SMALL]) == 0
    report = capsys.readouterr().out
    assert "transformer_blocks.0.attn.to_qkv" in report and "SQNR dB" in report
    ckpt = load_lite(out)
    assert ckpt.rank == 16 and ckpt.w4a4["transformer_blocks.1.ff.net.2"].act_unsigned
    assert len(list((base / "work").glob("block-*.safetensors"))) == 4
    pipe = nunchaku_flux.from_pretrained(base / "base", torch_dtype=torch.bfloat16, qmodel_path=out)
    img = pipe("a red circle", num_inference_steps=2, guidance_scale=0, height=64, width=64,
               output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_diffusers_compatible_quantizes_fc2_signed(base):
    out = base / "int4-diffusers"
    assert main(["quantize", str(base / "base"), "--out", str(out), "--diffusers-compatible", *SMALL]) == 0
    ckpt = load_lite(out)
    assert not any(w.act_unsigned for w in ckpt.w4a4.values())


def test_convert_official_to_ours(base, tmp_path):
    pipe = nunchaku_flux.from_pretrained(base / "base", torch_dtype=torch.bfloat16, qmodel_path=base / "int4")
    w4a4, w4a16, plain = layout_to_official(*quantized_layers(pipe.transformer))
    config = {k: v for k, v in dict(pipe.transformer.config).items() if not k.startswith("_")}
    official = tmp_path / "svdq-int4-tiny.safetensors"
    write_official(official, w4a4, w4a16, plain, config, generation=Generation.V1)
    assert main(["convert", str(official), "--out", str(tmp_path / "ours")]) == 0
    ckpt = load_lite(tmp_path / "ours")
    assert ckpt.w4a4["single_transformer_blocks.0.qkv_mlp"].rank == 32  # two rank-16 branches kept
    v01 = tmp_path / "v01.safetensors"
    blocks = {k: v for k, v in plain.items() if k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    write_official(v01, w4a4, w4a16, blocks, config, generation=Generation.V01)
    with pytest.raises(SystemExit, match="pass --base"):
        main(["convert", str(v01), "--out", str(tmp_path / "x")])
    assert main(["convert", str(v01), "--out", str(tmp_path / "v01-ours"), "--base", str(base / "base")]) == 0


def test_bad_arguments_are_named(base, tmp_path):
    with pytest.raises(SystemExit, match="not a local diffusers pipeline folder"):
        main(["quantize", str(tmp_path), "--out", str(tmp_path / "o"), *SMALL])
    with pytest.raises(SystemExit, match="multiple of 16"):
        main(["quantize", str(base / "base"), "--out", str(tmp_path / "o"), *SMALL[:-2], "--rank", "20"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match="holds no prompts"):
        main(["quantize", str(base / "base"), "--out", str(tmp_path / "o"), "--prompts", str(empty), *SMALL])


def test_quantize_t5_and_load_it_into_the_pipeline(base, capsys):
    out = base / "t5-w4a16.safetensors"
    assert main(["quantize-t5", str(base / "base"), "--out", str(out), "--num-prompts", "4", "--device", "cpu",
                 "--group-size", "64"]) == 0
    assert "GiB in W4A16" in capsys.readouterr().err
    pipe = nunchaku_flux.from_pretrained(base / "base", torch_dtype=torch.bfloat16, qmodel_path=base / "int4",
                                         qencoder_path=out)
    from nunchaku.nn import AWQW4A16Linear

    assert isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, AWQW4A16Linear)
    img = pipe("a red circle", num_inference_steps=2, guidance_scale=0, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    with pytest.raises(SystemExit, match="no text_encoder_2"):
        main(["quantize-t5", str(base), "--out", str(out)])

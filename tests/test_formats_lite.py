"""nunchaku_lite checkpoints: save/load round trips, config content, strictness."""

from __future__ import annotations

import json

import pytest
import torch

from nunchaku.config import Precision, QuantizationConfig
from nunchaku.formats import LITE_CONFIG, LITE_WEIGHTS, CheckpointError, load_lite, save_lite
from nunchaku.formats import packing as P
from nunchaku.formats.safetensors_io import read_safetensors, write_safetensors
from nunchaku.formats.testing import assert_w4a4_equal, assert_w4a16_equal, random_w4a4, random_w4a16, tiny_flux_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def lite_model():
    g = torch.Generator().manual_seed(3)
    config = tiny_flux_config()
    w4a4 = {
        "transformer_blocks.0.attn.to_q": random_w4a4(128, 128, 32, generator=g),
        "transformer_blocks.0.ff.net.0.proj": random_w4a4(512, 128, 32, generator=g),
        "transformer_blocks.0.ff.net.2": random_w4a4(128, 512, 32, act_unsigned=True, generator=g),
    }
    w4a16 = {
        "transformer_blocks.0.norm1.linear": random_w4a16(768, 128, generator=g),
        "single_transformer_blocks.0.norm.linear": random_w4a16(384, 128, bias=False, generator=g),
    }
    plain = {
        "transformer_blocks.0.attn.norm_q.weight": torch.randn(64).to(torch.bfloat16),
        "x_embedder.weight": torch.randn(128, 64).to(torch.bfloat16),
        "proj_out.bias": torch.randn(64),
    }
    return config, w4a4, w4a16, plain


def test_round_trip(tmp_path, lite_model):
    config, w4a4, w4a16, plain = lite_model
    folder = save_lite(tmp_path / "transformer", config, w4a4, w4a16, plain, torch.bfloat16)
    assert sorted(p.name for p in folder.iterdir()) == [LITE_CONFIG, LITE_WEIGHTS]
    ckpt = load_lite(folder)
    assert ckpt.transformer_config == config and ckpt.rank == 32 and ckpt.compute_dtype == torch.bfloat16
    for name, w in w4a4.items():
        assert_w4a4_equal(ckpt.w4a4[name], w, name)
    for name, w in w4a16.items():
        assert_w4a16_equal(ckpt.w4a16[name], w, name)
    assert sorted(ckpt.plain) == sorted(plain)
    for k, t in plain.items():
        assert ckpt.plain[k].dtype == t.dtype and torch.equal(ckpt.plain[k], t)

    qc = ckpt.quantization_config
    assert isinstance(qc, QuantizationConfig)
    assert qc.w4a4.precision is Precision.INT4 and qc.w4a4.rank == 32
    assert set(qc.w4a4.targets) == set(w4a4)
    assert qc.w4a4.unsigned_act_layers == ("transformer_blocks.0.ff.net.2",)
    assert set(qc.w4a16.targets) == set(w4a16) and qc.w4a16.group_size == 64


def test_config_and_keys(tmp_path, lite_model):
    config, w4a4, w4a16, plain = lite_model
    folder = save_lite(tmp_path / "t", config, w4a4, w4a16, plain, "float16")
    cfg = json.loads((folder / LITE_CONFIG).read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "nunchaku_lite" and qc["compute_dtype"] == "float16"
    assert qc["svdq_w4a4"] == {"precision": "int4", "group_size": 64, "rank": 32, "targets": sorted(w4a4)}
    assert qc["awq_w4a16"] == {"precision": "int4", "group_size": 64, "targets": sorted(w4a16)}
    assert qc["nunchaku"] == {"version": 1, "unsigned_act_targets": ["transformer_blocks.0.ff.net.2"]}
    assert cfg["num_attention_heads"] == config["num_attention_heads"]

    tensors, _ = read_safetensors(folder / LITE_WEIGHTS)
    m = "transformer_blocks.0.ff.net.2"
    assert {k.removeprefix(m + ".") for k in tensors if k.startswith(m + ".")} == {
        "qweight", "wscales", "bias", "smooth_factor", "proj_down", "proj_up",
    }  # fmt: skip
    assert tensors[f"{m}.qweight"].shape == (128, 256) and tensors[f"{m}.qweight"].dtype == torch.int8
    assert tensors[f"{m}.wscales"].shape == (8, 128) and tensors[f"{m}.wscales"].dtype == torch.float16
    assert tensors[f"{m}.proj_down"].shape == (512, 32)
    assert torch.equal(tensors[f"{m}.qweight"], P.pack_w4a4_qweight(w4a4[m].qweight))
    a = "transformer_blocks.0.norm1.linear"
    assert tensors[f"{a}.qweight"].shape == (192, 64) and tensors[f"{a}.qweight"].dtype == torch.int32
    assert tensors[f"{a}.wscales"].shape == (2, 768)
    # nunchaku_lite modules keep their own row order: no AdaNorm interleave and no +1
    assert torch.equal(P.unpack_awq_qweight(tensors[f"{a}.qweight"]), w4a16[a].qweight)
    assert torch.equal(tensors[f"{a}.bias"].float(), w4a16[a].bias)
    assert "single_transformer_blocks.0.norm.linear.bias" not in tensors

    ckpt = load_lite(folder)
    assert ckpt.compute_dtype == torch.float16
    assert ckpt.w4a4[m].wscales.dtype == torch.float16
    assert torch.equal(ckpt.w4a4[m].wscales.float(), w4a4[m].wscales.float())


def test_diffusers_compatible(tmp_path, lite_model):
    config, w4a4, w4a16, plain = lite_model
    with pytest.raises(ValueError, match=r"unsigned.*transformer_blocks\.0\.ff\.net\.2"):
        save_lite(tmp_path / "a", config, w4a4, w4a16, plain, diffusers_compatible=True)
    signed = {k: v for k, v in w4a4.items() if not v.act_unsigned}
    folder = save_lite(tmp_path / "b", config, signed, w4a16, plain, diffusers_compatible=True)
    qc = json.loads((folder / LITE_CONFIG).read_text())["quantization_config"]
    assert "nunchaku" not in qc
    ckpt = load_lite(folder)
    assert ckpt.quantization_config.w4a4.unsigned_act_layers == ()
    assert all(not w.act_unsigned for w in ckpt.w4a4.values())


def test_refuses_unpadded_shapes(tmp_path, lite_model):
    config, _, _, _ = lite_model
    with pytest.raises(ValueError, match="multiples of 128"):
        save_lite(tmp_path / "c", config, {"m": random_w4a4(128, 192)}, {}, {})


def test_sharded_index(tmp_path, lite_model):
    config, w4a4, w4a16, plain = lite_model
    folder = save_lite(tmp_path / "t", config, w4a4, w4a16, plain)
    tensors, _ = read_safetensors(folder / LITE_WEIGHTS)
    (folder / LITE_WEIGHTS).unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, ks in shards.items():
        write_safetensors(folder / shard, {k: tensors[k] for k in ks})
    weight_map = {k: shard for shard, ks in shards.items() for k in ks}
    (folder / f"{LITE_WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = load_lite(folder)
    for name, w in w4a4.items():
        assert_w4a4_equal(ckpt.w4a4[name], w, name)


def _rewrite_config(folder, edit):
    cfg = json.loads((folder / LITE_CONFIG).read_text())
    edit(cfg["quantization_config"])
    (folder / LITE_CONFIG).write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (
            lambda qc: qc.update(quant_method="bitsandbytes"),
            r"quant_method.*expected 'nunchaku_lite', found 'bitsandbytes'",
        ),
        (lambda qc: qc["svdq_w4a4"].update(precision="nvfp4"), "NVFP4 checkpoints are not supported yet"),
        (lambda qc: qc["svdq_w4a4"].update(group_size=128), r"svdq_w4a4\.group_size.*expected 64, found 128"),
        (lambda qc: qc["svdq_w4a4"].update(rank=48), r"proj_down.*expected \[128, 48\].*found \[128, 32\]"),
        (lambda qc: qc["nunchaku"].update(version=7), r"nunchaku\.version.*expected 1, found 7"),
        (lambda qc: qc["nunchaku"].update(unsigned_act_targets=["nope"]), r"not among svdq_w4a4\.targets: \['nope'\]"),
        (lambda qc: qc.update(compute_dtype="float32"), r"compute_dtype.*found 'float32'"),
        (lambda qc: qc.update(extra=1), r"unknown fields \['extra'\]"),
        (lambda qc: qc["svdq_w4a4"]["targets"].append("ghost"), r"'ghost\.qweight'.*missing key"),
        (
            lambda qc: qc["awq_w4a16"]["targets"].remove("transformer_blocks.0.norm1.linear"),
            r"norm1\.linear\.qweight.*not among the quantization_config targets",
        ),
    ],
)
def test_bad_config(tmp_path, lite_model, edit, pattern):
    config, w4a4, w4a16, plain = lite_model
    folder = save_lite(tmp_path / "t", config, w4a4, w4a16, plain)
    _rewrite_config(folder, edit)
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_lite(folder)
    assert str(folder) in str(e.value)


def test_per_layer_ranks_round_trip_through_the_extension(tmp_path, lite_model):
    config, w4a4, w4a16, plain = lite_model
    g = torch.Generator().manual_seed(5)
    w4a4 = {**w4a4, "single_transformer_blocks.0.qkv_mlp": random_w4a4(896, 128, 64, generator=g)}
    folder = save_lite(tmp_path / "t", config, w4a4, w4a16, plain)
    qc = json.loads((folder / LITE_CONFIG).read_text())["quantization_config"]
    assert qc["svdq_w4a4"]["rank"] == 32
    assert qc["nunchaku"]["rank_overrides"] == {"single_transformer_blocks.0.qkv_mlp": 64}
    ckpt = load_lite(folder)
    assert ckpt.w4a4["single_transformer_blocks.0.qkv_mlp"].rank == 64
    for name, w in w4a4.items():
        assert_w4a4_equal(ckpt.w4a4[name], w, name)
    signed = {k: v for k, v in w4a4.items() if not v.act_unsigned}
    with pytest.raises(ValueError, match="one rank per checkpoint.*qkv_mlp': 64"):
        save_lite(tmp_path / "d", config, signed, w4a16, plain, diffusers_compatible=True)
    qc["nunchaku"]["rank_overrides"] = {"single_transformer_blocks.0.qkv_mlp": 40}
    cfg = json.loads((folder / LITE_CONFIG).read_text())
    cfg["quantization_config"] = qc
    (folder / LITE_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rank_overrides.*multiple of 16"):
        load_lite(folder)

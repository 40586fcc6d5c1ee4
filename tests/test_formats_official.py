"""Official SVDQuant INT4 checkpoints: write each generation from random logical weights, read it
back (generation auto-detected), and compare exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nunchaku.formats import (
    CheckpointError,
    Generation,
    read_official,
    write_official,
    write_two_file,
    write_v01,
    write_v1,
)
from nunchaku.formats import packing as P
from nunchaku.formats.safetensors_io import read_safetensors, write_safetensors
from nunchaku.formats.testing import (
    assert_same_model,
    random_flux_layers,
    random_w4a16,
    tiny_flux_config,
)
from nunchaku.quant.weights import W4A4Weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    config = tiny_flux_config(heads=2, head_dim=64)
    w4a4, w4a16, plain = random_flux_layers(config, rank=32, generator=torch.Generator().manual_seed(1))
    return config, w4a4, w4a16, plain


def test_layer_names_and_flags(model):
    _, w4a4, w4a16, _ = model
    assert "transformer_blocks.0.qkv_proj" in w4a4 and "single_transformer_blocks.0.mlp_fc2" in w4a4
    assert sorted(w4a16) == [
        "single_transformer_blocks.0.norm.linear",
        "transformer_blocks.0.norm1.linear",
        "transformer_blocks.0.norm1_context.linear",
    ]
    unsigned = sorted(n for n, w in w4a4.items() if w.act_unsigned)
    assert unsigned == [
        "single_transformer_blocks.0.mlp_fc2",
        "transformer_blocks.0.mlp_context_fc2",
        "transformer_blocks.0.mlp_fc2",
    ]


def test_v1_round_trip(tmp_path, model):
    config, w4a4, w4a16, plain = model
    path = write_v1(tmp_path / "svdq-int4_r32-tiny.safetensors", w4a4, w4a16, plain, config)
    ckpt = read_official(path)
    assert ckpt.generation is Generation.V1
    assert ckpt.transformer_config == config and ckpt.rank == 32 and ckpt.dtype == torch.bfloat16
    assert_same_model(ckpt, w4a4, w4a16, plain)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["model_class"] == "NunchakuFluxTransformer2dModel"
    qc = json.loads(meta["quantization_config"])
    assert qc["method"] == "svdquant" and qc["weight"] == {"dtype": "int4", "scale_dtype": None, "group_size": 64}
    assert qc["rank"] == 32
    assert "transformer_blocks.0.qkv_proj.smooth_orig" in keys


def test_two_file_round_trip(tmp_path, model):
    config, w4a4, w4a16, plain = model
    folder = write_two_file(tmp_path / "svdq-int4-tiny", w4a4, w4a16, plain, config)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "transformer_blocks.safetensors",
        "unquantized_layers.safetensors",
    ]
    unq = load_file(str(folder / "unquantized_layers.safetensors"))
    assert sorted(unq) == sorted(k for k in plain if not k.startswith(("transformer_blocks", "single_")))
    blocks = load_file(str(folder / "transformer_blocks.safetensors"))
    assert "transformer_blocks.0.norm_q.weight" in blocks and "transformer_blocks.0.out_proj.smooth_orig" in blocks
    for where in (folder, folder / "transformer_blocks.safetensors"):
        ckpt = read_official(where)
        assert ckpt.generation is Generation.TWO_FILE and ckpt.transformer_config == config
        assert_same_model(ckpt, w4a4, w4a16, plain)


def test_v01_round_trip(tmp_path, model):
    config, w4a4, w4a16, plain = model
    block_plain = {k: v for k, v in plain.items() if k.startswith(("transformer_blocks", "single_"))}
    path = write_v01(tmp_path / "svdq-int4-flux.1-tiny.safetensors", w4a4, w4a16, block_plain)
    tensors, meta = read_safetensors(path)
    assert meta == {} and not any(k.endswith("smooth_orig") for k in tensors)
    ckpt = read_official(path)
    assert ckpt.generation is Generation.V01 and ckpt.transformer_config is None
    assert_same_model(ckpt, w4a4, w4a16, block_plain)
    with pytest.raises(ValueError, match="transformer blocks only"):
        write_v01(tmp_path / "bad.safetensors", w4a4, w4a16, plain)


def test_folder_with_single_file(tmp_path, model):
    config, w4a4, w4a16, plain = model
    write_v1(tmp_path / "m" / "model.safetensors", w4a4, w4a16, plain, config)
    assert read_official(tmp_path / "m").generation is Generation.V1


def test_padded_layers_true_sizes(tmp_path):
    """inner = 192 is not a multiple of 128: packed tensors are padded (README 4.6) and the
    transformer config gives the true sizes back."""
    config = tiny_flux_config(heads=3, head_dim=64)
    w4a4, w4a16, plain = random_flux_layers(config, rank=16, generator=torch.Generator().manual_seed(2))
    path = write_v1(tmp_path / "padded.safetensors", w4a4, w4a16, plain, config)
    with safe_open(str(path), "pt") as f:
        assert f.get_slice("transformer_blocks.0.qkv_proj.qweight").get_shape() == [640, 128]
        assert f.get_slice("transformer_blocks.0.qkv_proj.wscales").get_shape() == [4, 640]
        assert f.get_slice("transformer_blocks.0.qkv_proj.smooth").get_shape() == [256]
        assert f.get_slice("single_transformer_blocks.0.mlp_fc2.lora_down").get_shape() == [768, 16]
        bias = f.get_tensor("transformer_blocks.0.qkv_proj.bias")
    assert torch.all(P.unpack_scale_vector(bias)[576:] == 1.0)
    ckpt = read_official(path)
    assert ckpt.rank == 16
    assert ckpt.w4a4["transformer_blocks.0.qkv_proj"].qweight.shape == (576, 192)
    assert_same_model(ckpt, w4a4, w4a16, plain)

    # v0.1 has no config: the caller's config gives the sizes, else the padded extents are used
    block_plain = {k: v for k, v in plain.items() if k.startswith(("transformer_blocks", "single_"))}
    v01 = write_v01(tmp_path / "padded_v01.safetensors", w4a4, w4a16, block_plain)
    assert_same_model(read_official(v01, transformer_config=config), w4a4, w4a16, block_plain)
    raw = read_official(v01)
    padded = raw.w4a4["transformer_blocks.0.qkv_proj"]
    orig = w4a4["transformer_blocks.0.qkv_proj"]
    assert padded.qweight.shape == (640, 256)
    assert torch.equal(padded.qweight[:576, :192], orig.qweight)
    assert torch.all(padded.qweight[576:] == 0) and torch.all(padded.lora_up[576:] == 0)


def test_adanorm_stored_layout(tmp_path, model):
    """The file holds interleaved rows with +1 on the scale chunks; reading restores diffusers order."""
    config, w4a4, w4a16, plain = model
    path = write_v1(tmp_path / "m.safetensors", w4a4, w4a16, plain, config)
    tensors, _ = read_safetensors(path)
    for name, splits in (("transformer_blocks.0.norm1.linear", 6), ("single_transformer_blocks.0.norm.linear", 3)):
        w = w4a16[name]
        c = w.out_features // splits
        stored_bias = tensors[f"{name}.bias"].float().reshape(c, splits)
        orig = w.bias.reshape(splits, c).T.clone()
        for s in P.ADANORM_SCALE_CHUNKS[splits]:
            orig[:, s] += 1
        assert torch.equal(stored_bias, orig)
        codes = P.unpack_awq_qweight(tensors[f"{name}.qweight"])
        assert torch.equal(codes.reshape(c, splits, -1).transpose(0, 1).reshape(w.qweight.shape), w.qweight)
        assert torch.equal(tensors[f"{name}.wscales"], P.adanorm_interleave(w.wscales, splits).T)


def test_awq_converter_padded_group_rows(tmp_path, model):
    """DeepCompressor pads AWQ scale rows to a multiple of 16 groups; readers ignore the padding."""
    config, w4a4, w4a16, plain = model
    path = write_v1(tmp_path / "m.safetensors", w4a4, w4a16, plain, config)
    tensors, meta = read_safetensors(path)
    name = "transformer_blocks.0.norm1.linear"
    for suffix in ("wscales", "wzeros"):
        t = tensors[f"{name}.{suffix}"]
        assert t.shape[0] == 2
        tensors[f"{name}.{suffix}"] = torch.cat([t, torch.zeros(14, t.shape[1], dtype=t.dtype)])
    write_safetensors(path, tensors, meta)
    assert_same_model(read_official(path), w4a4, w4a16, plain)


def test_from_shared_vectors(tmp_path, shared_testdata):
    """A checkpoint assembled from the ground-truth packed tensors reads back as the plain ones."""
    t = load_file(str(shared_testdata / "nunchaku_formats" / "w4a4_int4.safetensors"))
    a = load_file(str(shared_testdata / "nunchaku_formats" / "w4a16_awq.safetensors"))
    tensors = {}
    for suffix in ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up"):
        tensors[f"transformer_blocks.0.qkv_proj.{suffix}"] = t[f"case0.{suffix}"]
        tensors[f"transformer_blocks.0.mlp_fc2.{suffix}"] = t[f"case1.{suffix}"]
    for suffix in ("qweight", "wscales", "wzeros", "bias"):
        tensors[f"transformer_blocks.0.norm1.linear.{suffix}"] = a[f"adanorm_zero.{suffix}"]
        tensors[f"single_transformer_blocks.0.norm.linear.{suffix}"] = a[f"adanorm_single.{suffix}"]
    write_safetensors(tmp_path / "v.safetensors", tensors)
    ckpt = read_official(tmp_path / "v.safetensors")
    qkv = ckpt.w4a4["transformer_blocks.0.qkv_proj"]
    assert torch.equal(qkv.qweight, t["case0.plain.weight_int4"]) and not qkv.act_unsigned
    assert torch.equal(qkv.lora_down, t["case0.plain.lora_down"])
    fc2 = ckpt.w4a4["transformer_blocks.0.mlp_fc2"]
    assert fc2.act_unsigned
    # no config: case1's padding (K 192 -> 256) stays; the logical part is the plain tensor
    assert fc2.qweight.shape == (384, 256)
    assert torch.equal(fc2.qweight[:, :192], t["case1.plain.weight_int4"])
    norm1 = ckpt.w4a16["transformer_blocks.0.norm1.linear"]
    assert torch.equal(norm1.qweight, a["adanorm_zero.plain.weight_uint4"])
    assert torch.equal(norm1.wscales, a["adanorm_zero.plain.wscales"])
    assert torch.equal(norm1.bias.to(torch.bfloat16)[:32], a["adanorm_zero.plain.bias"][:32])


def test_writer_refuses_inconsistent_layers(tmp_path, model):
    config, w4a4, w4a16, plain = model
    bad = dict(w4a4)
    w = bad["transformer_blocks.0.mlp_fc2"]
    bad["transformer_blocks.0.mlp_fc2"] = W4A4Weights(
        w.qweight, w.wscales, w.smooth, w.lora_down, w.lora_up, w.bias, act_unsigned=False
    )
    with pytest.raises(ValueError, match="mlp_fc2.*unsigned"):
        write_v1(tmp_path / "x.safetensors", bad, w4a16, plain, config)
    with pytest.raises(ValueError, match="transformer config"):
        write_official(tmp_path / "x.safetensors", w4a4, w4a16, plain, None)
    with pytest.raises(ValueError, match="only transformer block layers"):
        write_v1(tmp_path / "x.safetensors", w4a4, {"proj_out": random_w4a16(64, 128)}, plain, config)


def test_nvfp4_detected(tmp_path, model):
    config, w4a4, w4a16, plain = model
    path = write_v1(tmp_path / "svdq-fp4.safetensors", w4a4, w4a16, plain, config)
    tensors, meta = read_safetensors(path)
    key = "transformer_blocks.0.qkv_proj.wscales"
    tensors[key] = tensors[key].float().to(torch.float8_e4m3fn)
    write_safetensors(path, tensors, {k: v for k, v in meta.items() if k != "quantization_config"})
    with pytest.raises(CheckpointError, match="NVFP4 checkpoints are not supported yet") as e:
        read_official(path)
    assert key in str(e.value) and "float8_e4m3fn" in str(e.value)

    qc = {
        "method": "svdquant",
        "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16},
        "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16},
    }
    write_safetensors(path, tensors, {**meta, "quantization_config": json.dumps(qc)})
    with pytest.raises(CheckpointError, match="NVFP4 checkpoints are not supported yet.*fp4_e2m1_all"):
        read_official(path)


def test_float16_checkpoint(tmp_path):
    config = tiny_flux_config()
    w4a4, w4a16, plain = random_flux_layers(config, rank=16, generator=torch.Generator().manual_seed(4))
    w4a4 = {k: w.to(torch.float16) for k, w in w4a4.items()}
    w4a16 = {k: w.to(torch.float16) for k, w in w4a16.items()}
    path = write_v1(tmp_path / "fp16.safetensors", w4a4, w4a16, plain, config, dtype=torch.float16)
    ckpt = read_official(path)
    assert ckpt.dtype == torch.float16 and ckpt.rank == 16
    assert_same_model(ckpt, w4a4, w4a16, plain)

"""Every way a checkpoint can be broken gives a CheckpointError naming the file, the key and
expected vs found; plus safetensors I/O and checkpoint path resolution (Hub mocked, offline)."""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from nunchaku.formats import (
    CheckpointError,
    inspect_safetensors,
    load_lite,
    read_official,
    read_safetensors,
    resolve_checkpoint,
    save_lite,
    write_safetensors,
    write_two_file,
    write_v1,
)
from nunchaku.formats.resolve import parse_hub_path
from nunchaku.formats.testing import random_flux_layers, random_w4a4, random_w4a16, tiny_flux_config

pytestmark = pytest.mark.usefixtures("one_thread")


QKV = "transformer_blocks.0.qkv_proj"


@pytest.fixture
def v1_file(tmp_path):
    config = tiny_flux_config()
    w4a4, w4a16, plain = random_flux_layers(config, rank=32, generator=torch.Generator().manual_seed(5))
    return write_v1(tmp_path / "model.safetensors", w4a4, w4a16, plain, config)


def _edit(path: Path, edit_tensors=None, edit_meta=None) -> Path:
    tensors, meta = read_safetensors(path)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    write_safetensors(path, tensors, meta)
    return path


# ---------------------------------------------------------------------------------------------
# broken files


def test_truncated_file(v1_file):
    data = v1_file.read_bytes()
    v1_file.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        read_official(v1_file)
    msg = str(e.value)
    assert (
        str(v1_file) in msg
        and "key '" in msg
        and f"{len(data) - 100 - 8 - struct.unpack('<Q', data[:8])[0]} data bytes" in msg
    )


def test_truncated_header(v1_file):
    v1_file.write_bytes(v1_file.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a safetensors file or truncated: header length") as e:
        inspect_safetensors(v1_file)
    assert str(v1_file) in str(e.value)


def _header(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    "content,pattern",
    [
        (b"", "shorter than the 8-byte header length"),
        (b"PK\x03\x04 this is a zip, not safetensors" * 4, "header length"),
        (struct.pack("<Q", 10) + b"{not json}", "header is not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "header is a JSON list"),
        (
            _header({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}) + b"\0",
            "unsupported safetensors dtype",
        ),
        (
            _header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}) + b"\0" * 4,
            r"key 'w': header byte range",
        ),
        (_header({"w": {"dtype": "F32", "shape": [1]}}), r"key 'w': malformed header entry"),
    ],
)
def test_not_safetensors(tmp_path, content, pattern):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern) as e:
        read_safetensors(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_official(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------
# official checkpoints: keys and shapes


def test_missing_key(v1_file):
    _edit(v1_file, lambda t: t.pop(f"{QKV}.wscales"))
    with pytest.raises(CheckpointError) as e:
        read_official(v1_file)
    msg = str(e.value)
    assert str(v1_file) in msg and f"'{QKV}.wscales'" in msg
    assert "missing key" in msg and "[2, 384]" in msg


def test_wrong_shape(v1_file):
    _edit(v1_file, lambda t: t.__setitem__(f"{QKV}.lora_up", t[f"{QKV}.lora_up"][:, :16].contiguous()))
    with pytest.raises(CheckpointError) as e:
        read_official(v1_file)
    msg = str(e.value)
    assert f"'{QKV}.lora_up'" in msg and "expected [384, 32] bfloat16, found [384, 16] bfloat16" in msg


def test_wrong_dtype(v1_file):
    _edit(v1_file, lambda t: t.__setitem__(f"{QKV}.smooth", t[f"{QKV}.smooth"].half()))
    with pytest.raises(CheckpointError, match=r"expected \[128\] bfloat16, found \[128\] float16") as e:
        read_official(v1_file)
    assert f"'{QKV}.smooth'" in str(e.value)
    _edit(v1_file, lambda t: t.__setitem__(f"{QKV}.qweight", t[f"{QKV}.qweight"].float()))
    with pytest.raises(
        CheckpointError, match=r"expected int8 \(W4A4\) or int32 \(W4A16 AWQ\), found \[384, 64\] float32"
    ):
        read_official(v1_file)


def test_rank_mismatch_between_layers(v1_file):
    def shrink(t):
        key = "transformer_blocks.0.mlp_fc1"
        t[f"{key}.lora_down"] = t[f"{key}.lora_down"][:, :16].contiguous()
        t[f"{key}.lora_up"] = t[f"{key}.lora_up"][:, :16].contiguous()

    _edit(
        v1_file,
        shrink,
        lambda m: m.__setitem__(
            "quantization_config", json.dumps({**json.loads(m["quantization_config"]), "rank": 32})
        ),
    )
    with pytest.raises(CheckpointError, match=r"mlp_fc1\.lora_down.*expected \[128, 32\] bfloat16, found \[128, 16\]"):
        read_official(v1_file)


def test_orphaned_layer_tensors(v1_file):
    _edit(v1_file, lambda t: t.pop("transformer_blocks.0.mlp_fc1.qweight"))
    with pytest.raises(CheckpointError, match=r"missing key 'transformer_blocks\.0\.mlp_fc1\.qweight'"):
        read_official(v1_file)


def test_stray_key(v1_file):
    _edit(v1_file, lambda t: t.__setitem__(f"{QKV}.weight", torch.zeros(4)))
    with pytest.raises(CheckpointError, match="unexpected key") as e:
        read_official(v1_file)
    assert f"'{QKV}.weight'" in str(e.value) and "smooth_orig" in str(e.value)
    assert QKV in read_official(v1_file, strict=False).w4a4


def test_config_size_mismatch(v1_file):
    bigger = json.dumps(tiny_flux_config(heads=3))
    _edit(v1_file, edit_meta=lambda m: m.__setitem__("config", bigger))
    with pytest.raises(CheckpointError) as e:
        read_official(v1_file)
    assert re.search(
        r"key '[\w.]+\.qweight': expected \[\d+, \d+\] int(8|32), found \[\d+, \d+\] int(8|32) "
        r"\(logical \[N, K\] = \[\d+, 192\] from the model config\)",
        str(e.value),
    )


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("quantization_config", "{broken", r"__metadata__\.quantization_config.*not valid JSON"),
        (
            "quantization_config",
            json.dumps({"method": "gptq"}),
            r"expected \{'method': 'svdquant'.*found \{'method': 'gptq'",
        ),
        ("config", "[1, 2]", r"__metadata__\.config.*JSON object, found a JSON list"),
        (
            "model_class",
            "NunchakuSanaTransformer2DModel",
            r"expected 'NunchakuFluxTransformer2dModel', found 'NunchakuSana",
        ),
    ],
)
def test_bad_metadata(v1_file, key, value, pattern):
    _edit(v1_file, edit_meta=lambda m: m.__setitem__(key, value))
    with pytest.raises(CheckpointError, match=pattern) as e:
        read_official(v1_file)
    assert str(v1_file) in str(e.value)


def test_unknown_generation(tmp_path):
    path = tmp_path / "dense.safetensors"
    write_safetensors(path, {"transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8)})
    with pytest.raises(CheckpointError, match="unknown checkpoint generation") as e:
        read_official(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="unknown checkpoint generation.*2 .safetensors files"):
        write_safetensors(tmp_path / "other.safetensors", {"a": torch.zeros(1)})
        read_official(tmp_path)


def test_two_file_errors(tmp_path):
    config = tiny_flux_config()
    w4a4, w4a16, plain = random_flux_layers(config, rank=32, generator=torch.Generator().manual_seed(6))
    folder = write_two_file(tmp_path / "m", w4a4, w4a16, plain, config)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: config is not readable JSON"):
        read_official(folder)
    (folder / "config.json").unlink()
    os.remove(folder / "unquantized_layers.safetensors")
    with pytest.raises(CheckpointError, match="without unquantized_layers.safetensors"):
        read_official(folder)


# ---------------------------------------------------------------------------------------------
# nunchaku_lite strictness


@pytest.fixture
def lite_folder(tmp_path):
    g = torch.Generator().manual_seed(7)
    w4a4 = {"blocks.0.fc": random_w4a4(256, 128, 32, generator=g)}
    w4a16 = {"blocks.0.mod": random_w4a16(64, 128, generator=g)}
    return save_lite(tmp_path / "lite", tiny_flux_config(), w4a4, w4a16, {"pos": torch.zeros(3)})


def _edit_lite(folder, edit):
    return _edit(folder / "diffusion_pytorch_model.safetensors", edit)


def test_lite_missing_key(lite_folder):
    _edit_lite(lite_folder, lambda t: t.pop("blocks.0.fc.proj_up"))
    with pytest.raises(CheckpointError) as e:
        load_lite(lite_folder)
    msg = str(e.value)
    assert "diffusion_pytorch_model.safetensors" in msg and "'blocks.0.fc.proj_up'" in msg
    assert "missing key" in msg and "[256, 32]" in msg


def test_lite_wrong_shape(lite_folder):
    _edit_lite(lite_folder, lambda t: t.__setitem__("blocks.0.fc.wscales", torch.ones(3, 256, dtype=torch.bfloat16)))
    with pytest.raises(
        CheckpointError, match=r"'blocks\.0\.fc\.wscales': expected \[2, 256\] bfloat16, found \[3, 256\] bfloat16"
    ):
        load_lite(lite_folder)
    _edit_lite(lite_folder, lambda t: t.__setitem__("blocks.0.fc.wscales", torch.ones(2, 256, dtype=torch.bfloat16)))
    _edit_lite(lite_folder, lambda t: t.__setitem__("blocks.0.mod.wzeros", torch.ones(2, 60, dtype=torch.bfloat16)))
    with pytest.raises(
        CheckpointError, match=r"'blocks\.0\.mod\.wzeros': expected \[2, 64\] bfloat16, found \[2, 60\]"
    ):
        load_lite(lite_folder)


def test_lite_stray_keys(lite_folder):
    _edit_lite(lite_folder, lambda t: t.__setitem__("blocks.0.fc.smooth_factor_orig", torch.ones(128)))
    with pytest.raises(
        CheckpointError, match=r"'blocks\.0\.fc\.smooth_factor_orig': unexpected key for quantized module"
    ):
        load_lite(lite_folder)
    _edit_lite(
        lite_folder,
        lambda t: (
            t.pop("blocks.0.fc.smooth_factor_orig"),
            t.__setitem__("blocks.1.fc.qweight", torch.zeros(128, 64, dtype=torch.int8)),
        ),
    )
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.fc\.qweight'.*not among the quantization_config targets"):
        load_lite(lite_folder)
    _edit_lite(
        lite_folder, lambda t: (t.pop("blocks.1.fc.qweight"), t.__setitem__("blocks.1.fc.proj_up", torch.zeros(4)))
    )
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.fc\.proj_up'.*not among the quantization_config targets"):
        load_lite(lite_folder)


def test_lite_not_a_folder(tmp_path, lite_folder):
    with pytest.raises(CheckpointError, match="not a nunchaku_lite folder"):
        load_lite(tmp_path / "missing")
    (lite_folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is missing"):
        load_lite(lite_folder)
    (lite_folder / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="config must be a JSON object"):
        load_lite(lite_folder)


# ---------------------------------------------------------------------------------------------
# safetensors writing


def test_write_is_atomic_and_keeps_metadata(tmp_path):
    t = torch.arange(6.0)
    write_safetensors(tmp_path / "a.safetensors", {"x": t, "y": t, "z": t[2:4]}, {"k": "v"})
    tensors, meta = read_safetensors(tmp_path / "a.safetensors")
    assert meta == {"k": "v"} and torch.equal(tensors["z"], t[2:4]) and torch.equal(tensors["y"], t)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    with pytest.raises(TypeError):
        write_safetensors(tmp_path / "b.safetensors", {"x": [1, 2]})
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# ---------------------------------------------------------------------------------------------
# path resolution


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    calls = []
    snapshot = tmp_path / "snapshot"
    (snapshot / "transformer").mkdir(parents=True)

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None):
        calls.append(("file", repo_id, filename))
        if filename.startswith("missing"):
            raise FileNotFoundError(f"404: {filename}")
        path = tmp_path / "dl" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return str(path)

    def snapshot_download(repo_id, allow_patterns=None, revision=None, cache_dir=None):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(snapshot)

    module = types.ModuleType("huggingface_hub")
    module.hf_hub_download = hf_hub_download
    module.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return calls, snapshot


def test_resolve_local(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"")
    assert resolve_checkpoint(f) == f.resolve()
    assert resolve_checkpoint(str(tmp_path)) == tmp_path.resolve()


def test_resolve_hub(fake_hub):
    calls, snapshot = fake_hub
    p = resolve_checkpoint("mit-han-lab/svdquant-models/svdq-int4-flux.1-schnell.safetensors")
    assert p.name == "svdq-int4-flux.1-schnell.safetensors" and p.is_file()
    assert calls[-1] == ("file", "mit-han-lab/svdquant-models", "svdq-int4-flux.1-schnell.safetensors")
    assert resolve_checkpoint("mit-han-lab/svdq-int4-flux.1-dev") == snapshot
    assert calls[-1] == ("snapshot", "mit-han-lab/svdq-int4-flux.1-dev", ("*.safetensors", "*.json"))
    assert resolve_checkpoint("org/pipe/transformer") == snapshot / "transformer"
    assert calls[-1] == ("snapshot", "org/pipe", ("transformer/*.safetensors", "transformer/*.json"))


def test_resolve_errors(fake_hub, tmp_path):
    with pytest.raises(
        CheckpointError, match="org/repo/missing.safetensors: download from the Hugging Face Hub failed.*404"
    ):
        resolve_checkpoint("org/repo/missing.safetensors")
    with pytest.raises(
        CheckpointError, match="not found: no such local file or folder, and not a Hugging Face Hub path"
    ):
        resolve_checkpoint(str(tmp_path / "nope.safetensors"))
    for bad in ("justaname", "org/", "../org/repo", "org/re po", "-org/repo"):
        assert parse_hub_path(bad) is None, bad
        with pytest.raises(CheckpointError, match="not a Hugging Face Hub path"):
            resolve_checkpoint(bad)
    with pytest.raises(CheckpointError, match="has no folder 'nothing'"):
        resolve_checkpoint("org/pipe/nothing")


def test_resolve_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="needs huggingface_hub"):
        resolve_checkpoint("org/repo")

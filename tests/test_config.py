import json

import pytest

from nunchaku.config import CONFIG_VERSION, ConfigError, Precision, QuantizationConfig, W4A4Config, W4A16Config


def test_json_round_trip_preserves_every_field():
    cfg = QuantizationConfig(
        w4a4=W4A4Config(rank=64, targets=("a.fc1", "a.fc2"), unsigned_act_layers=("a.fc2",)),
        w4a16=W4A16Config(group_size=128, targets=("a.norm",)),
        compute_dtype="float16",
    )
    back = QuantizationConfig.from_json(cfg.to_json())
    assert back == cfg
    assert back.w4a4.precision is Precision.INT4
    assert json.loads(cfg.to_json())["version"] == CONFIG_VERSION


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 20}, "rank must be a positive multiple of 16, got 20"),
        ({"rank": 0}, "rank must be a positive multiple of 16, got 0"),
        ({"group_size": 128}, "needs group_size 64"),
        ({"precision": "nvfp4", "group_size": 64}, "needs group_size 16"),
        ({"targets": ("a",), "unsigned_act_layers": ("b",)}, "unsigned_act_layers not among targets"),
    ],
)
def test_invalid_w4a4_configs_are_refused_with_reason(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        W4A4Config(**kwargs)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="int3"):
        W4A4Config(precision="int3")


def test_w4a16_group_size_validated():
    with pytest.raises(ConfigError, match="64 or 128"):
        W4A16Config(group_size=32)


def test_overlapping_targets_refused():
    with pytest.raises(ConfigError, match=r"both W4A4 and W4A16: \['x'\]"):
        QuantizationConfig(w4a4=W4A4Config(targets=("x",)), w4a16=W4A16Config(targets=("x",)))


def test_version_mismatch_and_malformed_json_named():
    d = QuantizationConfig().to_dict()
    d["version"] = 99
    with pytest.raises(ConfigError, match="version 99 is not supported"):
        QuantizationConfig.from_dict(d)
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantizationConfig.from_json("{oops")
    with pytest.raises(ConfigError, match="unknown quantization config fields: \\['colour'\\]"):
        QuantizationConfig.from_dict({**QuantizationConfig().to_dict(), "colour": 1})
    with pytest.raises(ConfigError, match="no 'version'"):
        QuantizationConfig.from_dict({"w4a4": {}})
    with pytest.raises(ConfigError, match="malformed"):
        QuantizationConfig.from_dict({"version": 1, "w4a4": {"rnak": 32}})

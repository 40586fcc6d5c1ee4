"""Random logical weights and tiny FLUX-shaped checkpoints, for tests of the formats and of
anything that consumes checkpoints (conversion, loading). Values are exact in bfloat16, so a
write/read round trip can be checked with exact equality."""

from __future__ import annotations

import torch

from ..quant.weights import W4A4Weights, W4A16Weights
from .official import UNSIGNED_ACT_LAYERS, adanorm_splits_for, flux_layer_sizes

__all__ = [
    "assert_same_model",
    "assert_w4a4_equal",
    "assert_w4a16_equal",
    "random_flux_layers",
    "random_w4a4",
    "random_w4a16",
    "tiny_flux_config",
]


def _bf16_exact(shape, scale: float, generator, positive: bool = False) -> torch.Tensor:
    x = torch.randn(shape, generator=generator) * scale
    if positive:
        x = x.abs() + scale / 4
    return x.to(torch.bfloat16)


def random_w4a4(
    n: int,
    k: int,
    rank: int = 32,
    *,
    act_unsigned: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    generator: torch.Generator | None = None,
) -> W4A4Weights:
    """Random W4A4 INT4 weights: codes in [-8, 7], positive scales and smooth, all floats in `dtype`."""
    return W4A4Weights(
        qweight=torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8),
        wscales=_bf16_exact((n, k // 64), 0.01, generator, positive=True).to(dtype),
        smooth=_bf16_exact((k,), 1.0, generator, positive=True).to(dtype),
        lora_down=_bf16_exact((k, rank), 0.05, generator).to(dtype),
        lora_up=_bf16_exact((n, rank), 0.05, generator).to(dtype),
        bias=_bf16_exact((n,), 0.1, generator).to(dtype),
        act_unsigned=act_unsigned,
    )


def random_w4a16(
    n: int,
    k: int,
    *,
    bias: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    generator: torch.Generator | None = None,
) -> W4A16Weights:
    """Random AWQ g64 weights. The float32 bias is a multiple of 1/32 in [-2, 2], so both it and
    bias + 1 (AdaNorm, README 3.5) are exact in bfloat16 and float16."""
    return W4A16Weights(
        qweight=torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8),
        wscales=_bf16_exact((n, k // 64), 0.01, generator, positive=True).to(dtype),
        wzeros=_bf16_exact((n, k // 64), 0.05, generator).to(dtype),
        bias=(torch.randint(-64, 65, (n,), generator=generator).float() / 32) if bias else None,
    )


def tiny_flux_config(heads: int = 2, head_dim: int = 64, num_layers: int = 1, num_single_layers: int = 1) -> dict:
    """A diffusers FluxTransformer2DModel config with a small inner dimension (heads * head_dim)."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": head_dim,
        "guidance_embeds": False,
        "in_channels": 64,
        "joint_attention_dim": 64,
        "num_attention_heads": heads,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "patch_size": 1,
        "pooled_projection_dim": 32,
    }


def random_flux_layers(
    config: dict, rank: int = 32, *, generator: torch.Generator | None = None
) -> tuple[dict[str, W4A4Weights], dict[str, W4A16Weights], dict[str, torch.Tensor]]:
    """(w4a4, w4a16, plain) with the official block-level names of a FLUX model of `config`:
    the quantized layers of every block, the block norms, and a few non-block parameters."""
    sizes = flux_layer_sizes(config)
    head_dim, inner = config["attention_head_dim"], config["num_attention_heads"] * config["attention_head_dim"]
    w4a4: dict[str, W4A4Weights] = {}
    w4a16: dict[str, W4A16Weights] = {}
    plain: dict[str, torch.Tensor] = {}
    blocks = [("transformer_blocks", i) for i in range(config["num_layers"])]
    blocks += [("single_transformer_blocks", i) for i in range(config["num_single_layers"])]
    for kind, i in blocks:
        for (k, layer), (n_out, k_in) in sizes.items():
            if k != kind:
                continue
            name = f"{kind}.{i}.{layer}"
            if adanorm_splits_for(name) is not None:
                w4a16[name] = random_w4a16(n_out, k_in, generator=generator)
            else:
                w4a4[name] = random_w4a4(
                    n_out, k_in, rank, act_unsigned=layer in UNSIGNED_ACT_LAYERS, generator=generator
                )
        norms = ["norm_q", "norm_k"] + (["norm_added_q", "norm_added_k"] if kind == "transformer_blocks" else [])
        for norm in norms:
            plain[f"{kind}.{i}.{norm}.weight"] = _bf16_exact((head_dim,), 1.0, generator)
    plain["x_embedder.weight"] = _bf16_exact((inner, config["in_channels"]), 0.1, generator)
    plain["x_embedder.bias"] = _bf16_exact((inner,), 0.1, generator)
    plain["norm_out.linear.weight"] = _bf16_exact((2 * inner, inner), 0.1, generator)
    plain["proj_out.weight"] = _bf16_exact((config["in_channels"], inner), 0.1, generator)
    return w4a4, w4a16, plain


def assert_w4a4_equal(a: W4A4Weights, b: W4A4Weights, name: str = ""):
    """Exact equality of every tensor (dtype included) and flag."""
    assert (a.act_unsigned, a.group_size) == (b.act_unsigned, b.group_size), name
    for f in ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{name}.{f}"


def assert_w4a16_equal(a: W4A16Weights, b: W4A16Weights, name: str = ""):
    """Exact equality; the bias is compared by value (float32 after an AdaNorm read)."""
    for f in ("qweight", "wscales", "wzeros"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{name}.{f}"
    assert (a.bias is None) == (b.bias is None), name
    if a.bias is not None:
        assert torch.equal(a.bias.float(), b.bias.float()), f"{name}.bias"


def assert_same_model(ckpt, w4a4, w4a16, plain):
    """A read-back official checkpoint holds exactly these layers and tensors (AdaNorm biases
    come back as float32)."""
    assert sorted(ckpt.w4a4) == sorted(w4a4)
    assert sorted(ckpt.w4a16) == sorted(w4a16)
    assert sorted(ckpt.plain) == sorted(plain)
    for name, w in w4a4.items():
        assert_w4a4_equal(ckpt.w4a4[name], w, name)
    for name, w in w4a16.items():
        assert_w4a16_equal(ckpt.w4a16[name], w, name)
        assert ckpt.w4a16[name].bias.dtype == torch.float32
    for k, t in plain.items():
        assert ckpt.plain[k].dtype == t.dtype and torch.equal(ckpt.plain[k], t), k

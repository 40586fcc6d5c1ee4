"""The FLUX transformer on the engine: a diffusers FluxTransformer2DModel whose linears are
SVDQuant W4A4 (and W4A16 for the AdaLN modulation) modules.

The model is first put in the *nunchaku layout*, which computes the same function as the
diffusers original but groups the linears the way they are quantized:

double block i (`transformer_blocks.{i}.`)
    attn.to_qkv              = to_q | to_k | to_v                 (one input, one smoothing)
    attn.to_added_qkv        = add_q_proj | add_k_proj | add_v_proj
    attn.to_out.0, attn.to_add_out, ff.net.0.proj, ff_context.net.0.proj
    ff.net.2, ff_context.net.2                                     (read GELU output: unsigned)
    norm1.linear, norm1_context.linear                             (W4A16)
single block i (`single_transformer_blocks.{i}.`)
    qkv_mlp                  = attn.to_q | to_k | to_v | proj_mlp   (all read the same input)
    attn_out                 = proj_out[:, :dim]   (zero bias)
    mlp_out                  = proj_out[:, dim:]   (reads GELU output: unsigned; proj_out's bias)
    norm.linear                                                    (W4A16)

Everything else (embedders, RMSNorms of q/k, norm_out, proj_out of the model) stays 16-bit.
In the layout the fused/split modules are plain nn.Linear, so calibration hooks see exactly the
inputs the quantized modules will get; quantization then swaps each for its 4-bit module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.activations import GELU as DiffusersGELU
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle, RMSNorm
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from .. import ops
from ..nn import AWQW4A16Linear, SVDQW4A4Linear
from ..nn.utils import set_submodule
from ..ops import adaln_triton, rmsnorm_rope_triton
from ..quant.quantizer import QuantPlan, QuantResult, W4A4Group, W4A16Target
from ..quant.weights import W4A4Weights, W4A16Weights


class FluxLayoutError(ValueError):
    """The transformer or a checkpoint does not match the FLUX layout expected."""


@dataclass(frozen=True)
class QuantizedModuleSpec:
    name: str  # module path in the nunchaku layout
    kind: str  # "w4a4" | "w4a16"
    act_unsigned: bool
    block: str


def quantized_module_specs(transformer: FluxTransformer2DModel) -> list[QuantizedModuleSpec]:
    """Every module the engine quantizes, in the nunchaku layout, block by block."""
    specs = []
    for i in range(len(transformer.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        for name, unsigned in (
            ("attn.to_qkv", False), ("attn.to_added_qkv", False), ("attn.to_out.0", False),
            ("attn.to_add_out", False), ("ff.net.0.proj", False), ("ff.net.2", True),
            ("ff_context.net.0.proj", False), ("ff_context.net.2", True),
        ):
            specs.append(QuantizedModuleSpec(f"{b}.{name}", "w4a4", unsigned, b))
        for name in ("norm1.linear", "norm1_context.linear"):
            specs.append(QuantizedModuleSpec(f"{b}.{name}", "w4a16", False, b))
    for i in range(len(transformer.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        for name, unsigned in (("qkv_mlp", False), ("attn_out", False), ("mlp_out", True)):
            specs.append(QuantizedModuleSpec(f"{b}.{name}", "w4a4", unsigned, b))
        specs.append(QuantizedModuleSpec(f"{b}.norm.linear", "w4a16", False, b))
    return specs


def quant_plan(transformer: FluxTransformer2DModel, unsigned_fc2: bool = True, w4a16_group_size: int = 64) -> QuantPlan:
    """unsigned_fc2=False quantizes the post-GELU inputs signed, as diffusers' own nunchaku_lite
    runtime expects (it has no GELU shift)."""
    specs = quantized_module_specs(transformer)
    return QuantPlan(
        w4a4=tuple(W4A4Group(s.name, (s.name,), s.act_unsigned and unsigned_fc2, s.block)
                   for s in specs if s.kind == "w4a4"),
        w4a16=tuple(W4A16Target(s.name, w4a16_group_size, s.block) for s in specs if s.kind == "w4a16"),
    )


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    ref = parts[0].weight
    out = sum(p.out_features for p in parts)
    fused = nn.Linear(parts[0].in_features, out, bias=True, device=ref.device, dtype=ref.dtype)
    if ref.device.type != "meta":
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            fused.bias.copy_(torch.cat([p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0])
                                        for p in parts]))
    return fused


def _split_linear_k(linear: nn.Linear, k_split: int) -> tuple[nn.Linear, nn.Linear]:
    """proj_out [N, K1 + K2] -> (first K1 inputs, zero bias) and (last K2 inputs, the bias)."""
    w = linear.weight
    first = nn.Linear(k_split, linear.out_features, bias=True, device=w.device, dtype=w.dtype)
    second = nn.Linear(linear.in_features - k_split, linear.out_features, bias=True, device=w.device, dtype=w.dtype)
    if w.device.type != "meta":
        with torch.no_grad():
            first.weight.copy_(w[:, :k_split])
            first.bias.zero_()
            second.weight.copy_(w[:, k_split:])
            second.bias.copy_(linear.bias)
    return first, second


def _fused_kernels_apply(*tensors: torch.Tensor) -> bool:
    """Whether the fused Triton kernels may replace diffusers' elementwise code: eager inference.
    Not under NUNCHAKU_BACKEND=reference, not under torch.compile (which fuses diffusers' code by
    itself), not where gradients are needed (the fused ops have no backward)."""
    if torch.compiler.is_compiling() or ops.requested_backend() is ops.Backend.REFERENCE:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _plain_layer_norm_eps(norm: nn.Module) -> float | None:
    """eps of a LayerNorm over the last dim without affine parameters (every LayerNorm of the FLUX
    blocks), else None: the fused kernels implement only that one."""
    if type(norm) is nn.LayerNorm and norm.weight is None and norm.bias is None and len(norm.normalized_shape) == 1:
        return norm.eps
    return None


def _diffusers_modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def layer_norm_modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """diffusers' `norm(x) * (1 + scale[:, None]) + shift[:, None]`; one fused kernel in eager mode
    on CUDA (nunchaku.ops.adaln_triton, same roundings)."""
    eps = _plain_layer_norm_eps(norm)
    if (eps is not None and _fused_kernels_apply(x, shift, scale)
            and adaln_triton.fused_adaln_problem(x, shift=shift, scale=scale) is None):
        return adaln_triton.run_adaln_modulate(x, shift, scale, eps)
    return _diffusers_modulate(norm, x, shift, scale)


def gated_residual(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, out2: torch.Tensor | None = None,
                   *, clip_fp16: bool) -> torch.Tensor:
    """`residual + gate[:, None] * (out [+ out2])`, an fp16 result clipped to +-65504 if clip_fp16
    (where the FLUX blocks clip); one fused kernel in eager mode on CUDA."""
    rows = (residual, gate, out) if out2 is None else (residual, gate, out, out2)
    if (_fused_kernels_apply(*rows)
            and adaln_triton.fused_adaln_problem(residual, gate=gate, out=out, out2=out2) is None):
        return adaln_triton.run_gated_residual(residual, gate, out, out2, clip_fp16)
    return adaln_triton.reference_gated_residual(residual, gate, out, out2, clip_fp16=clip_fp16)


def gated_residual_norm_modulate(residual: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, norm: nn.Module,
                                 shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y) with h = residual + gate[:, None] * out (not clipped) and y = layer_norm_modulate(norm,
    h, shift, scale): the step between a FLUX double block's attention and its MLP, one fused kernel
    in eager mode on CUDA."""
    eps = _plain_layer_norm_eps(norm)
    if (eps is not None and _fused_kernels_apply(residual, gate, out, shift, scale)
            and adaln_triton.fused_adaln_problem(residual, gate=gate, out=out, shift=shift, scale=scale) is None):
        return adaln_triton.run_gated_residual_adaln(residual, gate, out, shift, scale, eps)
    h = adaln_triton.reference_gated_residual(residual, gate, out)
    return h, _diffusers_modulate(norm, h, shift, scale)


def ada_layer_norm_zero(norm: nn.Module, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What diffusers' AdaLayerNormZero(Single) returns for (x, emb=temb), its LayerNorm and
    modulation done by layer_norm_modulate. Any other norm module is called as it is."""
    if type(norm) not in (AdaLayerNormZero, AdaLayerNormZeroSingle) or getattr(norm, "emb", None) is not None:
        return norm(x, emb=temb)
    shift, scale, *rest = norm.linear(norm.silu(temb)).chunk(6 if type(norm) is AdaLayerNormZero else 3, dim=1)
    return (layer_norm_modulate(norm.norm, x, shift, scale), *rest)


def _gelu_fits_epilogue(linear: nn.Module, act: nn.Module) -> bool:
    """Whether `act` after `linear` can run in the linear's GEMM epilogue: a W4A4 module followed by
    torch's nn.GELU(approximate="tanh") (single blocks) or diffusers' GELU projection module with
    the same activation (the feed-forwards' net[0])."""
    return (isinstance(linear, SVDQW4A4Linear) and type(act) in (nn.GELU, DiffusersGELU)
            and act.approximate == "tanh")


def feed_forward(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' FeedForward(x); where its up-projection is a W4A4 module followed by a tanh GELU,
    the GELU runs in that GEMM's epilogue instead of as a pass of its own over the widest tensor
    of the block."""
    act = ff.net[0]
    if not _gelu_fits_epilogue(getattr(act, "proj", None), act):
        return ff(x)
    x = act.proj(x, gelu_from=0)
    for module in ff.net[1:]:
        x = module(x)
    return x


def _joined_sequence(encoder_hidden_states: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """torch.cat([encoder_hidden_states, hidden_states], dim=1), without the copy when the two are
    the text and image halves of one tensor, as the previous single block returns them (the halves
    share its memory, so it holds exactly their concatenation)."""
    base = None if torch.compiler.is_compiling() else encoder_hidden_states._base
    if (base is not None and hidden_states._base is base
            and base.dim() == 3 and base.is_contiguous()
            and encoder_hidden_states.shape[::2] == hidden_states.shape[::2]
            and base.shape == (hidden_states.shape[0], encoder_hidden_states.shape[1] + hidden_states.shape[1],
                               hidden_states.shape[2])
            and encoder_hidden_states.stride() == base.stride() == hidden_states.stride()
            and encoder_hidden_states.data_ptr() == base.data_ptr()
            and hidden_states.data_ptr() == base[:, encoder_hidden_states.shape[1]:].data_ptr()):
        return base
    return torch.cat([encoder_hidden_states, hidden_states], dim=1)


def norm_and_rotate(x: torch.Tensor, norm: nn.Module, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """`apply_rotary_emb(norm(x))` for queries or keys x [B, T, H, D] (rotary: the (cos, sin)
    tables of these T tokens, or None), written into `out` when given (e.g. its part of the joined
    text + image sequence) and returned. In eager mode on a CUDA GPU this is one fused kernel
    (nunchaku.ops.rmsnorm_rope_triton, same roundings) that writes `out` directly; elsewhere, and
    under NUNCHAKU_BACKEND=reference, torch.compile (which fuses the diffusers version itself) or
    when gradients are needed, diffusers' modules."""
    # torch.nn.RMSNorm rounds once (x * rstd * weight); diffusers' class rounds before the weight.
    round_before_weight = {torch.nn.RMSNorm: False, RMSNorm: True}.get(type(norm))
    weight = getattr(norm, "weight", None)
    if (rotary is not None and round_before_weight is not None and weight is not None
            and getattr(norm, "bias", None) is None and _fused_kernels_apply(x, weight)
            and rmsnorm_rope_triton.rmsnorm_rope_problem(x, weight, *rotary) is None
            and (out is None or rmsnorm_rope_triton.rmsnorm_rope_out_problem(x, out) is None)):
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        if out is None:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rmsnorm_rope_triton.run_rmsnorm_rope_into(x, weight, rotary[0], rotary[1], eps, round_before_weight, out)
        return out
    x = norm(x)
    result = x if rotary is None else apply_rotary_emb(x, rotary, sequence_dim=1)
    return result if out is None else out.copy_(result)


class FusedQKFluxAttnProcessor:
    """Attention processor of the double blocks in the nunchaku layout: diffusers' FluxAttnProcessor
    math on the fused q/k/v projections, with each stream's q/k RMSNorm and rotary embedding done by
    norm_and_rotate before the text and image tokens are joined (the rotary embedding is per token,
    so this equals diffusers' join-then-rotate)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))

        query, key, value = (heads(t) for t in attn.to_qkv(hidden_states).chunk(3, dim=-1))
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        rot_text = rot_image = None
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            rot_text, rot_image = (cos[:text_len], sin[:text_len]), (cos[text_len:], sin[text_len:])
        if encoder_hidden_states is None:
            query = norm_and_rotate(query, attn.norm_q, rot_image)
            key = norm_and_rotate(key, attn.norm_k, rot_image)
        else:
            e_query, e_key, e_value = (heads(t) for t in attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1))
            # Each stream's normed and rotated q / k go straight into its part of the joined
            # sequence (text first): no concatenation afterwards.
            joined_shape = (query.shape[0], text_len + query.shape[1], *query.shape[2:])
            joined_q, joined_k = (query.new_empty(joined_shape) for _ in range(2))
            norm_and_rotate(e_query, attn.norm_added_q, rot_text, out=joined_q[:, :text_len])
            norm_and_rotate(query, attn.norm_q, rot_image, out=joined_q[:, text_len:])
            norm_and_rotate(e_key, attn.norm_added_k, rot_text, out=joined_k[:, :text_len])
            norm_and_rotate(key, attn.norm_k, rot_image, out=joined_k[:, text_len:])
            query, key = joined_q, joined_k
            value = torch.cat([e_value, value], dim=1)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_out.contiguous())


class SVDQFluxSingleTransformerBlock(FluxSingleTransformerBlock):
    """A FLUX single block in the nunchaku layout (see the module docstring). Same math as the
    diffusers block; q/k/v and the MLP up-projection run as one GEMM on the shared input, and
    proj_out runs as two GEMMs whose outputs add, because its two input halves need different
    activation quantization (signed attention output, unsigned GELU output)."""

    @classmethod
    def from_block(cls, block: FluxSingleTransformerBlock) -> SVDQFluxSingleTransformerBlock:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.mlp_hidden_dim = block.mlp_hidden_dim
        new.norm = block.norm
        new.act_mlp = block.act_mlp
        attn = block.attn
        new.qkv_mlp = _fused_linear([attn.to_q, attn.to_k, attn.to_v, block.proj_mlp])
        dim = block.proj_out.out_features
        new.attn_out, new.mlp_out = _split_linear_k(block.proj_out, dim)
        for name in ("to_q", "to_k", "to_v"):
            delattr(attn, name)
        new.attn = attn  # keeps norm_q / norm_k and the head geometry
        return new

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        text_seq_len = encoder_hidden_states.shape[1]
        residual = _joined_sequence(encoder_hidden_states, hidden_states)
        norm_hidden_states, gate = ada_layer_norm_zero(self.norm, residual, temb)
        inner = self.attn.inner_dim
        widths = [3 * inner, self.mlp_hidden_dim]
        if _gelu_fits_epilogue(self.qkv_mlp, self.act_mlp):
            # The MLP half's GELU runs in the GEMM's epilogue.
            qkv, mlp_act = self.qkv_mlp(norm_hidden_states, gelu_from=3 * inner).split(widths, dim=-1)
        else:
            qkv, mlp_hidden = self.qkv_mlp(norm_hidden_states).split(widths, dim=-1)
            mlp_act = self.act_mlp(mlp_hidden)
        query, key, value = (t.unflatten(-1, (-1, self.attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        query = norm_and_rotate(query, self.attn.norm_q, image_rotary_emb)
        key = norm_and_rotate(key, self.attn.norm_k, image_rotary_emb)
        attn_output = dispatch_attention_fn(query, key, value).flatten(2, 3).to(query.dtype)
        attn_part, mlp_part = self.attn_out(attn_output), self.mlp_out(mlp_act)
        hidden_states = gated_residual(residual, gate, attn_part, mlp_part, clip_fp16=True)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


class SVDQFluxTransformerBlock(FluxTransformerBlock):
    """A FLUX double block in the nunchaku layout: diffusers' FluxTransformerBlock with the same
    submodules and math, its elementwise work (AdaLN modulation, gated residual adds, the
    LayerNorms) done by layer_norm_modulate, gated_residual_norm_modulate and gated_residual,
    which are fused kernels in eager mode on CUDA."""

    @classmethod
    def from_block(cls, block: FluxTransformerBlock) -> SVDQFluxTransformerBlock:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in block.named_children():
            setattr(new, name, child)
        return new

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada_layer_norm_zero(
            self.norm1, hidden_states, temb)
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ada_layer_norm_zero(
            self.norm1_context, encoder_hidden_states, temb)
        attention_outputs = self.attn(
            hidden_states=norm_hidden_states, encoder_hidden_states=norm_context, image_rotary_emb=image_rotary_emb,
            **(joint_attention_kwargs or {}))
        # An IP-Adapter processor returns a third output, added after the MLP (as diffusers does).
        attn_output, context_attn_output, *ip_attn_output = attention_outputs
        hidden_states, norm_hidden_states = gated_residual_norm_modulate(
            hidden_states, gate_msa, attn_output, self.norm2, shift_mlp, scale_mlp)
        hidden_states = gated_residual(hidden_states, gate_mlp, feed_forward(self.ff, norm_hidden_states),
                                       clip_fp16=False)
        if ip_attn_output:
            hidden_states = hidden_states + ip_attn_output[0]
        encoder_hidden_states, norm_context = gated_residual_norm_modulate(
            encoder_hidden_states, c_gate_msa, context_attn_output, self.norm2_context, c_shift_mlp, c_scale_mlp)
        encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_mlp,
                                               feed_forward(self.ff_context, norm_context), clip_fp16=True)
        return encoder_hidden_states, hidden_states


def _fuse_double_block(block: FluxTransformerBlock) -> None:
    attn = block.attn
    attn.to_qkv = _fused_linear([attn.to_q, attn.to_k, attn.to_v])
    attn.to_added_qkv = _fused_linear([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        delattr(attn, name)
    attn.fused_projections = True
    attn.set_processor(FusedQKFluxAttnProcessor())


def is_nunchaku_layout(transformer: FluxTransformer2DModel) -> bool:
    return getattr(transformer, "_nunchaku_layout", False)


def to_nunchaku_layout(transformer: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """Regroups the linears in place (see the module docstring); works on real and meta tensors."""
    if not isinstance(transformer, FluxTransformer2DModel):
        raise FluxLayoutError(f"expected a diffusers FluxTransformer2DModel, got {type(transformer).__name__}")
    if is_nunchaku_layout(transformer):
        return transformer
    for i, block in enumerate(transformer.transformer_blocks):
        _fuse_double_block(block)
        transformer.transformer_blocks[i] = SVDQFluxTransformerBlock.from_block(block)
    for i, block in enumerate(transformer.single_transformer_blocks):
        transformer.single_transformer_blocks[i] = SVDQFluxSingleTransformerBlock.from_block(block)
    # diffusers finds the repeated blocks (compile_repeated_blocks) and the blocks a device map must
    # not split by class name.
    block_names = [SVDQFluxTransformerBlock.__name__, SVDQFluxSingleTransformerBlock.__name__]
    transformer._repeated_blocks = [*transformer._repeated_blocks, *block_names]
    transformer._no_split_modules = [*(transformer._no_split_modules or []), *block_names]
    transformer._nunchaku_layout = True
    return transformer


def apply_quantized_modules(
    transformer: FluxTransformer2DModel,
    w4a4: dict[str, W4A4Weights],
    w4a16: dict[str, W4A16Weights],
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> FluxTransformer2DModel:
    """Swaps every quantized module of the layout for its 4-bit module built from the weights.
    Raises FluxLayoutError naming missing, unexpected or mis-shaped layers."""
    to_nunchaku_layout(transformer)
    specs = {s.name: s for s in quantized_module_specs(transformer)}
    expected_w4a4 = {n for n, s in specs.items() if s.kind == "w4a4"}
    expected_w4a16 = {n for n, s in specs.items() if s.kind == "w4a16"}
    for found, expected, kind in ((set(w4a4), expected_w4a4, "W4A4"), (set(w4a16), expected_w4a16, "W4A16")):
        if found != expected:
            missing, extra = sorted(expected - found), sorted(found - expected)
            raise FluxLayoutError(
                f"{kind} layers do not match this FLUX config ({len(transformer.transformer_blocks)} double, "
                f"{len(transformer.single_transformer_blocks)} single blocks): missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}, unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}"
            )
    for name, weights in (*w4a4.items(), *w4a16.items()):
        current = transformer.get_submodule(name)
        shape = (current.out_features, current.in_features)
        if (weights.out_features, weights.in_features) != shape:
            raise FluxLayoutError(
                f"{name}: checkpoint layer is [N={weights.out_features}, K={weights.in_features}], "
                f"the model expects [N={shape[0]}, K={shape[1]}]"
            )
        if isinstance(weights, W4A4Weights) and weights.act_unsigned and not specs[name].act_unsigned:
            raise FluxLayoutError(
                f"{name}: the checkpoint quantizes this layer's input unsigned (GELU-shifted), but its input "
                "is not a GELU output"
            )
        target = device if device is not None else weights.qweight.device
        cls = SVDQW4A4Linear if isinstance(weights, W4A4Weights) else AWQW4A16Linear
        module = cls.from_weights(weights.to(device=target), dtype=dtype)
        set_submodule(transformer, name, module)
    return transformer


def quantize_transformer_in_place(transformer: FluxTransformer2DModel, result: QuantResult) -> FluxTransformer2DModel:
    """After quantize_model(...) on a layout transformer: swap in the quantized modules."""
    ref = next(transformer.parameters())
    return apply_quantized_modules(transformer, result.w4a4, result.w4a16, ref.dtype, ref.device)


def iter_quantized_modules(transformer: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in transformer.named_modules():
        if isinstance(m, (SVDQW4A4Linear, AWQW4A16Linear)):
            yield name, m

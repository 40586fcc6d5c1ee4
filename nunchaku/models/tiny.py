"""Tiny FLUX-architecture pipelines built from configs alone (no download).

The same classes as FLUX.1 (FluxTransformer2DModel, CLIP-L and T5 encoders, AutoencoderKL,
FlowMatchEulerDiscreteScheduler) at toy sizes, with word-level tokenizers over a given
vocabulary. Used by the tests to run real loading, quantization and generation code offline,
and as the architecture of the embedded demo model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
DEFAULT_VOCAB = tuple(
    "a an the cat dog sign says hello world red green blue yellow circle square triangle star "
    "above below left right of next to on background small large two three holding".split()
)


def make_word_tokenizer(vocab: Sequence[str], model_max_length: int, add_bos: bool):
    """A lowercase whitespace word-level tokenizer (transformers PreTrainedTokenizerFast).

    Ids: <pad>=0, <unk>=1, <bos>=2, <eos>=3, then the vocabulary in order. Every sequence ends
    with <eos> (CLIP pools there; T5 expects it) and, with add_bos, starts with <bos>.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(w.lower() for w in vocab if w.lower() not in SPECIAL_TOKENS))
    ids = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(WordLevel(ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<bos> $A <eos>" if add_bos else "$A <eos>"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", ids["<bos>"]), ("<eos>", ids["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, pad_token="<pad>", unk_token="<unk>",
        bos_token="<bos>", eos_token="<eos>",
    )


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of a toy FLUX. Transformer widths are multiples of 64 so 4-bit groups apply."""

    num_layers: int = 2
    num_single_layers: int = 2
    attention_head_dim: int = 32
    num_attention_heads: int = 4  # inner dim 128
    joint_attention_dim: int = 64  # T5 d_model
    pooled_projection_dim: int = 64  # CLIP hidden size
    latent_channels: int = 4
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32, 32)  # 4 levels: 8x downsampling, as FLUX
    clip_max_length: int = 16
    t5_max_length: int = 32
    guidance_embeds: bool = False

    @property
    def axes_dims_rope(self) -> tuple[int, int, int]:
        d = self.attention_head_dim
        return (d - 2 * (3 * d // 8), 3 * d // 8, 3 * d // 8)


def build_tiny_flux_pipeline(
    config: TinyFluxConfig = TinyFluxConfig(), vocab: Sequence[str] = DEFAULT_VOCAB, seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
):
    """A diffusers FluxPipeline with random weights (deterministic for a seed)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    c = config
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * c.latent_channels, num_layers=c.num_layers,
        num_single_layers=c.num_single_layers, attention_head_dim=c.attention_head_dim,
        num_attention_heads=c.num_attention_heads, joint_attention_dim=c.joint_attention_dim,
        pooled_projection_dim=c.pooled_projection_dim, guidance_embeds=c.guidance_embeds,
        axes_dims_rope=c.axes_dims_rope,
    )
    n_vocab = len(SPECIAL_TOKENS) + len(dict.fromkeys(w.lower() for w in vocab))
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=n_vocab, hidden_size=c.pooled_projection_dim, intermediate_size=2 * c.pooled_projection_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=c.clip_max_length,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, projection_dim=c.pooled_projection_dim,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=n_vocab, d_model=c.joint_attention_dim, d_kv=16, d_ff=2 * c.joint_attention_dim,
        num_layers=2, num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=3, dropout_rate=0.0,
        decoder_start_token_id=0,
    ))
    blocks = len(c.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=c.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=c.vae_block_out_channels, layers_per_block=1, norm_num_groups=8,
        scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, text_encoder_2=t5, transformer=transformer,
        tokenizer=make_word_tokenizer(vocab, c.clip_max_length, add_bos=True),
        tokenizer_2=make_word_tokenizer(vocab, c.t5_max_length, add_bos=False),
    )
    for module in (transformer, clip, t5, vae):
        module.eval()  # constructors leave training mode on (T5's dropout would make runs random)
    return pipe.to(dtype=torch_dtype)


def tiny_config_dict(config: TinyFluxConfig) -> dict:
    return asdict(config)

"""Tiny random-weight pipelines of every model family HyperGen is tested with, built from
configs as diffusers' own pipeline tests build them (`get_dummy_components`: a layer or two,
widths of 8 to 64), saved with `save_pretrained` and loaded back through HyperGen's normal
loading path like any downloaded model.

Tokenizers are built here too, since nothing can be downloaded: a character-level CLIP
vocabulary, a character-level T5 (Unigram) model, a byte-level BPE for Qwen's tokenizer and a
character BPE for Gemma's, each wrapped in the transformers class the pipeline expects.

Families whose autoencoder is a plain `AutoencoderKL` (SD 1.5, SDXL, SD 3.5, FLUX.1, Z-Image)
get the trained pixel autoencoder (`pipelines.pixel_vae`), so their edits keep what they are
given; the others (Qwen-Image's video VAE, Sana's DC-AE, PixArt-Σ's 8× VAE) are random.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .pipelines import char_clip_tokenizer, char_t5_tokenizer, pixel_vae, save_atomically, save_tiny_pipeline

FAMILIES = ("sd", "sdxl", "sd3", "flux", "qwen-image", "z-image", "sana", "pixart-sigma")
# Models made to edit by instruction, served on /v1/images/edits with the upload as their reference.
INSTRUCTION_EDIT_FAMILIES = ("flux-kontext",)

# The token that a chat template, Qwen's prompt template and Qwen2's tokenizer expect.
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
# The words of Qwen-Image's system prompt, each one token in Qwen's vocabulary.
QWEN_IMAGE_TEMPLATE_WORDS = (
    "system", "user", "Describe", " the", " image", " by", " detailing", " color", " shape", " size", " texture",
    " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background",
)  # fmt: skip
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- tokenizers --------------------------------------------------------------------------------


_PRINTABLE_BYTES = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def _byte_order(byte: int) -> int:
    """Where GPT-2's byte-to-unicode table lists `byte`: printable bytes first, then the others."""
    return _PRINTABLE_BYTES.index(byte) if byte in _PRINTABLE_BYTES else len(_PRINTABLE_BYTES) + byte


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what byte-level BPE vocabularies
    hold), in `_byte_order`: printable bytes stand for themselves, the others for 256 + n."""
    others = [byte for byte in range(256) if byte not in _PRINTABLE_BYTES]
    return [chr(byte) for byte in _PRINTABLE_BYTES] + [chr(256 + index) for index in range(len(others))]


def byte_qwen_tokenizer(words: Sequence[str] = ()) -> Any:
    """Qwen2's tokenizer class over a byte-level vocabulary and Qwen's special tokens, with a
    ChatML chat template (Z-Image formats prompts with it). Each of `words` (as the byte-level
    pre-tokenizer cuts them: " the" with its space) gets merges that make it one token."""
    from transformers import Qwen2Tokenizer

    alphabet = _byte_level_alphabet()
    byte_symbol = dict(zip(sorted(range(256), key=lambda byte: _byte_order(byte)), alphabet))
    vocab = {token: index for index, token in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = "".join(byte_symbol[byte] for byte in word.encode())
        for end in range(2, len(symbols) + 1):
            if symbols[:end] not in vocab:
                vocab[symbols[:end]] = len(vocab)
                merges.append((symbols[: end - 1], symbols[end - 1]))
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def char_gemma_tokenizer() -> Any:
    """Gemma's tokenizer class over printable ASCII characters (sentencepiece-style word starts)."""
    from transformers import GemmaTokenizer

    chars = [chr(code) for code in range(33, 127)]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581", *chars, *("\u2581" + char for char in chars)]
    return GemmaTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[])


# --- text encoders -----------------------------------------------------------------------------


def _clip_config(vocab_size: int, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77, projection_dim=projection_dim,
    )  # fmt: skip


def _t5_encoder(vocab_size: int, width: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config)


def wide_pixel_vae(latent_channels: int = 16, shift_factor: float = 0.0609) -> Any:
    """The pixel autoencoder widened to `latent_channels` (SD 3.5, FLUX.1 and Z-Image have 16):
    its 4 trained channels come first; the others encode to 0 (with a variance of e^-30) and are
    ignored by the decoder. With a `shift_factor`, as those families decode `z / scale + shift`
    (encode and decode both apply it, so edits still keep their input)."""
    from diffusers import AutoencoderKL

    trained = pixel_vae()
    narrow = trained.config.latent_channels
    vae = AutoencoderKL.from_config({**trained.config, "latent_channels": latent_channels, "shift_factor": shift_factor})
    vae.load_state_dict(
        {key: value for key, value in trained.state_dict().items() if value.shape == vae.state_dict()[key].shape}, strict=False
    )
    with torch.no_grad():
        # Moments are [means; log-variances]: the trained channels' go to their places in the wider halves.
        moments = torch.tensor([*range(narrow), *range(latent_channels, latent_channels + narrow)])
        for conv in (vae.encoder.conv_out, vae.quant_conv, vae.post_quant_conv, vae.decoder.conv_in):
            conv.weight.zero_()
            conv.bias.zero_()
        vae.encoder.conv_out.weight[moments] = trained.encoder.conv_out.weight
        vae.encoder.conv_out.bias[moments] = trained.encoder.conv_out.bias
        vae.quant_conv.weight[moments[:, None], moments[None, :]] = trained.quant_conv.weight
        vae.quant_conv.bias[moments] = trained.quant_conv.bias
        vae.quant_conv.bias[latent_channels + narrow :] = -30.0  # the unused channels' log-variance
        vae.post_quant_conv.weight[:narrow, :narrow] = trained.post_quant_conv.weight
        vae.post_quant_conv.bias[:narrow] = trained.post_quant_conv.bias
        vae.decoder.conv_in.weight[:, :narrow] = trained.decoder.conv_in.weight
        vae.decoder.conv_in.bias.copy_(trained.decoder.conv_in.bias)
    return vae


# --- the families ------------------------------------------------------------------------------


def build_tiny_sd3(seed: int = 0) -> Any:
    """SD 3.5 layout: an MMDiT transformer, two CLIP encoders with projections and T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_3 = char_clip_tokenizer(), char_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=16,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=wide_pixel_vae(),
        text_encoder=CLIPTextModelWithProjection(_clip_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(len(tokenizer))),
        tokenizer_2=tokenizer,
        text_encoder_3=_t5_encoder(len(tokenizer_3), 64),
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> Any:
    """FLUX.1-dev layout: joint and single-stream blocks, a guidance embedding (distilled
    guidance), CLIP and T5, latents packed 2×2 into tokens. Without `guidance_embeds`: the
    FLUX.1-schnell layout (timestep-distilled, no guidance input)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = char_clip_tokenizer(), char_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds,
    )  # fmt: skip
    return FluxPipeline(
        transformer=transformer,
        vae=wide_pixel_vae(),
        text_encoder=CLIPTextModel(_clip_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(len(tokenizer_2), 32),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def build_tiny_flux_kontext(seed: int = 0) -> Any:
    """FLUX.1 Kontext: the tiny FLUX.1-dev's components (the same weights for the same seed) in
    `FluxKontextPipeline`, which edits by instruction: the reference image's latents join the
    transformer's sequence, beside the latents it denoises."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**build_tiny_flux(seed).components)


def build_tiny_qwen_image(seed: int = 0) -> Any:
    """Qwen-Image layout: a dual-stream MMDiT, Qwen2.5-VL as text encoder, a video autoencoder
    (5-D latents, per-channel `latents_mean`/`latents_std`), latents packed 2×2."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # Qwen-Image drops the first 34 tokens of its prompt template (the system prompt) after
    # encoding: as in Qwen's real vocabulary, each word of that prefix is one token here.
    tokenizer = byte_qwen_tokenizer(QWEN_IMAGE_TEMPLATE_WORDS)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    # Off-unit statistics so that a preview decoded without them would show it.
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[1.5, 0.8, 2.0, 1.2],
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer), "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|image_pad|>"),
    )  # fmt: skip
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random projections under RMS-normalized queries and keys attend almost uniformly, and the
        # random video decoder spans a quarter of the colour range: sharpened, prompts, guidance
        # and adapters show in the image as they do in the other families.
        for name, parameter in transformer.named_parameters():
            if name.rsplit(".", 2)[-2] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                parameter.mul_(4.0)
        vae.decoder.conv_out.weight.mul_(4.0)
    pipe = QwenImagePipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler()
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    if len(tokenizer(prefix).input_ids) != pipe.prompt_template_encode_start_idx:
        raise RuntimeError("Qwen-Image's prompt template changed: update QWEN_IMAGE_TEMPLATE_WORDS")
    return pipe


def build_tiny_z_image(seed: int = 0) -> Any:
    """Z-Image layout: a single-stream DiT over text and image tokens (variable-length captions
    padded per batch), Qwen3 as text encoder with a chat template."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = byte_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )  # fmt: skip
    # Initialized with torch.empty (diffusers' tests pin them too): deterministic weights instead.
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    config = Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=1024,
    )  # fmt: skip
    return ZImagePipeline(
        transformer=transformer,
        vae=wide_pixel_vae(shift_factor=0.1159),
        text_encoder=Qwen3Model(config),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def build_tiny_sana(seed: int = 0) -> Any:
    """Sana layout: a linear-attention DiT, Gemma-2 as text encoder, a 32× deep-compression
    autoencoder (six stages, as the real one: the pipeline draws at its resolution bins)."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = char_gemma_tokenizer()
    torch.manual_seed(seed)
    # sample_size 16 × the autoencoder's 32 = Sana's 512-pixel resolution bins.
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=16,
    )  # fmt: skip
    stages = 6
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock",) * (stages - 1) + ("EfficientViTBlock",),
        decoder_block_types=("ResBlock",) * (stages - 1) + ("EfficientViTBlock",),
        encoder_block_out_channels=(8,) * stages, decoder_block_out_channels=(8,) * stages,
        encoder_qkv_multiscales=((),) * (stages - 1) + ((5,),), decoder_qkv_multiscales=((),) * (stages - 1) + ((5,),),
        encoder_layers_per_block=(1,) * stages, decoder_layers_per_block=(1,) * stages,
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )  # fmt: skip
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=16, hidden_size=8, initializer_range=0.02, intermediate_size=64, max_position_embeddings=8192,
            num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer),
            pad_token_id=0, eos_token_id=1, bos_token_id=2,
        )
    )  # fmt: skip
    return SanaPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_tiny_pixart_sigma(seed: int = 0) -> Any:
    """PixArt-Σ layout: a cross-attention DiT with AdaLN-single, T5 as text encoder, an 8×
    autoencoder (sample_size 32 × 8 = its 256-pixel resolution bins)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = char_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=256,
    )  # fmt: skip
    return PixArtSigmaPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=_t5_encoder(len(tokenizer), 32),
        tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler(),
    )


FAMILY_BUILDERS: dict[str, Callable[[int], Any]] = {
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
    "flux-schnell": lambda seed: build_tiny_flux(seed, guidance_embeds=False),
    "flux-kontext": build_tiny_flux_kontext,
    "qwen-image": build_tiny_qwen_image,
    "z-image": build_tiny_z_image,
    "sana": build_tiny_sana,
    "pixart-sigma": build_tiny_pixart_sigma,
}

# hypergen.json per family: few steps, the family's kind of guidance, a 64×64 default size where
# the pipeline's own default would be larger (FLUX and Qwen-Image default to 128 latent tokens a side).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd": {"guidance_scale": 7.5},
    "sdxl": {"guidance_scale": 7.5},
    "sd3": {"guidance_scale": 7.0},
    "flux": {"guidance_scale": 3.5, "width": 64, "height": 64},
    "flux-schnell": {"guidance_scale": 1.0, "width": 64, "height": 64},
    "flux-kontext": {"guidance_scale": 2.5, "width": 64, "height": 64},
    "qwen-image": {"guidance_scale": 4.0, "width": 64, "height": 64},
    "z-image": {"guidance_scale": 4.0, "width": 64, "height": 64},
    "sana": {"guidance_scale": 4.5},
    "pixart-sigma": {"guidance_scale": 4.5},
}


def save_tiny_family(kind: str, out_dir: str | os.PathLike[str], seed: int = 0, **defaults: Any) -> Path:
    """Build the tiny pipeline of family `kind` (one of `FAMILIES`, "flux-schnell" or one of
    `INSTRUCTION_EDIT_FAMILIES`) and save it to `out_dir` with a `hypergen.json` of small defaults
    (4 steps; `defaults` override them). Written to a sibling and renamed into place, so a
    concurrent reader never sees half a model."""
    if kind not in FAMILY_DEFAULTS:
        raise ValueError(f"unknown model family '{kind}'; choose one of {', '.join(FAMILY_DEFAULTS)}")
    settings = {"num_inference_steps": 4, **FAMILY_DEFAULTS[kind], **defaults}
    if kind in ("sd", "sdxl"):
        return save_tiny_pipeline(out_dir, kind=kind, seed=seed, **settings)
    return save_atomically(FAMILY_BUILDERS[kind](seed), Path(out_dir), {"random_weights": True, "family": kind, **settings})

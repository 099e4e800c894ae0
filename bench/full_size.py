"""Full-size pipelines with random weights, built from the published configs (no download).

Random weights cost the same FLOPs as trained ones, so throughput measured on these is the
throughput of the real models. The configs below are the `config.json` files of the published
checkpoints (the keys that differ from the diffusers/transformers defaults), copied here because
these machines have no Hugging Face Hub:

- `sd15`: runwayml/stable-diffusion-v1-5 (unet, vae, text_encoder = CLIP ViT-L/14 text tower);
- `sdxl`: stabilityai/stable-diffusion-xl-base-1.0 (unet, vae, text_encoder, text_encoder_2 =
  OpenCLIP ViT-bigG/14 text tower);
- `flux`: black-forest-labs/FLUX.1-dev (transformer, vae, text_encoder = CLIP ViT-L/14,
  text_encoder_2 = T5 v1.1 XXL encoder).

Only the tokenizers differ from the real ones: character-level vocabularies written here (the
real vocabularies are downloads). Token ids stay inside the models' vocabularies and the prompts
are padded to the models' full lengths (77 for CLIP, 512 for T5), so every encoder does its real
amount of work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# One image's denoising work at the model's native size: the size, steps and guidance of the
# models' own recommended settings (FLUX.1-dev is guidance-distilled: one forward per step).
NATIVE = {
    "sd15": {"width": 512, "height": 512, "guidance_scale": 7.5},
    "sdxl": {"width": 1024, "height": 1024, "guidance_scale": 5.0},
    "flux": {"width": 1024, "height": 1024, "guidance_scale": 3.5},
}
FAMILIES = tuple(NATIVE)

CLIP_L_TEXT = {  # openai/clip-vit-large-patch14 text tower (SD 1.5, SDXL text_encoder, FLUX text_encoder)
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}
CLIP_BIGG_TEXT = {  # laion/CLIP-ViT-bigG-14 text tower (SDXL text_encoder_2, with projection)
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}
T5_XXL_ENCODER = {  # google/t5-v1_1-xxl encoder (FLUX text_encoder_2)
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "vocab_size": 32128,
    "tie_word_embeddings": False,
}
SD_VAE = {  # SD 1.5 and SDXL share the architecture; SDXL's is trained for 1024² (sample_size, scaling)
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
SD15_UNET = {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "sample_size": 64,
}
SDXL_UNET = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}
FLUX_TRANSFORMER = {
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {
    **SD_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
FLUX_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}


@contextlib.contextmanager
def creating(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New parameters are made on `device` in `dtype` directly: a 12B transformer initialised in
    fp32 first would need 48 GB, and initialising on the CPU takes minutes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _clip_text(config: dict[str, Any], with_projection: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # The character tokenizer's <|startoftext|> and <|endoftext|> are ids 0 and 1.
    text_config = CLIPTextConfig(**config, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text_config)


def build_full_size(family: str, device: str | torch.device, dtype: torch.dtype) -> Any:
    """A `family` pipeline (see FAMILIES) at full size with random weights, on `device` in `dtype`."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import T5Config, T5EncoderModel

    from hypergen.testing.pipelines import char_clip_tokenizer, char_t5_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    torch.manual_seed(0)
    # Only the modules are made under `creating`: schedulers compute their tables in float32 on the CPU.
    with creating(device, dtype):
        if family == "sd15":
            modules = {"unet": UNet2DConditionModel(**SD15_UNET), "vae": AutoencoderKL(**SD_VAE), "text_encoder": _clip_text(CLIP_L_TEXT)}
        elif family == "sdxl":
            modules = {
                "unet": UNet2DConditionModel(**SDXL_UNET),
                "vae": AutoencoderKL(**{**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}),
                "text_encoder": _clip_text(CLIP_L_TEXT),
                "text_encoder_2": _clip_text(CLIP_BIGG_TEXT, with_projection=True),
            }
        else:
            modules = {
                "transformer": FluxTransformer2DModel(**FLUX_TRANSFORMER),
                "vae": AutoencoderKL(**FLUX_VAE),
                "text_encoder": _clip_text(CLIP_L_TEXT),
                "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL_ENCODER)),
            }
    tokenizer = char_clip_tokenizer()
    if family == "sd15":
        scheduler = EulerDiscreteScheduler(**SD_SCHEDULER)
        pipe = StableDiffusionPipeline(
            **modules, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **modules, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler(**SD_SCHEDULER)
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        pipe = FluxPipeline(**modules, tokenizer=tokenizer, tokenizer_2=char_t5_tokenizer(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_inputs(family: str, batch: int, device: str | torch.device, dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments one denoising step passes the UNet/transformer for `batch` images at the
    native size (twice the batch for the UNets: classifier-free guidance runs both halves)."""
    width, height = NATIVE[family]["width"], NATIVE[family]["height"]
    with creating(device, dtype):
        if family in ("sd15", "sdxl"):
            rows = 2 * batch
            sample = torch.randn(rows, 4, height // 8, width // 8)
            context = torch.randn(rows, 77, 768 if family == "sd15" else 2048)
            kwargs: dict[str, Any] = {"encoder_hidden_states": context}
            if family == "sdxl":
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, 1280), "time_ids": torch.randn(rows, 6)}
            return (sample, torch.full((rows,), 500.0)), kwargs
        tokens = (height // 16) * (width // 16)  # 8× VAE, then 2×2 patches
        return (), {
            "hidden_states": torch.randn(batch, tokens, 64),
            "encoder_hidden_states": torch.randn(batch, 512, 4096),
            "pooled_projections": torch.randn(batch, 768),
            "timestep": torch.full((batch,), 0.5),
            "guidance": torch.full((batch,), 3.5),
            "img_ids": torch.zeros(tokens, 3),
            "txt_ids": torch.zeros(512, 3),
            "return_dict": False,
        }


def build_denoiser(family: str, device: str | torch.device, dtype: torch.dtype) -> Any:
    """Only the UNet/transformer of `family` (e.g. on the meta device, to count its FLOPs anywhere)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with creating(device, dtype):
        if family == "flux":
            return FluxTransformer2DModel(**FLUX_TRANSFORMER)
        return UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SDXL_UNET))

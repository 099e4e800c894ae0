"""Tiny diffusers pipelines built from configs (random weights, deterministic), saved with
`save_pretrained` and loaded back through HyperGen's normal loading path: what the tests, the
benchmarks' tiny runs and the CLI's `--tiny` use instead of Hub downloads."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..engine.pipelines import MODEL_DEFAULTS_FILE

logger = logging.getLogger("hypergen.testing")

# A small autoencoder trained to reconstruct images (`python -m training.pixel_vae`): with it,
# the tiny pipelines' image-to-image and inpainting keep what they are given.
PIXEL_VAE_DIR = Path(__file__).resolve().parent.parent / "assets" / "pixel-vae"


def write_char_tokenizer_files(directory: Path) -> int:
    """A character-level CLIP vocabulary (no package ships one offline). Returns its size."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(code) for code in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def _char_tokenizer(work: Path) -> tuple[Any, int]:
    from transformers import CLIPTokenizer

    vocab_size = write_char_tokenizer_files(work)
    tokenizer = CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=77)
    return tokenizer, vocab_size


def _text_config(vocab_size: int, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        **extra,
    )


def pixel_vae() -> Any:
    """The trained small autoencoder (float32), or an untrained one if the asset is missing."""
    from diffusers import AutoencoderKL

    if (PIXEL_VAE_DIR / "config.json").is_file():
        return AutoencoderKL.from_pretrained(PIXEL_VAE_DIR, dtype=torch.float32)
    logger.warning("%s is missing: the tiny pipeline gets an untrained autoencoder", PIXEL_VAE_DIR)
    return tiny_vae()


def tiny_vae() -> Any:
    """An untrained autoencoder with the tiny pipelines' layout (4× fewer pixels per latent)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _tiny_unet(**architecture: Any) -> Any:
    """A two-level UNet on 32×32 latents (64×64 images with the tiny VAE)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **architecture,
    )


def build_tiny_sd_pipeline(seed: int = 0) -> Any:
    """Stable-Diffusion-layout pipeline (UNet, VAE, one CLIP text encoder), 64×64 native."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    with tempfile.TemporaryDirectory() as work:
        tokenizer, vocab_size = _char_tokenizer(Path(work))
    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=32)
    vae = pixel_vae()
    text_encoder = CLIPTextModel(_text_config(vocab_size))
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd_inpainting_pipeline(seed: int = 0) -> Any:
    """A dedicated SD inpainting checkpoint: the UNet takes latents, mask and masked image (9 channels)."""
    from diffusers import StableDiffusionInpaintPipeline

    base = build_tiny_sd_pipeline(seed)
    config = dict(base.unet.config)
    config["in_channels"] = 9
    torch.manual_seed(seed)
    unet = type(base.unet).from_config(config)
    return StableDiffusionInpaintPipeline(
        unet=unet, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def build_tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """SDXL-layout pipeline (two text encoders, text-time conditioning), 64×64 native."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with tempfile.TemporaryDirectory() as work:
        tokenizer, vocab_size = _char_tokenizer(Path(work))
    torch.manual_seed(seed)
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids × 8 + the pooled 32-wide embedding
        cross_attention_dim=64,  # the two 32-wide text encoders concatenated
        norm_num_groups=1,
    )
    vae = pixel_vae()
    text_encoder = CLIPTextModel(_text_config(vocab_size, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, projection_dim=32))
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=_scheduler(),
    )


def char_clip_tokenizer() -> Any:
    """A character-level CLIP tokenizer (ids 0 and 1 are <|startoftext|> and <|endoftext|>)."""
    with tempfile.TemporaryDirectory() as work:
        return _char_tokenizer(Path(work))[0]


def char_t5_tokenizer() -> Any:
    """A character-level T5 tokenizer (sentencepiece-style pieces, built in memory: no download)."""
    from transformers import T5TokenizerFast

    chars = [chr(code) for code in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(char, -2.0) for char in chars] + [("\u2581" + char, -1.5) for char in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def build_tiny_flux_pipeline(seed: int = 0) -> Any:
    """FLUX.1-dev-layout pipeline (a diffusion transformer with joint and single-stream blocks, CLIP
    and T5 text encoders, flow-matching scheduler, 16 latent channels packed 2×2), 64×64 native:
    the FLUX.1 of the family matrix (`families.build_tiny_flux`)."""
    from .families import build_tiny_flux

    return build_tiny_flux(seed)


TINY_BUILDERS = {
    "sd": build_tiny_sd_pipeline,
    "sdxl": build_tiny_sdxl_pipeline,
    "flux": build_tiny_flux_pipeline,
    "sd-inpainting": build_tiny_sd_inpainting_pipeline,
}


def save_tiny_pipeline(directory: str | os.PathLike[str], kind: str = "sd", seed: int = 0, **defaults: Any) -> Path:
    """Build a tiny random-weight pipeline and save it where `from_pretrained` can load it.

    Written to a temporary sibling and renamed into place, so concurrent workers never load a
    half-written directory.
    """
    meta = {"random_weights": True, "num_inference_steps": 20, "guidance_scale": 7.5, **defaults}
    return save_atomically(TINY_BUILDERS[kind](seed), Path(directory), meta)


def save_atomically(pipe: Any, target: Path, meta: dict[str, Any]) -> Path:
    """`pipe.save_pretrained` plus a `hypergen.json` of `meta`, written to a temporary sibling and
    renamed into place (if another process got there first, its copy stays)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / MODEL_DEFAULTS_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

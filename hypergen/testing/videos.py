"""Tiny random-weight text-to-video pipelines (Wan 2.1, LTX-Video and AnimateDiff), built from configs as
diffusers' own pipeline tests build them (`get_dummy_components`), saved with `save_pretrained`
and loaded back through HyperGen's normal loading path like any downloaded model.

Text encoders are small T5s over the character-level T5 tokenizer of `pipelines` (built in
memory: nothing is downloaded). Every component has random weights: the frames are noise-like,
but shapes, frame counts, guidance, callbacks and cancellation behave as in the real models.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .families import _t5_encoder
from .pipelines import char_t5_tokenizer, save_atomically

VIDEO_FAMILIES = ("wan", "ltx", "animatediff")


def build_tiny_wan(seed: int = 0) -> Any:
    """Wan 2.1 text-to-video layout: a 3-D DiT (patches of 1×2×2), T5 as text encoder (UMT5 in
    the real model), Wan's causal video autoencoder: 4× in time, 8× in space, so frame counts
    are 4k+1 and sizes multiples of 16."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = char_t5_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16, text_dim=32,
        freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )  # fmt: skip
    return WanPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=_t5_encoder(len(tokenizer), 32).eval(),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def build_tiny_ltx(seed: int = 0) -> Any:
    """LTX-Video layout: a 3-D DiT over 1×1×1 latent patches, T5 as text encoder, LTX's video
    autoencoder. diffusers' test gives the autoencoder 4× compression in time and space; here it
    patchifies 4×4 first and scales three stages, as the real one does: 8× in time, 32× in space,
    so frame counts are 8k+1 and sizes multiples of 32 (which the pipeline requires anyway)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    tokenizer = char_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32,
    )  # fmt: skip
    # Every decoder argument given: its defaults are the real model's widths (a 237M-parameter decoder).
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=4, patch_size_t=1, encoder_causal=True,
        decoder_causal=False,
    )  # fmt: skip
    return LTXPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=_t5_encoder(len(tokenizer), 32).eval(),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def build_tiny_animatediff(seed: int = 0) -> Any:
    """AnimateDiff: the tiny SD pipeline's UNet, autoencoder and text encoder, with a
    `MotionAdapter` (temporal attention after each of the UNet's blocks); any frame count."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from .pipelines import build_tiny_sd_pipeline

    image = build_tiny_sd_pipeline(seed)
    torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=tuple(image.unet.config.block_out_channels), motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=8, motion_max_seq_length=32,
    )  # fmt: skip
    return AnimateDiffPipeline(
        vae=image.vae, text_encoder=image.text_encoder, tokenizer=image.tokenizer, unet=image.unet, motion_adapter=adapter,
        scheduler=image.scheduler,
    )  # fmt: skip


VIDEO_BUILDERS: dict[str, Callable[[int], Any]] = {"wan": build_tiny_wan, "ltx": build_tiny_ltx, "animatediff": build_tiny_animatediff}

# hypergen.json per family: few steps, the family's guidance, and a small clip where the
# pipeline's own defaults would be large (Wan: 81 frames of 832×480; LTX: 161 of 704×512).
VIDEO_DEFAULTS: dict[str, dict[str, Any]] = {
    "wan": {"guidance_scale": 5.0, "width": 32, "height": 32, "num_frames": 9, "fps": 16},
    "ltx": {"guidance_scale": 3.0, "width": 32, "height": 32, "num_frames": 9, "fps": 25},
    "animatediff": {"guidance_scale": 5.0, "width": 32, "height": 32, "num_frames": 8, "fps": 8},
}


def save_tiny_video_family(kind: str, out_dir: str | os.PathLike[str], seed: int = 0, **defaults: Any) -> Path:
    """Build the tiny video pipeline of family `kind` (one of `VIDEO_FAMILIES`) and save it to
    `out_dir` with a `hypergen.json` of small defaults (4 steps, a 9-frame 32×32 clip; `defaults`
    override them: fps, num_frames, max_frames, width, height, ...). Written to a sibling and
    renamed into place, so a concurrent reader never sees half a model."""
    if kind not in VIDEO_BUILDERS:
        raise ValueError(f"unknown video model family '{kind}'; choose one of {', '.join(VIDEO_FAMILIES)}")
    settings = {"num_inference_steps": 4, **VIDEO_DEFAULTS[kind], **defaults}
    return save_atomically(VIDEO_BUILDERS[kind](seed), Path(out_dir), {"random_weights": True, "family": kind, **settings})

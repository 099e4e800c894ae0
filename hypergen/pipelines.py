"""Loading diffusers pipelines, and the tiny pipelines HyperGen can build offline.

Only the worker (and the CLI's `import` step) import this module: it pulls in torch and
diffusers, which the API process must stay free of.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("hypergen.pipelines")

# The embedded default: a small trained model that draws simple shapes in named colours
# ("a red circle on a blue background"), trained by `python -m training.demo_model`.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo-model"
# A small autoencoder trained to reconstruct images (`python -m training.pixel_vae`): with it,
# the tiny pipelines' image-to-image and inpainting keep what they are given.
PIXEL_VAE_DIR = Path(__file__).resolve().parent / "assets" / "pixel-vae"
# Optional per-model defaults a model directory may carry (HyperGen's own convention).
# Without its `max_side`, a model draws at most twice its native side: OpenAI's default
# 1024x1024 on a 64x64 model is 256x the pixels, and one step of it took ~18 minutes on a CPU.
MAX_SIDE_PER_NATIVE_SIDE = 2
MODEL_DEFAULTS_FILE = "hypergen.json"


@dataclass
class LoadedPipeline:
    """A ready text-to-image pipeline and what clients may ask of it."""

    name: str
    pipe: Any
    source: str
    device: str
    dtype: torch.dtype
    native_width: int
    native_height: int
    default_steps: int
    default_guidance_scale: float
    max_side: int  # the largest side it is asked to draw (larger steps cost minutes or hours)
    random_weights: bool
    load_seconds: float
    # "text-to-image" → pipe; "image-to-image" / "inpainting" → pipelines sharing its weights.
    modes: dict[str, Any] = field(default_factory=dict)


def choose_device(requested: str | None = None) -> str:
    """`cuda` when a GPU is visible, else `cpu`; an explicit setting wins."""
    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def choose_dtype(device: str) -> torch.dtype:
    """fp16/bf16 on accelerators (bf16 where the GPU supports it), fp32 on CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def load_text_to_image(name: str, source: str, device: str | None = None) -> LoadedPipeline:
    """Load a diffusers pipeline from a local directory or a Hub id, ready for text-to-image."""
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    started = time.perf_counter()
    device = choose_device(device)
    dtype = choose_dtype(device)
    logger.info("loading model '%s' from %s onto %s (%s)", name, source, device, str(dtype).replace("torch.", ""))
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype)
    except (ValueError, KeyError):
        # Pipelines AutoPipeline has no mapping for (community or newer classes) still load generically.
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype)
    logger.info("model '%s': %s read in %.2fs", name, describe_components(pipe), time.perf_counter() - started)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    width, height = native_size(pipe)
    defaults = read_model_defaults(source)
    modes = derive_mode_pipelines(pipe)
    return LoadedPipeline(
        name=name,
        pipe=pipe,
        source=source,
        device=device,
        dtype=dtype,
        native_width=defaults.get("width", width),
        native_height=defaults.get("height", height),
        default_steps=int(defaults.get("num_inference_steps", 50)),
        default_guidance_scale=float(defaults.get("guidance_scale", 7.5)),
        max_side=int(defaults.get("max_side", MAX_SIDE_PER_NATIVE_SIDE * max(width, height))),
        random_weights=bool(defaults.get("random_weights", False)),
        load_seconds=time.perf_counter() - started,
        modes=modes,
    )


def describe_components(pipe: Any) -> str:
    """`unet UNet2DConditionModel 3.3M, vae AutoencoderKL 0.2M, ...`: what a pipeline is made of."""
    parts = []
    for key, component in pipe.components.items():
        if component is None:
            continue
        if isinstance(component, torch.nn.Module):
            millions = sum(parameter.numel() for parameter in component.parameters()) / 1e6
            parts.append(f"{key} {type(component).__name__} {millions:.1f}M")
        else:
            parts.append(f"{key} {type(component).__name__}")
    return f"{type(pipe).__name__} [{', '.join(parts)}]"


def load_inpainting(source: str, device: str, dtype: Any) -> Any:
    """A dedicated inpainting checkpoint (e.g. a 9-channel SD inpainting UNet): its own weights."""
    from diffusers import AutoPipelineForInpainting

    pipe = AutoPipelineForInpainting.from_pretrained(source, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def derive_mode_pipelines(pipe: Any) -> dict[str, Any]:
    """Image-to-image and inpainting pipelines built with `from_pipe`: they reuse the loaded
    components (same tensors), so edits cost no second copy of the weights."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    modes: dict[str, Any] = {"text-to-image": pipe}
    for mode, auto_class in (("image-to-image", AutoPipelineForImage2Image), ("inpainting", AutoPipelineForInpainting)):
        try:
            derived = auto_class.from_pipe(pipe)
        except Exception as error:  # not every architecture has these pipelines
            logger.info("this model has no %s pipeline (%s: %s)", mode, type(error).__name__, error)
            continue
        derived.set_progress_bar_config(disable=True)
        modes[mode] = derived
    return modes


def native_size(pipe: Any) -> tuple[int, int]:
    """The resolution a pipeline was trained at: UNet/transformer sample size × VAE scale."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample_size = getattr(getattr(denoiser, "config", None), "sample_size", None) or 64
    if isinstance(sample_size, (list, tuple)):
        sample_height, sample_width = sample_size
    else:
        sample_height = sample_width = int(sample_size)
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return sample_width * scale, sample_height * scale


def read_model_defaults(source: str) -> dict[str, Any]:
    path = Path(source) / MODEL_DEFAULTS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {}


# --- tiny pipelines built from configs (random weights, deterministic) -----------------------


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

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


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


TINY_BUILDERS = {"sd": build_tiny_sd_pipeline, "sdxl": build_tiny_sdxl_pipeline, "sd-inpainting": build_tiny_sd_inpainting_pipeline}


def save_tiny_pipeline(directory: str | os.PathLike[str], kind: str = "sd", seed: int = 0, **defaults: Any) -> Path:
    """Build a tiny random-weight pipeline and save it where `from_pretrained` can load it.

    Written to a temporary sibling and renamed into place, so concurrent workers never load a
    half-written directory.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        TINY_BUILDERS[kind](seed).save_pretrained(staging, safe_serialization=True)
        meta = {"random_weights": True, "num_inference_steps": 20, "guidance_scale": 7.5, **defaults}
        (staging / MODEL_DEFAULTS_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def embedded_default_path() -> Path:
    """The embedded default model's directory (the demo model shipped inside the package)."""
    if not (DEMO_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded demo model is missing from {DEMO_MODEL_DIR}; reinstall HyperGen")
    return DEMO_MODEL_DIR

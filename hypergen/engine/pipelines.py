"""Loading diffusers pipelines: any text-to-image model, its edit pipelines, its defaults.

Only the worker (and the CLI's `import` step) import this module: it pulls in torch and
diffusers, which the API process must stay free of.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import PipelineLevers
from .schedulers import scheduler_names

logger = logging.getLogger("hypergen.pipelines")

# The embedded default: a small trained model that draws simple shapes in named colours
# ("a red circle on a blue background"), trained by `python -m training.demo_model`.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
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
    # mode → the pipeline that runs it, all sharing `pipe`'s weights: "text-to-image" (pipe, where it
    # draws from a prompt alone), "image-to-image", "inpainting", "instruction-edit" (`edit_modes`).
    modes: dict[str, Any] = field(default_factory=dict)
    # The speed levers applied at load; every call of these pipelines runs in `call_context(levers)`.
    levers: PipelineLevers = field(default_factory=PipelineLevers)
    # `quality` → steps (hypergen.json's `quality_steps`, else shares of `default_steps`), read at load.
    quality_steps: dict[str, int] = field(default_factory=dict)
    # The `scheduler` names that fit its own scheduler, found at load (calls swap `pipe.scheduler`).
    schedulers: list[str] = field(default_factory=list)


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


def load_text_to_image(name: str, source: str, device: str | None = None, levers: PipelineLevers | None = None) -> LoadedPipeline:
    """Load a diffusers pipeline from a local directory or a Hub id, ready for text-to-image, with
    the speed `levers` applied (default: none)."""
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
    require_text_to_image(name, pipe)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    levers = levers or PipelineLevers()
    apply_levers(pipe, levers)
    width, height = native_size(pipe)
    defaults = read_model_defaults(source)
    modes = edit_modes(pipe)
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
        levers=levers,
        quality_steps=quality_budget(int(defaults.get("num_inference_steps", 50)), defaults.get("quality_steps", {})),
        schedulers=scheduler_names(pipe.scheduler),
    )


def quality_budget(default_steps: int, configured: dict[str, Any]) -> dict[str, int]:
    """`quality` → steps: hypergen.json's `quality_steps` where it says, else 40 % / 100 % / 150 %
    of the model's recommended steps (at most 150)."""
    steps = {"low": max(1, math.ceil(default_steps * 0.4)), "medium": default_steps, "high": min(150, math.ceil(default_steps * 1.5))}
    return {name: int(configured.get(name, value)) for name, value in steps.items()}


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


def load_inpainting(source: str, device: str, dtype: Any, levers: PipelineLevers | None = None) -> Any:
    """A dedicated inpainting checkpoint (e.g. a 9-channel SD inpainting UNet): its own weights."""
    from diffusers import AutoPipelineForInpainting

    pipe = AutoPipelineForInpainting.from_pretrained(source, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    apply_levers(pipe, levers or PipelineLevers())
    return pipe


# --- speed levers (HYPERGEN_ATTENTION_BACKEND, _CHANNELS_LAST, _TORCH_COMPILE, _FUSE_QKV, _VAE_*) ---

# torch's own preference among its SDPA kernels (`torch._C._get_sdp_priority_order()`).
SDPA_DEFAULT_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION)
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def sdpa_priority(attention_backend: str) -> list[SDPBackend] | None:
    """The SDPA kernels in the order tried for a HYPERGEN_ATTENTION_BACKEND value; None = torch's default.

    The named kernel comes first and the others follow in torch's order, so an input it cannot take
    (flash attention stops at head dim 256; the SD VAE's attention has one 512-wide head, and the
    CPU has no efficient or cuDNN kernel) falls back to the next kernel instead of failing.
    """
    if attention_backend == "default":
        return None
    preferred = SDPA_BACKENDS[attention_backend]
    return [preferred, *(backend for backend in SDPA_DEFAULT_ORDER if backend != preferred)]


def call_context(levers: PipelineLevers | None) -> contextlib.AbstractContextManager[Any]:
    """Enter around every pipeline call: it selects the attention kernels the levers prefer.

    torch reads the SDPA kernel choice at each attention call (and `torch.compile` at tracing),
    from process-wide flags that this context sets and restores.
    """
    order = sdpa_priority(levers.attention_backend) if levers else None
    return sdpa_kernel(order, set_priority=True) if order else contextlib.nullcontext()


def denoiser_of(pipe: Any) -> Any:
    """The model run at every step: `unet` (SD, SDXL) or `transformer` (FLUX, SD3, PixArt...)."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def apply_levers(pipe: Any, levers: PipelineLevers) -> list[str]:
    """Apply the load-time levers to `pipe` in place; returns those applied (a lever the pipeline
    has no use for, e.g. fused projections on a model without them, is logged and skipped).

    Order matters: projections are fused before compiling, so the compiled graph uses them.
    `torch_compile` compiles the denoiser in place (`nn.Module.compile`: same module, same
    state-dict keys, so LoRA loading and `from_pipe` keep working); the first call at each new
    shape pays the compilation.
    """
    applied: list[str] = []
    denoiser = denoiser_of(pipe)
    vae = getattr(pipe, "vae", None)
    if levers.fuse_qkv:
        applied += _fuse_qkv(pipe, denoiser)
    if levers.channels_last:
        for part in (denoiser, vae):
            if isinstance(part, torch.nn.Module):
                part.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    for lever, method in (("vae_tiling", "enable_tiling"), ("vae_slicing", "enable_slicing")):
        if getattr(levers, lever):
            if hasattr(vae, method):
                getattr(vae, method)()
                applied.append(lever)
            else:
                logger.warning("%s: this pipeline's VAE (%s) has no %s(); skipped", lever, type(vae).__name__, method)
    if levers.torch_compile and isinstance(denoiser, torch.nn.Module):
        denoiser.compile()
        applied.append("torch_compile")
    if levers.attention_backend != "default":
        applied.append(f"attention_backend={levers.attention_backend}")  # applied per call: call_context
    if applied:
        logger.info("speed levers on: %s", ", ".join(applied))
    return applied


def _fuse_qkv(pipe: Any, denoiser: Any) -> list[str]:
    """Fuse q/k/v (and cross-attention k/v) projections into one matmul each, where the model allows."""
    # SD/SDXL pipelines fuse the UNet and the VAE; others (FLUX) only offer it on the transformer.
    target = pipe if hasattr(pipe, "fuse_qkv_projections") else denoiser
    try:
        target.fuse_qkv_projections()
    except (AttributeError, ValueError) as error:  # e.g. attention with added k/v projections
        logger.warning("fuse_qkv: %s cannot fuse its projections (%s); skipped", type(pipe).__name__, error)
        return []
    return ["fuse_qkv"]


# Pipelines made to edit an image as a prompt instructs ("make the sky purple"): called with the
# uploaded image as their reference (`image=`), no strength. Those that cannot draw without one.
INSTRUCTION_EDIT_PIPELINES = frozenset({"FluxKontextPipeline", "QwenImageEditPipeline"})
NEEDS_REFERENCE_IMAGE = frozenset({"QwenImageEditPipeline"})
# Their masked variants, used for inpainting. Qwen-Image-Edit's (QwenImageEditInpaintPipeline) is
# left out: it draws at about 1 MP whatever width and height it is given.
INSTRUCTION_INPAINT_PIPELINES = {"FluxKontextPipeline": "FluxKontextInpaintPipeline"}


def edit_modes(pipe: Any) -> dict[str, Any]:
    """The modes of a loaded pipeline, each a pipeline sharing its weights.

    Most models draw from a prompt and derive image-to-image and inpainting pipelines with
    `AutoPipelineFor*.from_pipe`. An instruction-edit model (`INSTRUCTION_EDIT_PIPELINES`) runs
    its edits itself, with the image as its reference ("instruction-edit"), draws from a prompt
    alone unless it needs a reference (Qwen-Image-Edit), and has no strength-based image-to-image
    (AutoPipelineForImage2Image maps it to itself); its masked variant in
    `INSTRUCTION_INPAINT_PIPELINES` is its inpainting (FLUX.1 Kontext: `FluxKontextInpaintPipeline`)."""
    name = type(pipe).__name__
    if name not in INSTRUCTION_EDIT_PIPELINES:
        return derive_mode_pipelines(pipe)
    modes: dict[str, Any] = {} if name in NEEDS_REFERENCE_IMAGE else {"text-to-image": pipe}
    modes["instruction-edit"] = pipe
    inpainting = _derive(pipe, "inpainting", INSTRUCTION_INPAINT_PIPELINES[name]) if name in INSTRUCTION_INPAINT_PIPELINES else None
    if inpainting is not None:
        modes["inpainting"] = inpainting
    return modes


def derive_mode_pipelines(pipe: Any) -> dict[str, Any]:
    """Image-to-image and inpainting pipelines built with `from_pipe`: they reuse the loaded
    components (same tensors), so edits cost no second copy of the weights."""
    modes: dict[str, Any] = {"text-to-image": pipe}
    for mode in ("image-to-image", "inpainting"):
        derived = _derive(pipe, mode)
        if derived is not None:
            modes[mode] = derived
    return modes


def _derive(pipe: Any, mode: str, class_name: str | None = None) -> Any | None:
    """`class_name.from_pipe(pipe)` (default: the AutoPipeline of `mode`), or None where the
    model has no such pipeline."""
    import diffusers

    if class_name is None:
        class_name = {"image-to-image": "AutoPipelineForImage2Image", "inpainting": "AutoPipelineForInpainting"}[mode]
    try:
        derived = getattr(diffusers, class_name).from_pipe(pipe)
    except Exception as error:  # not every architecture has these pipelines
        logger.info("this model has no %s pipeline (%s: %s)", mode, type(error).__name__, error)
        return None
    derived.set_progress_bar_config(disable=True)
    return derived


class UnservableModel(ValueError):
    """A model whose pipeline HyperGen cannot call for images (reported at start-up)."""


# What every call passes (calls.call_arguments); a pipeline without them cannot make an image per request.
REQUIRED_CALL_PARAMETERS = ("prompt", "width", "height", "num_inference_steps", "generator")


def require_text_to_image(name: str, pipe: Any) -> None:
    """Refuse, at start-up and naming what is missing, a pipeline that cannot draw an image from
    a prompt (an unconditional or class-conditional pipeline, a video pipeline)."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return  # takes any argument: a community pipeline; its first call will tell
    missing = [parameter for parameter in REQUIRED_CALL_PARAMETERS if parameter not in parameters]
    if missing:
        raise UnservableModel(
            f"model '{name}' ({type(pipe).__name__}) cannot be served: its pipeline takes no {', '.join(missing)}; "
            f"HyperGen serves text-to-image pipelines (called with {', '.join(REQUIRED_CALL_PARAMETERS)})"
        )
    if "num_frames" in parameters:
        raise UnservableModel(f"model '{name}' ({type(pipe).__name__}) is a video pipeline; HyperGen serves images")


def native_size(pipe: Any) -> tuple[int, int]:
    """The resolution a pipeline draws by default: its `default_sample_size` (FLUX.1, Qwen-Image,
    SD 3.5, SDXL) or else its UNet's or transformer's `sample_size` (SD 1.5, Sana, PixArt-Σ), in
    latent pixels, × the VAE's scale; 64 latent pixels where neither says (Z-Image, whose 1024 is
    written in its code: give such a model `width`/`height` in its hypergen.json)."""
    denoiser = denoiser_of(pipe)
    sample_size = getattr(pipe, "default_sample_size", None) or getattr(getattr(denoiser, "config", None), "sample_size", None) or 64
    if isinstance(sample_size, (list, tuple)):
        sample_height, sample_width = sample_size
    else:
        sample_height = sample_width = int(sample_size)
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return sample_width * scale, sample_height * scale


def size_multiple(pipe: Any) -> int:
    """What both sides of an image must be multiples of, as the pipeline checks or rounds them:
    its image processor's scale (FLUX.1, Qwen-Image and Z-Image pack latents 2×2: 16) and its
    VAE's scale × its transformer's patch size (SD 3.5: 16); at least 8. Pipelines that draw at
    their resolution bins and resize to the size asked (Sana, PixArt-Σ) take any multiple of 8."""
    binning = inspect.signature(type(pipe).__call__).parameters.get("use_resolution_binning")
    if binning is not None and binning.default is True:
        return 8
    processor = getattr(getattr(pipe, "image_processor", None), "config", None)
    multiple = math.lcm(8, int(getattr(processor, "vae_scale_factor", None) or 8))
    patch_size = getattr(getattr(denoiser_of(pipe), "config", None), "patch_size", None)
    if isinstance(patch_size, int):
        multiple = math.lcm(multiple, patch_size * int(getattr(pipe, "vae_scale_factor", 8) or 8))
    return multiple


def read_model_defaults(source: str) -> dict[str, Any]:
    path = Path(source) / MODEL_DEFAULTS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {}


def embedded_default_path() -> Path:
    """The embedded default model's directory (the demo model shipped inside the package)."""
    if not (DEMO_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded demo model is missing from {DEMO_MODEL_DIR}; reinstall HyperGen")
    return DEMO_MODEL_DIR

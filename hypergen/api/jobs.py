"""A validated request becomes a worker job (pure: no I/O, no state)."""

from __future__ import annotations

import secrets
import time

from ..codec import encode_image_b64
from ..errors import OpenAIError, invalid_value, model_not_found, not_ready_error
from ..protocol import MAX_SEED, QUALITY_ALIASES, GenerationJob, ImageRequestOptions, Mode, ModelLimits
from .uploads import FittedUpload

# Variations have no prompt: an empty one lets the model vary the image freely (guidance then
# has nothing to pull towards, so any guidance scale gives the same result).
VARIATION_PROMPT = ""
# OpenAI leaves the edit strength to the server: how far a result may move from the image.
EDIT_STRENGTH, INPAINT_STRENGTH, VARIATION_STRENGTH = 0.75, 1.0, 0.6
EDIT_STRENGTHS: dict[str, float] = {"image-to-image": EDIT_STRENGTH, "inpainting": INPAINT_STRENGTH}


def resolve_model(requested: str | None, models: list[ModelLimits]) -> ModelLimits:
    """The served model a request names (omitted or empty: the default, listed first)."""
    if not models:
        raise not_ready_error("The server is not ready: no model is loaded.")
    if not requested:
        return models[0]
    for limits in models:
        if limits.id == requested:
            return limits
    raise model_not_found(requested, [limits.id for limits in models])


def resolve_size(limits: ModelLimits, size: str | None) -> tuple[int, int]:
    try:
        return limits.resolve_size(size)
    except ValueError as error:
        raise invalid_value("size", f"Invalid 'size': {error}.") from None


# Time per step grows faster than the pixel count (attention is quadratic in tokens): a
# conservative exponent between the convolutions' 1 and attention's 2.
STEP_COST_EXPONENT = 1.5


def refuse_unaffordable_size(limits: ModelLimits, size: tuple[int, int], timeout_s: float) -> None:
    """A 400 for a size whose single denoising step would outlast the request timeout, by the
    step time the warm-up measured at the native size (unknown until then: nothing refused)."""
    if not limits.native_step_s:
        return
    native_pixels = limits.native_width * limits.native_height
    step_s = limits.native_step_s * (size[0] * size[1] / native_pixels) ** STEP_COST_EXPONENT
    if step_s <= timeout_s:
        return
    fitting = (timeout_s / limits.native_step_s) ** (1 / STEP_COST_EXPONENT) * native_pixels
    side = max(limits.min_side, min(limits.max_side, int(fitting**0.5) // 8 * 8))
    raise invalid_value(
        "size",
        f"size '{size[0]}x{size[1]}' would take about {step_s:.0f} s for each denoising step on this server "
        f"({limits.native_step_s * 1000:.0f} ms at {limits.native_width}x{limits.native_height}), longer than the "
        f"request timeout of {timeout_s:g} s; the largest square size that fits is '{side}x{side}'.",
    )


def refuse_transparency(limits: ModelLimits, request: ImageRequestOptions) -> None:
    """`background: transparent` is honoured or refused, never answered with an opaque image."""
    if request.background != "transparent":
        return
    if not limits.transparent:
        raise invalid_value(
            "background",
            f"Model '{limits.id}' draws opaque images only (its autoencoder has no alpha channel); send 'opaque' or 'auto'.",
        )
    if request.output_format == "jpeg":
        raise invalid_value("output_format", "A transparent background needs output_format 'png' or 'webp'; JPEG has no alpha.")


def resolve_scheduler(limits: ModelLimits, name: str | None) -> str | None:
    if name is None or name in limits.schedulers:
        return name
    raise invalid_value(
        "scheduler", f"Scheduler '{name}' does not fit model '{limits.id}'. Its schedulers: {', '.join(limits.schedulers)}."
    )


def seeds_for(seed: int | None, n: int) -> list[int]:
    """With a seed, image i uses seed + i, so a request is reproducible; without, each image is new."""
    if seed is not None:
        return [(seed + index) % (MAX_SEED + 1) for index in range(n)]
    return [secrets.randbelow(MAX_SEED + 1) for _ in range(n)]


def build_job(
    request: ImageRequestOptions,
    limits: ModelLimits,
    request_id: str,
    prompt: str,
    negative_prompt: str | None,
    size: tuple[int, int],
) -> GenerationJob:
    refuse_transparency(limits, request)
    quality = QUALITY_ALIASES[request.quality] if request.quality else None
    steps = request.num_inference_steps or (limits.quality_steps.get(quality) if quality else None) or limits.default_steps
    return GenerationJob(
        request_id=request_id,
        model=limits.id,
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        quality=quality if request.num_inference_steps is None else None,
        guidance_scale=request.guidance_scale if request.guidance_scale is not None else limits.default_guidance_scale,
        seeds=seeds_for(request.seed, request.n or 1),
        output_format=request.output_format or "png",
        output_compression=100 if request.output_compression is None else request.output_compression,
        scheduler=resolve_scheduler(limits, request.scheduler),
        loras=request.adapters(),
        lora_field="loras" if request.loras else "lora_path",
        admitted_at=time.time(),
    )


def refuse_drawing_without_image(limits: ModelLimits) -> None:
    """A 400 for a generation on a model that only edits (Qwen-Image-Edit needs a reference image)."""
    if "text-to-image" not in limits.modes:
        raise invalid_value(
            "model",
            f"Model '{limits.id}' edits images and cannot draw from a prompt alone (it supports: {', '.join(limits.modes)}); "
            "send the image and the instruction to /v1/images/edits.",
        )


def edit_mode(limits: ModelLimits, masked: bool, strength: float | None) -> Mode:
    """An edit's mode: inpainting with a mask; without one, the model's own instruction edit where
    it is an instruction-edit model (FLUX.1 Kontext, Qwen-Image-Edit), else image-to-image."""
    if masked:
        return "inpainting"
    if "instruction-edit" not in limits.modes:
        return "image-to-image"
    if strength is not None:
        raise invalid_value(
            "strength",
            f"Model '{limits.id}' edits by instruction: the image is its reference, not a starting point to denoise from, "
            "so 'strength' does not apply; omit it.",
        )
    return "instruction-edit"


def with_upload(job: GenerationJob, mode: Mode, strength: float | None, upload: FittedUpload, limits: ModelLimits) -> GenerationJob:
    """An edit or variation job: the fitted upload (and mask) as PNG, checked against the model.
    `strength` is None for an instruction edit, which takes none."""
    if mode not in limits.modes:
        param = "mask" if mode == "inpainting" else "image"
        raise invalid_value(param, f"Model '{limits.id}' cannot do {mode}; it supports: {', '.join(limits.modes)}.")
    if strength is not None and int(job.num_inference_steps * strength) < 1:
        raise invalid_value(
            "strength",
            f"strength {strength} × num_inference_steps {job.num_inference_steps} leaves no denoising step; "
            "raise either so that their product is at least 1.",
        )
    return job.model_copy(
        update={
            "mode": mode,
            "strength": strength,
            "image_b64": encode_image_b64(upload.image),
            "mask_b64": encode_image_b64(upload.mask) if upload.mask is not None else None,
        }
    )


def refuse_streamed_variation() -> OpenAIError:
    return invalid_value("stream", "Variations cannot be streamed (as in OpenAI's API); send 'stream': false.")

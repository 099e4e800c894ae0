"""Wire models: what clients send and receive, and what the API hands the worker.

Field ranges and OpenAI's defaults are written down once here; the API validates with these
models and the error mapper quotes `ALLOWED` when a value is out of range.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# What each field accepts, quoted in 400 messages ("Allowed: an integer from 1 to 10.").
ALLOWED: dict[str, str] = {
    "prompt": "a non-empty string of at most 32000 characters",
    "model": "the id of a served model (see GET /v1/models)",
    "n": "an integer from 1 to 10",
    "size": "'auto' or 'WIDTHxHEIGHT' with both sides multiples of 8 within the model's limits, e.g. '512x512'",
    "response_format": "'url' or 'b64_json'",
    "output_format": "'png', 'jpeg' or 'webp'",
    "output_compression": "an integer from 0 to 100",
    "quality": "'standard', 'hd', 'low', 'medium', 'high' or 'auto'",
    "style": "'vivid' or 'natural'",
    "background": "'transparent', 'opaque' or 'auto'",
    "moderation": "'low' or 'auto'",
    "stream": "true or false",
    "partial_images": "an integer from 0 to 3",
    "user": "a string",
    "negative_prompt": "a string",
    "num_inference_steps": "an integer from 1 to 150",
    "guidance_scale": "a number from 1.0 to 20.0",
    "seed": "an integer from 0 to 2**63 - 1",
    "lora_path": "the name of a loaded LoRA adapter or a path inside HYPERGEN_LORA_DIRS (at most 1024 printable characters)",
    "lora_scale": "a number from 0.0 to 2.0",
    "strength": "a number greater than 0.0 and at most 1.0",
    "input_fidelity": "'high' or 'low'",
    "name": "letters, digits, '_', '.', '-' (at most 64 characters)",
    "path": "a path inside HYPERGEN_LORA_DIRS, a BentoML model tag or a Hub id",
    "scale": "a number from 0.0 to 2.0",
}

Mode = Literal["text-to-image", "image-to-image", "inpainting"]

MAX_PROMPT_CHARS = 32000
MAX_SEED = 2**63 - 1
# Longer than any real adapter path, shorter than what the OS refuses (PATH_MAX 4096).
MAX_LORA_PATH_CHARS = 1024
# OpenAI's ImagesResponse.size enum: other sizes are left out of the response, not echoed.
OPENAI_RESPONSE_SIZES = ("1024x1024", "1024x1536", "1536x1024")

_SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")


def reject_control_characters(value: str | None) -> str | None:
    """NUL and other control characters are never part of a name or path: refused at the API."""
    if value is not None and any(ord(character) < 32 or ord(character) == 127 for character in value):
        raise ValueError("it contains control characters")
    return value


class ImageRequestOptions(BaseModel):
    """Fields shared by generations, edits and variations: output, sampling and OpenAI extras."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="served model id; omitted = the default model")
    n: int | None = Field(default=1, ge=1, le=10, description="images to generate")
    size: str | None = Field(default=None, description="'WxH' or 'auto'; omitted = the model's native size")
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None, description="omitted = HYPERGEN_DEFAULT_RESPONSE_FORMAT (b64_json)"
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(default="png")
    output_compression: int | None = Field(default=100, ge=0, le=100)
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    stream: bool | None = False
    partial_images: int | None = Field(default=None, ge=0, le=3)
    user: str | None = None

    num_inference_steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=1.0, le=20.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    lora_path: str | None = Field(default=None, min_length=1, max_length=MAX_LORA_PATH_CHARS)
    lora_scale: float | None = Field(default=None, ge=0.0, le=2.0)

    _lora_path_printable = field_validator("lora_path")(reject_control_characters)


class PromptFields(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what to draw")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is blank")
        return value


class ImageGenerationRequest(PromptFields, ImageRequestOptions):
    """OpenAI's CreateImageRequest plus diffusion extras.

    Example: `{"prompt": "a red circle", "n": 2, "size": "64x64", "response_format": "b64_json",
    "seed": 7, "num_inference_steps": 20}`. Unknown fields are ignored; `null` means "default".
    """

    style: Literal["vivid", "natural"] | None = None


class ImageEditRequest(PromptFields, ImageRequestOptions):
    """OpenAI's CreateImageEditRequest form fields (the files come separately) plus extras.

    `strength` (0 < s ≤ 1) is how far the result may move from the image; omitted = 0.75
    without a mask, 1.0 with one.
    """

    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    input_fidelity: Literal["high", "low"] | None = None


class ImageVariationRequest(ImageRequestOptions):
    """OpenAI's CreateImageVariationRequest form fields plus extras (`strength` omitted = 0.6)."""

    strength: float | None = Field(default=None, gt=0.0, le=1.0)


def parse_size(size: str) -> tuple[int, int]:
    """`"512x768"` → `(512, 768)` (width, height); raises ValueError with a suggestion.

    Sides must be positive multiples of 8 (the VAE's latent grid): `"1001x1001"` fails with
    "... is not a multiple of 8; try '1000x1000'", naming the nearest valid size.
    """
    match = _SIZE_PATTERN.match(size)
    if not match:
        raise ValueError(f"size '{size}' is not of the form WIDTHxHEIGHT, e.g. '512x512'")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0:
        raise ValueError(f"size '{size}' must have positive sides")
    if width % 8 or height % 8:
        raise NotMultipleOf8(f"size '{size}' is not a multiple of 8; try '{_round8(width)}x{_round8(height)}'", (width, height))
    return width, height


class NotMultipleOf8(ValueError):
    def __init__(self, message: str, sides: tuple[int, int]) -> None:
        super().__init__(message)
        self.sides = sides


def _round8(value: int) -> int:
    return max(8, int(round(value / 8)) * 8)


class ModelLimits(BaseModel):
    """What a served model accepts; the worker reports it, the API validates with it."""

    id: str
    native_width: int
    native_height: int
    min_side: int = 64
    max_side: int = 2048
    default_steps: int = 50
    default_guidance_scale: float = 7.5
    modes: list[str] = Field(default_factory=lambda: ["text-to-image"])

    def resolve_size(self, size: str | None) -> tuple[int, int]:
        """Validated (width, height) for a request's `size` (None or 'auto' = native)."""
        if size is None or size.strip().lower() == "auto":
            return self.native_width, self.native_height
        try:
            width, height = parse_size(size)
        except NotMultipleOf8 as error:
            raise ValueError(f"size '{size}' is not a multiple of 8; try '{self.nearest_size(*error.sides)}'") from None
        if not (self.min_side <= width <= self.max_side and self.min_side <= height <= self.max_side):
            raise ValueError(
                f"size '{size}' is outside what model '{self.id}' makes: each side from {self.min_side} to "
                f"{self.max_side} pixels (the largest is '{self.max_side}x{self.max_side}'); try '{self.nearest_size(width, height)}'"
            )
        return width, height

    def nearest_size(self, width: int, height: int) -> str:
        """The closest size this model accepts: sides clamped to its limits, multiples of 8."""
        low, high = -(-self.min_side // 8) * 8, self.max_side // 8 * 8
        return "x".join(str(min(high, max(low, _round8(side)))) for side in (width, height))


class GenerationJob(BaseModel):
    """One request as the worker sees it: everything resolved, one seed per image."""

    request_id: str = Field(description="the client's X-Request-ID (or ours): for logs only")
    job_id: str = Field(
        default_factory=lambda: f"job_{uuid.uuid4().hex}",
        description="made by the server: the only key of the worker's job, stream and cancel tables",
    )
    is_warm_up: bool = Field(default=False, description="a batcher warm-up call, logged at DEBUG")
    model: str
    prompt: str
    negative_prompt: str | None = None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seeds: list[int]
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int = 100
    mode: Mode = "text-to-image"
    image_b64: str | None = Field(default=None, description="init image (PNG) at width×height")
    mask_b64: str | None = Field(default=None, description="mask (PNG, L, 255 = repaint) at width×height")
    strength: float | None = None
    lora_path: str | None = Field(default=None, description="adapter name, or a path inside HYPERGEN_LORA_DIRS")
    lora_scale: float | None = Field(default=None, description="None = the adapter's default scale")
    admitted_at: float = Field(description="time.time() when the API admitted the request")

    @property
    def n(self) -> int:
        return len(self.seeds)

    @classmethod
    def warm_up(cls, model: "ModelLimits", index: int) -> "GenerationJob":
        """A one-step job at the model's native size, for warming a worker's batcher."""
        return cls(
            request_id=f"warmup-{index}",
            model=model.id,
            prompt="warm-up",
            width=model.native_width,
            height=model.native_height,
            num_inference_steps=1,
            guidance_scale=model.default_guidance_scale,
            seeds=[index],
            admitted_at=time.time(),
            is_warm_up=True,
        )


class GenerationResult(BaseModel):
    """The worker's answer for one job: encoded images (base64), or a failure description."""

    request_id: str
    images_b64: list[str] = Field(default_factory=list)
    error: str | None = None
    error_status: int = Field(default=500, description="400 when the request itself was at fault")
    error_param: str | None = None
    queue_wait_s: float = 0.0
    generation_s: float = 0.0
    encode_s: float = 0.0
    batch_images: int = 0


class WorkerStatus(BaseModel):
    """Readiness and what the worker serves."""

    ready: bool
    detail: str = ""
    device: str | None = None
    dtype: str | None = None
    models: list[ModelLimits] = Field(default_factory=list)
    pid: int | None = Field(default=None, description="the worker's process ID")
    memory: dict[str, Any] | None = Field(default=None, description="memory budget and where each model lives")
    workers: list[dict[str, Any]] = Field(default_factory=list, description="per-worker load, with several workers")
    busy: list[dict[str, Any]] = Field(
        default_factory=list,
        description="pipeline calls running now: requests, images, size, steps, step, started_at (time.time())",
    )


class LoraCommand(BaseModel):
    """An adapter operation for the worker: list, load or unload."""

    action: Literal["list", "load", "unload"]
    name: str | None = None
    path: str | None = None
    scale: float = 1.0


class LoraReply(BaseModel):
    ok: bool = True
    status: int = 200
    message: str = ""
    adapters: list[dict[str, Any]] = Field(default_factory=list)


class LoraLoadRequest(BaseModel):
    """`POST /v1/loras` body: load the adapter at `path` (inside HYPERGEN_LORA_DIRS, a BentoML model
    tag or a Hub id) under `name`, with a default `scale`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str = Field(min_length=1, max_length=MAX_LORA_PATH_CHARS)

    _path_printable = field_validator("path")(reject_control_characters)
    scale: float = Field(default=1.0, ge=0.0, le=2.0)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "webp", "jpeg"] | None = None
    size: Literal["1024x1024", "1024x1536", "1536x1024"] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hypergen"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

"""Wire models: what clients send and receive, and the contract between the API and the worker.

Field bounds are declared once, in `Field(...)`; the 400 messages' "Allowed: ..." hints are read
back from the models' JSON schema (`ALLOWED`), so the two cannot drift apart. Imports neither
torch nor FastAPI: both processes use it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator

# "instruction-edit": an edit by a model made for it (FLUX.1 Kontext, Qwen-Image-Edit), the image as its reference.
Mode = Literal["text-to-image", "image-to-image", "inpainting", "instruction-edit"]
OutputFormat = Literal["png", "jpeg", "webp"]
Quality = Literal["low", "medium", "high"]
# OpenAI's quality names, DALL-E 3's included, onto HyperGen's three step budgets.
QUALITY_ALIASES: dict[str, Quality] = {
    "low": "low",
    "medium": "medium",
    "auto": "medium",
    "standard": "medium",
    "high": "high",
    "hd": "high",
}

MAX_PROMPT_CHARS = 32000
MAX_SEED = 2**63 - 1
# Longer than any real adapter path, shorter than what the OS refuses (PATH_MAX 4096).
MAX_LORA_PATH_CHARS = 1024
MAX_LORAS_PER_REQUEST = 4
MAX_SCHEDULER_CHARS = 40
# OpenAI's ImagesResponse.size enum: other sizes are left out of the response, not echoed.
OPENAI_RESPONSE_SIZES = ("1024x1024", "1024x1536", "1536x1024")

_SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")


def reject_control_characters(value: str | None) -> str | None:
    """NUL and other control characters are never part of a name or path: refused at the API."""
    if value is not None and any(ord(character) < 32 or ord(character) == 127 for character in value):
        raise ValueError("it contains control characters")
    return value


def allowed(hint: str) -> dict[str, Any]:
    """`json_schema_extra` for a field whose accepted values a schema cannot say by itself."""
    return {"allowed": hint}


# --- client requests -------------------------------------------------------------------------


class LoraChoice(BaseModel):
    """One adapter of a request: a loaded adapter's name or a path inside HYPERGEN_LORA_DIRS, and
    its scale (omitted = the adapter's own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1, max_length=MAX_LORA_PATH_CHARS)
    scale: float | None = Field(default=None, ge=0.0, le=2.0)

    _path_printable = field_validator("path")(reject_control_characters)


class ImageRequestOptions(BaseModel):
    """Fields shared by generations, edits and variations: output, sampling and OpenAI extras."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        default=None,
        description="Served model id (GET /v1/models); omitted = the default model.",
        json_schema_extra=allowed("the id of a served model (see GET /v1/models)"),
    )
    n: int | None = Field(default=1, ge=1, le=10, description="Images to generate.")
    size: str | None = Field(
        default=None,
        description="'WIDTHxHEIGHT' (multiples of 8, within the model's limits) or 'auto'; omitted = native size.",
        json_schema_extra=allowed("'auto' or 'WIDTHxHEIGHT' with both sides multiples of 8 within the model's limits, e.g. '512x512'"),
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None, description="omitted = HYPERGEN_DEFAULT_RESPONSE_FORMAT (b64_json)."
    )
    output_format: OutputFormat | None = Field(default="png", description="Encoding of the returned images.")
    output_compression: int | None = Field(default=100, ge=0, le=100, description="jpeg/webp quality (100 = best).")
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = Field(
        default=None,
        description="A step budget: low, medium (= auto, standard) or high (= hd), per model (hypergen.json `quality_steps`); "
        "num_inference_steps, when given, wins.",
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        default=None, description="transparent needs a model that draws alpha (400 otherwise); opaque and auto give opaque images."
    )
    moderation: Literal["low", "auto"] | None = Field(
        default=None,
        description="OpenAI's field: accepted; HyperGen runs no moderation model (the model's own safety checker, if any, applies).",
    )
    stream: bool | None = Field(default=False, description="Server-Sent Events with partial images.")
    partial_images: int | None = Field(default=None, ge=0, le=3, description="Partial images per image when streaming.")
    user: str | None = Field(default=None, description="OpenAI's end-user id: accepted and ignored.")

    num_inference_steps: int | None = Field(
        default=None, ge=1, le=150, description="Denoising steps; omitted = the model's recommended number."
    )
    guidance_scale: float | None = Field(
        default=None, ge=1.0, le=20.0, description="Classifier-free guidance; omitted = the model's recommended scale."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Image i uses seed + i; omitted = random.",
        json_schema_extra=allowed("an integer from 0 to 2**63 - 1"),
    )
    lora_path: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LORA_PATH_CHARS,
        description="A loaded adapter's name, or a path inside HYPERGEN_LORA_DIRS.",
        json_schema_extra=allowed(
            f"the name of a loaded LoRA adapter or a path inside HYPERGEN_LORA_DIRS (at most {MAX_LORA_PATH_CHARS} printable characters)"
        ),
    )
    lora_scale: float | None = Field(default=None, ge=0.0, le=2.0, description="omitted = the adapter's own scale.")
    scheduler: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SCHEDULER_CHARS,
        description="A sampler by its A1111/ComfyUI name (euler, euler_a, dpm++_2m_karras, ddim, unipc, lcm, flow_euler, ...); "
        "omitted = the model's own. GET /v1/models lists each model's names.",
        json_schema_extra=allowed("one of the scheduler names GET /v1/models lists for the model"),
    )
    loras: list[LoraChoice] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LORAS_PER_REQUEST,
        description="Several adapters at once, each with its own scale (instead of lora_path). In multipart forms: a JSON string.",
        json_schema_extra=allowed(
            f"a list of 1 to {MAX_LORAS_PER_REQUEST} different adapters, each "
            '{"path": "<adapter name or path>", "scale": 0.0-2.0}, and no lora_path beside it'
        ),
    )

    _lora_path_printable = field_validator("lora_path")(reject_control_characters)

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form(cls, value: Any) -> Any:
        """Multipart forms carry the list as a JSON string."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("it is not a JSON list") from None
        return value

    @field_validator("loras")
    @classmethod
    def _one_way_to_name_adapters(cls, value: list[LoraChoice] | None, info: ValidationInfo) -> list[LoraChoice] | None:
        if value is None:
            return value
        if info.data.get("lora_path") is not None:
            raise ValueError("send either lora_path or loras, not both")
        paths = [choice.path for choice in value]
        if len(set(paths)) != len(paths):
            raise ValueError("each adapter may appear once")
        return value

    def adapters(self) -> list[LoraChoice]:
        """The adapters this request names, whichever field it used."""
        if self.loras:
            return list(self.loras)
        return [LoraChoice(path=self.lora_path, scale=self.lora_scale)] if self.lora_path is not None else []


class PromptFields(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="What not to draw.")

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

    style: Literal["vivid", "natural"] | None = Field(
        default=None, description="DALL-E 3's field: accepted and ignored (put the style in the prompt)."
    )


class ImageEditRequest(PromptFields, ImageRequestOptions):
    """OpenAI's CreateImageEditRequest form fields (the files come separately) plus extras."""

    strength: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="How far the result may move from the image; omitted = 0.75, 1.0 with a mask. "
        "An instruction-edit model's edit without a mask takes none.",
    )
    input_fidelity: Literal["high", "low"] | None = Field(default=None, description="OpenAI's field: accepted and ignored.")


class ImageVariationRequest(ImageRequestOptions):
    """OpenAI's CreateImageVariationRequest form fields plus extras."""

    strength: float | None = Field(default=None, gt=0.0, le=1.0, description="How far a variation may move; omitted = 0.6.")


class LoraLoadRequest(BaseModel):
    """`POST /v1/loras` body: load the adapter at `path` (inside HYPERGEN_LORA_DIRS, a BentoML model
    tag or a Hub id) under `name`, with a default `scale`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The adapter's name, as `lora_path` uses it.",
        json_schema_extra=allowed("letters, digits, '_', '.', '-' (at most 64 characters)"),
    )
    path: str = Field(
        min_length=1,
        max_length=MAX_LORA_PATH_CHARS,
        description="Where its weights are.",
        json_schema_extra=allowed("a path inside HYPERGEN_LORA_DIRS, a BentoML model tag or a Hub id"),
    )
    scale: float = Field(default=1.0, ge=0.0, le=2.0, description="Its default scale.")

    _path_printable = field_validator("path")(reject_control_characters)


# --- client responses ------------------------------------------------------------------------


class ImageData(BaseModel):
    b64_json: str | None = Field(default=None, description="The image, base64-encoded.")
    url: str | None = Field(default=None, description="Where to download the image until it expires.")
    revised_prompt: str | None = Field(default=None, description="OpenAI's field; never set.")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time.")
    data: list[ImageData] = Field(description="One entry per image.")
    background: Literal["transparent", "opaque"] | None = Field(default=None, description="The images' background.")
    output_format: OutputFormat | None = Field(default=None, description="Encoding of the images.")
    size: Literal["1024x1024", "1024x1536", "1536x1024"] | None = Field(default=None, description="Only when it is one of OpenAI's sizes.")
    quality: Quality | None = Field(default=None, description="The step budget used, when the request chose one by `quality`.")


class ModelCard(BaseModel):
    id: str = Field(description="The model id clients send as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the server started.")
    owned_by: str = "hypergen"
    # HyperGen's additions, once the model is loaded (OpenAI's clients keep extra fields).
    native_size: str | None = Field(default=None, description="The size it was trained at ('auto').")
    max_size: str | None = Field(default=None, description="The largest size it makes.")
    modes: list[str] | None = Field(default=None, description="What it does: text-to-image, image-to-image, inpainting, instruction-edit.")
    schedulers: list[str] | None = Field(default=None, description="The names `scheduler` accepts for it.")
    fps: int | None = Field(default=None, description="A video model's frames per second.")
    max_frames: int | None = Field(default=None, description="The most frames a video model makes in one video.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(description="Served models; the first is the default.")


def describe_allowed(schema: dict[str, Any]) -> str | None:
    """What a field accepts, in words, from its JSON schema ("an integer from 1 to 10")."""
    if "allowed" in schema:
        return schema["allowed"]
    options = [option for option in schema.get("anyOf", [schema]) if option.get("type") != "null"]
    if not options:
        return None
    option = options[0]
    if "enum" in option or "const" in option:
        values = [repr(value) for value in option.get("enum", [option.get("const")])]
        return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
    kind = option.get("type")
    if kind in ("integer", "number"):
        noun = "an integer" if kind == "integer" else "a number"
        if "exclusiveMinimum" in option:
            return f"{noun} greater than {option['exclusiveMinimum']} and at most {option['maximum']}"
        return f"{noun} from {option.get('minimum')} to {option.get('maximum')}"
    if kind == "boolean":
        return "true or false"
    if kind == "string" and "maxLength" in option:
        noun = "a non-empty string" if option.get("minLength", 0) >= 1 else "a string"
        return f"{noun} of at most {option['maxLength']} characters"
    return "a string" if kind == "string" else None


def allowed_hints(*models: type[BaseModel]) -> dict[str, str]:
    hints: dict[str, str] = {}
    for model in models:
        for name, schema in model.model_json_schema()["properties"].items():
            hint = describe_allowed(schema)
            if hint is not None:
                hints.setdefault(name, hint)
    return hints


# What each field accepts, quoted in 400 messages ("Allowed: an integer from 1 to 10.").
ALLOWED: dict[str, str] = allowed_hints(ImageGenerationRequest, ImageEditRequest, LoraLoadRequest)


# --- sizes and model limits ------------------------------------------------------------------


class NotMultipleOf8(ValueError):
    def __init__(self, message: str, sides: tuple[int, int]) -> None:
        super().__init__(message)
        self.sides = sides


def parse_size(size: str) -> tuple[int, int]:
    """`"512x768"` → `(512, 768)` (width, height); raises ValueError with a suggestion.

    Sides must be positive multiples of 8 (the VAE's latent grid): `"1001x1001"` fails with
    "... is not a multiple of 8; try '1000x1000'" (`ModelLimits.resolve_size` names a size
    within the model's limits instead).
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
    quality_steps: dict[str, int] = Field(default_factory=dict, description="low / medium / high → steps")
    transparent: bool = Field(default=False, description="whether it draws images with alpha")
    schedulers: list[str] = Field(default_factory=list, description="the names `scheduler` accepts")
    native_step_s: float | None = Field(
        default=None, description="one denoising step of one image at the native size, measured by the warm-up calls"
    )
    size_multiple: int = Field(
        default=8, description="both sides are multiples of it: 16 where latents are packed or patched 2×2 (FLUX.1, SD 3.5, Qwen-Image)"
    )

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
        if width % self.size_multiple or height % self.size_multiple:
            raise ValueError(
                f"size '{size}' does not fit model '{self.id}': its sides must be multiples of {self.size_multiple}; "
                f"try '{self.nearest_size(width, height)}'"
            )
        return width, height

    def nearest_size(self, width: int, height: int) -> str:
        """The closest size this model accepts: sides clamped to its limits, multiples of its `size_multiple`."""
        step = max(8, self.size_multiple)
        low, high = -(-self.min_side // step) * step, self.max_side // step * step
        return "x".join(str(min(high, max(low, step, (side + step // 2) // step * step))) for side in (width, height))


# --- the worker contract ---------------------------------------------------------------------


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
    output_format: OutputFormat = "png"
    output_compression: int = 100
    mode: Mode = "text-to-image"
    image_b64: str | None = Field(default=None, description="init image (PNG) at width×height")
    mask_b64: str | None = Field(default=None, description="mask (PNG, L, 255 = repaint) at width×height")
    strength: float | None = None
    scheduler: str | None = Field(default=None, description="a name from ModelLimits.schedulers; None = the model's own")
    quality: Quality | None = Field(default=None, description="the step budget the request chose (for its response only)")
    loras: list[LoraChoice] = Field(default_factory=list, description="the adapters, each with its scale (None = its own)")
    lora_field: Literal["lora_path", "loras"] = Field(default="lora_path", description="the field errors about adapters name")
    admitted_at: float = Field(description="time.time() when the API admitted the request")

    @property
    def n(self) -> int:
        return len(self.seeds)

    @classmethod
    def warm_up(cls, model: ModelLimits, index: int) -> GenerationJob:
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


class WorkerError(BaseModel):
    """A failure the worker reports for one job or one adapter command. The API maps it to
    OpenAI's error object in one place (`errors.from_worker`)."""

    message: str = Field(description="for 4xx: shown to the client; for 5xx: logged only")
    status: int = Field(
        default=500, description="400 bad input (`param` names the field), 404, 409, 499 cancelled, 503 not ready, 500 failed"
    )
    param: str | None = None


class GenerationResult(BaseModel):
    """The worker's answer for one job: encoded images (base64), or its error."""

    request_id: str
    images_b64: list[str] = Field(default_factory=list)
    error: WorkerError | None = None
    queue_wait_s: float = 0.0
    generation_s: float = 0.0
    encode_s: float = 0.0
    batch_images: int = 0


class ProgressEvent(BaseModel):
    kind: Literal["progress"] = "progress"
    step: int
    total_steps: int


class PartialImageEvent(BaseModel):
    kind: Literal["partial"] = "partial"
    image_index: int
    partial_image_index: int
    b64_json: str


class ImageEvent(BaseModel):
    kind: Literal["image"] = "image"
    image_index: int
    b64_json: str


class DoneEvent(BaseModel):
    """The last event of a stream: the job's result (its `error` set if it failed)."""

    kind: Literal["done"] = "done"
    result: GenerationResult


WorkerEvent = Annotated[ProgressEvent | PartialImageEvent | ImageEvent | DoneEvent, Field(discriminator="kind")]
WORKER_EVENT: TypeAdapter[WorkerEvent] = TypeAdapter(WorkerEvent)


VideoMode = Literal["text-to-video", "image-to-video"]


class VideoLimits(ModelLimits):
    """What the served video model makes; the worker reports it, the API validates with it."""

    fps: int = 8
    default_frames: int = 16
    max_frames: int = 16
    frame_step: int = Field(default=1, description="valid frame counts are frame_offset + k * frame_step (Wan: 4k + 1)")
    frame_offset: int = 0

    def valid_frames(self, frames: int) -> bool:
        return 1 <= frames <= self.max_frames and (frames - self.frame_offset) % self.frame_step == 0

    def nearest_frames(self, frames: float) -> int:
        """The valid frame count nearest `frames` (at least the smallest, at most `max_frames`)."""
        step, offset = self.frame_step, self.frame_offset
        k = max(0 if offset else 1, round((frames - offset) / step))
        return min(offset + k * step, offset + (self.max_frames - offset) // step * step)

    def allowed_frames(self) -> str:
        if self.frame_step == 1:
            return f"1 to {self.max_frames} frames"
        return f"{self.frame_offset} + a multiple of {self.frame_step} frames, up to {self.max_frames}"

    def allowed_seconds(self, fps: int) -> str:
        smallest = (self.frame_offset or self.frame_step) / fps
        return f"from {smallest:g} to {self.max_frames / fps:g} seconds at {fps} fps"


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
    video: VideoLimits | None = Field(default=None, description="the video model, once loaded")
    video_detail: str = Field(default="", description="why there is no video model yet (loading, failed, none configured)")
    video_busy: dict[str, Any] | None = Field(default=None, description="the video job rendering now: job, step, steps")


class LoraCommand(BaseModel):
    """An adapter operation for the worker: list, load or unload."""

    action: Literal["list", "load", "unload"]
    name: str | None = None
    path: str | None = None
    scale: float = 1.0


class LoraReply(BaseModel):
    adapters: list[dict[str, Any]] = Field(default_factory=list)
    error: WorkerError | None = None

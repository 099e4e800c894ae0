"""Wire models of the video API (OpenAI's `/v1/videos`, with vLLM-Omni's extras) and of the
API ↔ worker contract for video jobs. Imports neither torch nor FastAPI.

OpenAI's `VideoResource.size` and `.seconds` enums list only Sora's values; a diffusers model
makes other sizes and lengths, and HyperGen echoes what it made ("64x64", "1"): the official
client parses them (NOTES.md), and the README names this one deviation from the schema.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from .protocol import MAX_SEED, PromptFields, VideoMode, WorkerError, allowed, allowed_hints

VideoStatus = Literal["queued", "in_progress", "completed", "failed"]
VideoVariant = Literal["video", "thumbnail", "spritesheet"]
MAX_VIDEO_SECONDS = 600.0
MAX_VIDEO_FRAMES = 2000
_SECONDS_PATTERN = re.compile(r"^\s*\d{1,4}(\.\d{1,3})?\s*$")


class ImageReference(BaseModel):
    """OpenAI's JSON `input_reference`: exactly one of `image_url` (HyperGen takes base64 data
    URLs only: it fetches nothing from the network) or `file_id` (HyperGen has no Files API)."""

    model_config = ConfigDict(extra="ignore")

    image_url: str | None = Field(default=None, max_length=20 * 1024 * 1024 * 4 // 3 + 100)
    file_id: str | None = Field(default=None, max_length=200)


class VideoCreateRequest(PromptFields):
    """OpenAI's CreateVideo (JSON or multipart) plus vLLM-Omni's and the image API's extras.

    Example: `{"prompt": "a red circle moving right on a blue background", "seconds": "1",
    "size": "64x64", "seed": 7}`. `width`/`height` win over `size`, `num_frames` over `seconds`.
    Unknown fields are ignored; `null` means "default".
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        default=None,
        description="The served video model (GET /v1/models); omitted = the default video model.",
        json_schema_extra=allowed("the id of a served video model (see GET /v1/models)"),
    )
    seconds: str | None = Field(
        default=None,
        description="Clip length in seconds (OpenAI: '4', '8', '12'; here any length the model can make); "
        "omitted = the model's default clip.",
        json_schema_extra=allowed("a number of seconds such as '1' or '2.5', within the model's frame limits"),
    )
    size: str | None = Field(
        default=None,
        description="'WIDTHxHEIGHT' within the model's limits; omitted = its native size.",
        json_schema_extra=allowed("'WIDTHxHEIGHT' within the model's limits, e.g. '64x64'"),
    )
    input_reference: ImageReference | None = Field(
        default=None, description="An image the video starts from (image-to-video models); multipart: a file."
    )
    width: int | None = Field(default=None, ge=8, le=8192, description="vLLM-Omni: width in pixels (wins over size).")
    height: int | None = Field(default=None, ge=8, le=8192, description="vLLM-Omni: height in pixels (wins over size).")
    num_frames: int | None = Field(default=None, ge=1, le=MAX_VIDEO_FRAMES, description="vLLM-Omni: frames (wins over seconds).")
    fps: int | None = Field(default=None, ge=1, le=120, description="Frames per second of the file; omitted = the model's.")
    num_inference_steps: int | None = Field(default=None, ge=1, le=150, description="Denoising steps; omitted = the model's.")
    guidance_scale: float | None = Field(default=None, ge=1.0, le=20.0, description="omitted = the model's recommended scale.")
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="omitted = random.", json_schema_extra=allowed("an integer from 0 to 2**63 - 1")
    )
    user: str | None = Field(default=None, description="accepted and ignored")

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds_is_a_number(cls, value: Any) -> Any:
        if value is None:
            return None
        text = str(value)
        if isinstance(value, bool) or not _SECONDS_PATTERN.match(text) or not 0 < float(text) <= MAX_VIDEO_SECONDS:
            raise ValueError(f"seconds {text!r} is not a positive number of seconds up to {MAX_VIDEO_SECONDS:g}")
        return text.strip()

    @field_validator("input_reference", mode="before")
    @classmethod
    def _reference_from_form(cls, value: Any) -> Any:
        return None if value in ("", None) else value


class VideoRemixRequest(BaseModel):
    """OpenAI's CreateVideoRemix: the new prompt; the extras may change too (same seed unless given)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=32000)
    negative_prompt: str | None = Field(default=None, max_length=32000)
    num_inference_steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=1.0, le=20.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


# What each field accepts, quoted in 400 messages.
VIDEO_ALLOWED: dict[str, str] = allowed_hints(VideoCreateRequest, VideoRemixRequest)


# --- responses ---------------------------------------------------------------------------------


class VideoJobError(BaseModel):
    code: str
    message: str


class VideoResource(BaseModel):
    """OpenAI's VideoResource."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: VideoStatus
    progress: int = 0
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str | None = None
    size: str
    seconds: str
    remixed_from_video_id: str | None = None
    error: VideoJobError | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoResource]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class DeletedVideo(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


# --- the worker contract -----------------------------------------------------------------------


def seconds_text(frames: int, fps: int) -> str:
    """A clip's length as VideoResource.seconds: '1', '2.5', '4.062'."""
    return f"{frames / fps:.3f}".rstrip("0").rstrip(".")


class VideoJob(BaseModel):
    """One video as the worker sees it: everything resolved."""

    job_id: str = Field(default_factory=lambda: f"vjob_{uuid.uuid4().hex}", description="made by the server")
    request_id: str
    model: str
    mode: VideoMode = "text-to-video"
    prompt: str
    negative_prompt: str | None = None
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    image_b64: str | None = Field(default=None, description="the first frame (PNG) at width×height, for image-to-video")
    admitted_at: float = Field(default_factory=time.time)


class VideoProgress(BaseModel):
    type: Literal["progress"] = "progress"
    step: int
    total_steps: int

    @property
    def percent(self) -> int:
        return min(99, math.floor(100 * self.step / max(1, self.total_steps)))


class VideoDone(BaseModel):
    """The rendered files (base64), or the job's error."""

    type: Literal["done"] = "done"
    mp4_b64: str = ""
    thumbnail_b64: str = ""
    spritesheet_b64: str = ""
    frames: int = 0
    render_s: float = 0.0
    error: WorkerError | None = None


VideoEvent = VideoProgress | VideoDone
VIDEO_EVENT: TypeAdapter[VideoEvent] = TypeAdapter(Annotated[VideoEvent, Field(discriminator="type")])

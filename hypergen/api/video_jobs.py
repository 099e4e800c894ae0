"""A validated video request becomes a worker `VideoJob`: size, frames and fps from OpenAI's
`size`/`seconds` or vLLM-Omni's `width`/`height`/`num_frames`/`fps`, checked against what the
served video model makes. Pure functions (no I/O), unit-tested without a server."""

from __future__ import annotations

import base64
import io
import random
import secrets
import time

from PIL import Image

from ..errors import invalid_value
from ..protocol import MAX_SEED, VideoLimits
from ..video_protocol import VideoCreateRequest, VideoJob, VideoResource, seconds_text


def new_video_id() -> str:
    """Made by the server, unguessable: the only key of a video's record and files."""
    return f"video_{secrets.token_hex(16)}"


def resolve_video_size(request: VideoCreateRequest, limits: VideoLimits) -> tuple[int, int]:
    """`width`/`height` (both, or neither) win over `size`; omitted = the model's native size."""
    if (request.width is None) != (request.height is None):
        param = "height" if request.height is None else "width"
        raise invalid_value(param, f"Send both 'width' and 'height', or neither (then 'size' applies); '{param}' is missing.")
    size, param = (f"{request.width}x{request.height}", "width") if request.width is not None else (request.size, "size")
    try:
        return limits.resolve_size(size)
    except ValueError as error:
        raise invalid_value(
            param, f"{error}. Allowed: 'WIDTHxHEIGHT' within the model's limits, e.g. '{limits.nearest_size(64, 64)}'."
        ) from None


def resolve_frames(request: VideoCreateRequest, limits: VideoLimits, fps: int) -> int:
    """`num_frames` as given (it must be one the model makes); `seconds` to the nearest frame
    count the model makes; neither = the model's default clip."""
    if request.num_frames is not None:
        if not limits.valid_frames(request.num_frames):
            raise invalid_value(
                "num_frames",
                f"num_frames {request.num_frames} is not one model '{limits.id}' makes. Allowed: {limits.allowed_frames()}; "
                f"try {limits.nearest_frames(request.num_frames)}.",
            )
        return request.num_frames
    if request.seconds is None:
        return limits.default_frames
    wanted = float(request.seconds) * fps
    frames = limits.nearest_frames(wanted)
    if wanted > limits.max_frames + limits.frame_step / 2 or frames < 1:
        raise invalid_value(
            "seconds",
            f"seconds '{request.seconds}' is {wanted:g} frames at {fps} fps, more than model '{limits.id}' makes. "
            f"Allowed: {limits.allowed_seconds(fps)} (up to {limits.max_frames} frames).",
        )
    return frames


def build_video_job(request: VideoCreateRequest, limits: VideoLimits, request_id: str, reference: Image.Image | None = None) -> VideoJob:
    """The worker's job for a request (the reference, if any, already fitted to the size)."""
    mode = "image-to-video" if reference is not None else "text-to-video"
    if mode not in limits.modes:
        if reference is not None:
            raise invalid_value(
                "input_reference", f"Model '{limits.id}' cannot start a video from an image (it has no image-to-video pipeline)."
            )
        raise invalid_value("input_reference", f"Model '{limits.id}' makes videos from an image: send 'input_reference'.")
    width, height = resolve_video_size(request, limits)
    fps = request.fps or limits.fps
    image_b64 = None
    if reference is not None:
        buffer = io.BytesIO()
        reference.save(buffer, format="PNG")
        image_b64 = base64.b64encode(buffer.getvalue()).decode()
    return VideoJob(
        request_id=request_id,
        model=limits.id,
        mode=mode,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        num_frames=resolve_frames(request, limits, fps),
        fps=fps,
        num_inference_steps=request.num_inference_steps or limits.default_steps,
        guidance_scale=request.guidance_scale if request.guidance_scale is not None else limits.default_guidance_scale,
        seed=request.seed if request.seed is not None else random.randrange(MAX_SEED),
        image_b64=image_b64,
    )


def queued_resource(video_id: str, job: VideoJob, remixed_from: str | None = None) -> VideoResource:
    return VideoResource(
        id=video_id,
        model=job.model,
        status="queued",
        created_at=int(time.time()),
        prompt=job.prompt,
        size=f"{job.width}x{job.height}",
        seconds=seconds_text(job.num_frames, job.fps),
        remixed_from_video_id=remixed_from,
    )

"""Video in the worker: loading any diffusers video pipeline (AnimateDiff, Wan, LTX-Video,
CogVideoX, HunyuanVideo), rendering one job with progress and cancellation, and the rule that
keeps video from starving images (`ImagesFirst`).

Video jobs render on their own thread, one at a time. Between two denoising steps a video job
waits while any image call is running or waiting, so an image request sent while a long video
renders waits at most for the video step in flight (README, "Video").
"""

from __future__ import annotations

import base64
import inspect
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..clips import encode_mp4, spritesheet_jpeg, thumbnail_webp, to_pictures
from ..config import PipelineLevers
from ..protocol import VideoLimits, WorkerError
from ..video_protocol import VideoDone, VideoJob, VideoProgress

logger = logging.getLogger("hypergen.video")

DEMO_VIDEO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-video"
# Image-to-video pipelines made from a text-to-video one's components (`from_pipe`): LTX-Video
# conditions on the first frame's latents with the same transformer. Wan's and CogVideoX's I2V
# models are checkpoints of their own (other input channels): load one as the video model.
IMAGE_TO_VIDEO_FROM = {"LTXPipeline": "LTXImageToVideoPipeline"}
IMAGE_TO_VIDEO_CLASSES = (
    "WanImageToVideoPipeline",
    "LTXImageToVideoPipeline",
    "CogVideoXImageToVideoPipeline",
    "HunyuanVideoImageToVideoPipeline",
)
# Frames per second where a model's hypergen.json says nothing: what each family was trained at.
FAMILY_FPS = {"AnimateDiff": 8, "Wan": 16, "LTX": 24, "CogVideoX": 8, "HunyuanVideo": 24}
FALLBACK_FPS = 8


class ImagesFirst:
    """Image calls go first: a video job pauses between its steps while any image call runs or waits."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._image_calls = 0

    def image_call_started(self) -> None:
        with self._condition:
            self._image_calls += 1

    def image_call_ended(self) -> None:
        with self._condition:
            self._image_calls -= 1
            self._condition.notify_all()

    def wait_for_images(self, stop: Callable[[], bool], poll_s: float = 0.1) -> float:
        """Block the video thread while image calls are running; returns the seconds it waited."""
        started = time.perf_counter()
        with self._condition:
            while self._image_calls > 0 and not stop():
                self._condition.wait(poll_s)
        return time.perf_counter() - started


@dataclass
class LoadedVideo:
    name: str
    source: str
    device: str
    modes: dict[str, Any]
    limits: VideoLimits
    load_seconds: float
    levers: PipelineLevers = field(default_factory=PipelineLevers)


class NotAVideoPipeline(ValueError):
    pass


def _family_fps(pipe: Any) -> int:
    name = type(pipe).__name__
    return next((fps for family, fps in FAMILY_FPS.items() if name.startswith(family)), FALLBACK_FPS)


def _call_default(pipe: Any, name: str) -> Any:
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def frame_rule(pipe: Any) -> tuple[int, int]:
    """(step, offset): valid frame counts are offset + k·step. Causal video VAEs (Wan, LTX,
    CogVideoX, Hunyuan) encode the first frame alone and then `step` frames per latent frame."""
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio", None)
    return (int(temporal), 1) if temporal and int(temporal) > 1 else (1, 0)


def video_size_multiple(pipe: Any) -> int:
    """Both sides are multiples of the VAE's spatial factor times the transformer's patch size."""
    spatial = (
        getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_spatial_compression_ratio", None) or pipe.vae_scale_factor
    )
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    patch = getattr(getattr(denoiser, "config", None), "patch_size", None) or 1
    patch = patch[-1] if isinstance(patch, list | tuple) else patch
    return max(8, int(spatial) * int(patch))


def video_native_size(pipe: Any, defaults: dict[str, Any]) -> tuple[int, int]:
    if "width" in defaults and "height" in defaults:
        return int(defaults["width"]), int(defaults["height"])
    width, height = _call_default(pipe, "width"), _call_default(pipe, "height")
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    unet = getattr(pipe, "unet", None)  # AnimateDiff: the image UNet's own size
    side = int(unet.config.sample_size) * int(pipe.vae_scale_factor) if unet is not None else 512
    return side, side


def video_limits(name: str, pipe: Any, modes: dict[str, Any], defaults: dict[str, Any]) -> VideoLimits:
    step, offset = frame_rule(pipe)
    width, height = video_native_size(pipe, defaults)
    default_frames = int(defaults.get("num_frames") or _call_default(pipe, "num_frames") or 16)
    max_frames = int(defaults.get("max_frames", default_frames))
    native_side = max(width, height)
    return VideoLimits(
        id=name,
        native_width=width,
        native_height=height,
        min_side=min(64, native_side),
        max_side=int(defaults.get("max_side", native_side)),
        default_steps=int(defaults.get("num_inference_steps", _call_default(pipe, "num_inference_steps") or 50)),
        default_guidance_scale=float(defaults.get("guidance_scale", _call_default(pipe, "guidance_scale") or 5.0)),
        modes=list(modes),
        size_multiple=video_size_multiple(pipe),
        fps=int(defaults.get("fps", _family_fps(pipe))),
        default_frames=default_frames,
        max_frames=max(max_frames, default_frames),
        frame_step=step,
        frame_offset=offset,
    )


def load_video_model(name: str, source: str, device: str | None = None, levers: PipelineLevers | None = None) -> LoadedVideo:
    """Any diffusers video pipeline from a directory or Hub id; LTX-Video also gets image-to-video."""
    import diffusers
    from diffusers import DiffusionPipeline

    from .pipelines import apply_levers, choose_device, choose_dtype, read_model_defaults

    started = time.perf_counter()
    device = choose_device(device)
    pipe = DiffusionPipeline.from_pretrained(source, dtype=choose_dtype(device))
    if "num_frames" not in inspect.signature(type(pipe).__call__).parameters:
        raise NotAVideoPipeline(
            f"video model '{name}' ({source}) is a {type(pipe).__name__}, not a video pipeline (one whose call takes num_frames)"
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    levers = levers or PipelineLevers()
    apply_levers(pipe, levers)
    kind = type(pipe).__name__
    modes: dict[str, Any] = {"image-to-video" if kind in IMAGE_TO_VIDEO_CLASSES else "text-to-video": pipe}
    if kind in IMAGE_TO_VIDEO_FROM:
        modes["image-to-video"] = getattr(diffusers, IMAGE_TO_VIDEO_FROM[kind]).from_pipe(pipe)
        modes["image-to-video"].set_progress_bar_config(disable=True)
    limits = video_limits(name, pipe, modes, read_model_defaults(source))
    return LoadedVideo(name, source, device, modes, limits, time.perf_counter() - started, levers)


@dataclass
class VideoCall:
    """The job rendering now (shown in the worker's status)."""

    job: VideoJob
    step: int = 0
    cancelled: bool = False
    started_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        job = self.job
        return {"job": job.job_id, "request_id": job.request_id, "frames": job.num_frames, "size": f"{job.width}x{job.height}",
                "steps": job.num_inference_steps, "step": self.step, "started_at": self.started_at}  # fmt: skip


def render_frames(loaded: LoadedVideo, call: VideoCall, gate: ImagesFirst, emit: Callable[[VideoProgress], None]) -> list[Any]:
    """Run the pipeline for one job; its frames as PIL images. Between steps: progress, the
    images-first pause, and cancellation (`pipe._interrupt`, read by every diffusers loop)."""
    import torch
    from PIL import Image

    from .pipelines import call_context

    job = call.job
    pipe = loaded.modes[job.mode]
    accepted = inspect.signature(type(pipe).__call__).parameters
    arguments: dict[str, Any] = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "num_frames": job.num_frames,
        "height": job.height,
        "width": job.width,
        "num_inference_steps": job.num_inference_steps,
        "guidance_scale": job.guidance_scale,
        "generator": torch.Generator(device="cpu").manual_seed(job.seed),
        "output_type": "pil",
        "frame_rate": job.fps,  # LTX-Video conditions on it
    }
    if job.image_b64 is not None:
        arguments["image"] = Image.open(io.BytesIO(base64.b64decode(job.image_b64))).convert("RGB")

    def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        call.step = index + 1
        emit(VideoProgress(step=index + 1, total_steps=job.num_inference_steps))
        gate.wait_for_images(lambda: call.cancelled)
        if call.cancelled:
            pipe._interrupt = True
        return {}

    arguments["callback_on_step_end"] = on_step_end
    arguments = {key: value for key, value in arguments.items() if key in accepted and value is not None}
    with call_context(loaded.levers), torch.inference_mode():
        output = pipe(**arguments)
    frames = output.frames[0]
    return to_pictures(frames) if not isinstance(frames, list) else [frame.convert("RGB") for frame in frames]


def encode_video(frames: list[Any], fps: int, render_s: float) -> VideoDone:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return VideoDone(
        mp4_b64=b64(encode_mp4(frames, fps)),
        thumbnail_b64=b64(thumbnail_webp(frames)),
        spritesheet_b64=b64(spritesheet_jpeg(frames)),
        frames=len(frames),
        render_s=render_s,
    )


def failed(message: str, status: int = 500, param: str | None = None) -> VideoDone:
    return VideoDone(error=WorkerError(message=message, status=status, param=param))

"""The worker's video side: loads the video model (after the image models), renders one job at a
time on its own thread, reports progress, and cancels on request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..config import Settings
from ..metrics import metrics
from ..video_protocol import VideoDone, VideoEvent, VideoJob
from .models import locate_model
from .video import ImagesFirst, LoadedVideo, VideoCall, encode_video, failed, load_video_model, render_frames

logger = logging.getLogger("hypergen.video")

MAX_REMEMBERED_CANCELS = 1000


class VideoRenderer:
    """One video job at a time, on a thread of its own (image calls keep theirs)."""

    def __init__(self, settings: Settings, gate: ImagesFirst, after: Future[Any] | None = None) -> None:
        self.settings = settings
        self.gate = gate
        self.loaded: LoadedVideo | None = None
        self.error: str | None = None
        self.current: VideoCall | None = None
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # jobs cancelled before they started
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypergen-video")
        self.source = settings.video_model_source
        if self.source is not None:
            self._executor.submit(self._load, after)

    def _load(self, after: Future[Any] | None) -> None:
        if after is not None:
            after.result()  # the image models first: they make the worker ready
        name = self.settings.served_video_model_name or "video"
        try:
            self.loaded = load_video_model(name, locate_model(str(self.source)), self.settings.device, self.settings.levers)
        except Exception as error:  # reported through /health; images keep working
            self.error = f"{type(error).__name__}: {error}"
            logger.error("video model '%s' failed to load: %s", name, self.error, exc_info=True)
            return
        limits = self.loaded.limits
        logger.info(
            "video model '%s' loaded from %s in %.2fs; %dx%d, %d frames at %d fps by default (at most %d), modes %s",
            name, self.source, self.loaded.load_seconds, limits.native_width, limits.native_height,
            limits.default_frames, limits.fps, limits.max_frames, ", ".join(limits.modes),
        )  # fmt: skip

    def status_fields(self) -> dict[str, Any]:
        """WorkerStatus's `video`, `video_detail` and `video_busy`."""
        if self.source is None:
            detail = "no video model is configured (HYPERGEN_VIDEO_MODEL)"
        elif self.error:
            detail = f"the video model failed to load: {self.error}"
        else:
            detail = "" if self.loaded else "loading the video model"
        return {
            "video": self.loaded.limits if self.loaded else None,
            "video_detail": detail,
            "video_busy": self.current.as_dict() if self.current else None,
        }

    async def render(self, job: VideoJob) -> AsyncIterator[VideoEvent]:
        """Progress events, then the files (or the error). Leaving early cancels the job."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[VideoEvent] = asyncio.Queue()

        def emit(event: VideoEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the listener's event loop is gone: nobody will receive this video
                self.cancel(job.job_id)

        loop.run_in_executor(self._executor, self._run, job, emit)
        finished = False
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, VideoDone):
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(job.job_id)

    def cancel(self, job_id: str) -> None:
        """Interrupt the job at its next step, or drop it before it starts."""
        current = self.current
        if current is not None and current.job.job_id == job_id:
            current.cancelled = True
            return
        self._cancelled[job_id] = None
        while len(self._cancelled) > MAX_REMEMBERED_CANCELS:
            self._cancelled.popitem(last=False)

    def _run(self, job: VideoJob, emit: Any) -> None:
        if job.job_id in self._cancelled:
            del self._cancelled[job.job_id]
            emit(failed("The video job was cancelled before it started.", status=499))
            return
        if self.loaded is None:
            emit(failed("The video model is not loaded.", status=503))
            return
        if job.mode not in self.loaded.modes:
            emit(failed(f"video model '{self.loaded.name}' has no {job.mode} pipeline", status=400, param="input_reference"))
            return
        call = VideoCall(job)
        self.current = call
        started = time.perf_counter()
        try:
            frames = render_frames(self.loaded, call, self.gate, emit)
            if call.cancelled:
                emit(failed("The video job was cancelled.", status=499))
                return
            render_s = time.perf_counter() - started
            metrics().video_render_seconds.observe(render_s)
            metrics().video_frames.inc(len(frames))
            emit(encode_video(frames, job.fps, render_s))
        except Exception as error:  # this job fails alone; the worker keeps serving
            logger.exception("video job %s (request %s) failed", job.job_id, job.request_id)
            emit(failed(f"{type(error).__name__}: {error}"))
        finally:
            self.current = None

"""The video serving layer: OpenAI's asynchronous video jobs for the routes. A created job is
validated against the served video model, charged, recorded (`VideoStore`, SQLite) and queued
(`VideoQueue` runs it); reads, downloads and deletes see only the caller's own videos."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from starlette.concurrency import run_in_threadpool

from ..config import Settings
from ..errors import OpenAIError, model_not_found, not_ready_error
from ..metrics import metrics
from ..protocol import VideoLimits, WorkerStatus
from ..video_protocol import VideoCreateRequest, VideoJob, VideoJobError, VideoRemixRequest, VideoResource
from .pool import WorkerPool
from .readiness import Readiness
from .uploads import fit_upload, open_upload
from .video_jobs import build_video_job, new_video_id, queued_resource, resolve_video_size
from .video_queue import VideoQueue
from .video_store import VideoDirectoryInUse, VideoStore

logger = logging.getLogger("hypergen.videos")

VIDEO_ID = re.compile(r"video_[0-9a-f]{32}")


def video_not_found(video_id: str) -> OpenAIError:
    return OpenAIError(404, f"The video '{video_id}' does not exist (or has expired, or was deleted).", param="video_id", code="not_found")


class VideoServing:
    def __init__(self, settings: Settings, pool: WorkerPool, readiness: Readiness, store: VideoStore | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.readiness = readiness
        self.model_name = settings.served_video_model_name
        self.unavailable: str | None = None  # why this server keeps no videos
        self.store = store
        if store is None and self.model_name is not None:
            directory = settings.videos_path
            try:
                self.store = VideoStore(settings.video_db or directory / "videos.sqlite3", directory)
            except (VideoDirectoryInUse, OSError, sqlite3.Error) as error:
                self.unavailable = str(error)
                logger.error("videos are off on this server: %s", error)
        self.queue = VideoQueue(settings, pool, self.store) if self.store is not None else None  # None: no videos here

    def start(self) -> None:
        """In the API's event loop: recover what a previous server left, start the runners."""
        if self.queue is not None:
            self.queue.start()

    # --- creating ------------------------------------------------------------------------------

    async def limits(self) -> VideoLimits:
        """The served video model's limits; 404 when there is none, 503 while it loads."""
        self.require_store()
        status = await self.readiness.status()
        if status.video is None:
            metrics().rejected.labels(reason="not_ready").inc()
            raise not_ready_error(f"The video model is not ready: {status.video_detail or status.detail}.")
        return status.video

    async def create(
        self, request: VideoCreateRequest, reference: bytes | None, owner: str, request_id: str, charge: Callable[[int], None]
    ) -> VideoResource:
        """Validate against the model, charge the caller its frames (`charge`, a 429 refuses), queue."""
        limits = await self.limits()
        if request.model is not None and request.model != limits.id:
            raise model_not_found(request.model, [limits.id])
        image = None
        if reference is not None:
            decoded = await run_in_threadpool(open_upload, reference, "input_reference", self.settings.max_upload_pixels)
            image = fit_upload(decoded, None, resolve_video_size(request, limits)).image
        job = build_video_job(request, limits, request_id, image)
        charge(job.num_frames)
        return self.enqueue(job, owner)

    def enqueue(self, job: VideoJob, owner: str, remixed_from: str | None = None) -> VideoResource:
        if self.require_store().count_unfinished() >= self.settings.max_video_queue:
            metrics().rejected.labels(reason="video_queue_full").inc()
            raise OpenAIError(
                503, f"The server is busy: {self.settings.max_video_queue} video jobs are already queued or rendering. Retry later.",
                type="server_error", code="queue_full", headers={"Retry-After": "30"},
            )  # fmt: skip
        if self.queue is None or not self.queue.started:
            raise not_ready_error("The video runner has not started yet.")
        resource = queued_resource(new_video_id(), job, remixed_from)
        self.require_store().add(resource, job, owner)
        self.queue.put(resource.id)
        logger.info("video %s queued (request %s): %s, %d frames at %d fps, %d steps", resource.id, job.request_id,
                    resource.size, job.num_frames, job.fps, job.num_inference_steps)  # fmt: skip
        return resource

    async def remix(
        self, video_id: str, request: VideoRemixRequest, owner: str, request_id: str, charge: Callable[[int], None]
    ) -> VideoResource:
        """The completed video's job again with the new prompt (and any extras given), same seed unless given."""
        source = self.get(video_id, owner)
        if source.status != "completed":
            raise OpenAIError(
                400, f"Only a completed video can be remixed; '{video_id}' is {source.status}.", param="video_id", code="invalid_value"
            )
        job = self.require_store().job(video_id)
        assert job is not None
        served = (await self.limits()).id
        if job.model != served:
            raise OpenAIError(
                400, f"'{video_id}' was made by model '{job.model}', which this server no longer serves ('{served}' now).",
                param="video_id", code="invalid_value",
            )  # fmt: skip
        changes = request.model_dump(exclude_none=True)
        remixed = VideoJob.model_validate({**job.model_dump(exclude={"job_id", "admitted_at"}), **changes, "request_id": request_id})
        charge(remixed.num_frames)
        return self.enqueue(remixed, owner, remixed_from=video_id)

    # --- reading -------------------------------------------------------------------------------

    def require_store(self) -> VideoStore:
        """The store; 404 when this server serves no video model, 503 when its directory is unusable."""
        if self.model_name is None:
            raise OpenAIError(404, "This server serves no video model (set HYPERGEN_VIDEO_MODEL).", param="model", code="model_not_found")
        if self.unavailable:
            raise OpenAIError(503, f"Videos are unavailable on this server: {self.unavailable}.", type="server_error", code="not_ready")
        assert self.store is not None
        return self.store

    def page(self, owner: str, limit: int, order: str, after: str | None) -> tuple[list[VideoResource], bool]:
        return self.require_store().page(owner, limit, order, after)

    def get(self, video_id: str, owner: str) -> VideoResource:
        self.require_store()
        if not VIDEO_ID.fullmatch(video_id):  # only ids this server made are ever looked up
            raise video_not_found(video_id[:100])
        resource = self.require_store().get(video_id, owner)
        if resource is None:
            raise video_not_found(video_id)
        return resource

    def content(self, video_id: str, owner: str, variant: str) -> tuple[str, str]:
        resource = self.get(video_id, owner)
        found = self.require_store().file(video_id, variant) if resource.status == "completed" else None
        if found is None:
            raise OpenAIError(
                404, f"The video '{video_id}' is {resource.status}: it has no {variant} to download.", param="video_id", code="not_found"
            )
        return str(found[0]), found[1]

    async def delete(self, video_id: str, owner: str) -> None:
        """Delete the record and files; a job still rendering is cancelled at its next step."""
        resource = self.get(video_id, owner)
        job = self.require_store().job(video_id)
        await run_in_threadpool(self.require_store().delete, video_id)
        assert self.queue is not None
        self.queue.notify(
            resource.model_copy(update={"status": "failed", "error": VideoJobError(code="deleted", message="The video was deleted.")})
        )
        if resource.status == "in_progress" and job is not None:
            await self.pool.cancel_video(job.job_id)

    async def watch(self, video_id: str, owner: str) -> AsyncIterator[VideoResource]:
        """The video now, then each change, until it is completed or failed."""
        resource = self.get(video_id, owner)
        assert self.queue is not None
        async with aclosing(self.queue.watch(resource)) as states:
            async for state in states:
                yield state

    def health(self, status: WorkerStatus) -> dict[str, object]:
        """/health's `video`: whether the model is ready, the jobs waiting, the one rendering."""
        if self.unavailable:
            return {"model": self.model_name, "ready": False, "detail": self.unavailable}
        body: dict[str, object] = {
            "model": self.model_name,
            "ready": status.video is not None,
            "unfinished": self.require_store().count_unfinished(),
        }
        if status.video is None:
            body["detail"] = status.video_detail or status.detail
        if status.video_busy:
            body["rendering"] = {**status.video_busy, "running_s": round(time.time() - status.video_busy["started_at"], 1)}
        return body

"""The video serving layer: OpenAI's asynchronous video jobs. A created job is recorded
(`VideoStore`, SQLite) and queued; runners send queued jobs to the workers one per worker at a
time, follow their progress and keep their files; watchers (the sync route, the WebSocket) see
each change. At start, jobs a previous server left queued run again and those it left rendering
are failed (`interrupted`)."""

from __future__ import annotations

import asyncio
import base64
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
from ..video_protocol import VideoCreateRequest, VideoDone, VideoJob, VideoJobError, VideoProgress, VideoRemixRequest, VideoResource
from .pool import WorkerPool
from .readiness import Readiness
from .uploads import fit_upload, open_upload
from .video_jobs import build_video_job, new_video_id, queued_resource, resolve_video_size
from .video_store import VideoDirectoryInUse, VideoStore

logger = logging.getLogger("hypergen.videos")

INTERRUPTED = VideoJobError(code="interrupted", message="The server stopped while this video was rendering; create it again.")
EXPIRY_SWEEP_S = 60.0
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
        self.store: VideoStore = store  # type: ignore[assignment]  (None only with `unavailable` set)
        if store is None and self.model_name is not None:
            directory = settings.videos_path
            try:
                self.store = VideoStore(settings.video_db or directory / "videos.sqlite3", directory)
            except (VideoDirectoryInUse, OSError, sqlite3.Error) as error:
                self.unavailable = str(error)
                logger.error("videos are off on this server: %s", error)
        self._queue: asyncio.Queue[str] | None = None
        self._watchers: dict[str, set[asyncio.Queue[VideoResource]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # --- running -------------------------------------------------------------------------------

    def start(self) -> None:
        """In the API's event loop: recover what a previous server left, start the runners."""
        if self.model_name is None or self.unavailable:
            return
        self._queue = asyncio.Queue()
        for video_id in self.store.recover(INTERRUPTED):
            self._queue.put_nowait(video_id)
        metrics().video_queue.set(self._queue.qsize())
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run_jobs()) for _ in range(self.pool.size)]
        self._tasks.append(loop.create_task(self._expire_periodically()))

    async def _expire_periodically(self) -> None:
        while True:
            await run_in_threadpool(self.store.expire)
            await asyncio.sleep(EXPIRY_SWEEP_S)

    async def _run_jobs(self) -> None:
        assert self._queue is not None
        while True:
            video_id = await self._queue.get()
            try:
                await self._render(video_id)
            except Exception:  # one job's failure never stops the runner
                logger.exception("video %s could not be rendered", video_id)
            finally:
                metrics().video_queue.dec()

    async def _render(self, video_id: str) -> None:
        job, resource = self.store.job(video_id), self.store.get(video_id, None)
        if job is None or resource is None:
            return  # deleted while queued
        resource = resource.model_copy(update={"status": "in_progress", "progress": 0})
        self._save(resource)
        try:
            async with aclosing(self.pool.render_video(job)) as events:
                async for event in events:
                    if isinstance(event, VideoProgress) and event.percent != resource.progress:
                        resource = resource.model_copy(update={"progress": event.percent})
                        self._save(resource)
                    elif isinstance(event, VideoDone):
                        await self._finish(resource, event)
                        return
            raise RuntimeError("the worker's stream ended without a result")
        except Exception as error:
            logger.error("video %s (request %s): the worker failed (%s: %s)", video_id, job.request_id, type(error).__name__, error)
            lost = VideoJobError(code="worker_failed", message="The worker rendering this video stopped; create it again.")
            self._fail(resource, lost)

    async def _finish(self, resource: VideoResource, done: VideoDone) -> None:
        if done.error is not None:
            code = {499: "cancelled", 400: "invalid_request"}.get(done.error.status, "generation_failed")
            shown = done.error.message if done.error.status < 500 else "The video generation failed; the server logged the cause."
            if done.error.status >= 500:
                logger.error("video %s failed: %s", resource.id, done.error.message)
            self._fail(resource, VideoJobError(code=code, message=shown))
            return
        files = {"video": done.mp4_b64, "thumbnail": done.thumbnail_b64, "spritesheet": done.spritesheet_b64}
        await run_in_threadpool(self.store.write_files, resource.id, {variant: base64.b64decode(data) for variant, data in files.items()})
        now = int(time.time())
        completed = resource.model_copy(
            update={"status": "completed", "progress": 100, "completed_at": now, "expires_at": now + int(self.settings.video_ttl)}
        )
        if self._save(completed) is None:  # deleted while it rendered: its files go too
            await run_in_threadpool(self.store.delete, resource.id)
        metrics().video_jobs.labels(status="completed").inc()

    def _fail(self, resource: VideoResource, error: VideoJobError) -> None:
        expires = int(time.time() + self.settings.video_ttl)
        self._save(resource.model_copy(update={"status": "failed", "error": error, "expires_at": expires}))
        metrics().video_jobs.labels(status="failed").inc()

    def _save(self, resource: VideoResource) -> VideoResource | None:
        """Store a new state and show it to the watchers; None if the video was deleted."""
        if not self.store.update(resource):
            return None
        self._notify(resource)
        return resource

    def _notify(self, resource: VideoResource) -> None:
        for watcher in self._watchers.get(resource.id, ()):
            watcher.put_nowait(resource)

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
        if self.store.count_unfinished() >= self.settings.max_video_queue:
            metrics().rejected.labels(reason="video_queue_full").inc()
            raise OpenAIError(
                503, f"The server is busy: {self.settings.max_video_queue} video jobs are already queued or rendering. Retry later.",
                type="server_error", code="queue_full", headers={"Retry-After": "30"},
            )  # fmt: skip
        if self._queue is None:
            raise not_ready_error("The video runner has not started yet.")
        resource = queued_resource(new_video_id(), job, remixed_from)
        self.store.add(resource, job, owner)
        self._queue.put_nowait(resource.id)
        metrics().video_queue.inc()
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
        job = self.store.job(video_id)
        assert job is not None
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
        return self.store

    def page(self, owner: str, limit: int, order: str, after: str | None) -> tuple[list[VideoResource], bool]:
        return self.require_store().page(owner, limit, order, after)

    def get(self, video_id: str, owner: str) -> VideoResource:
        self.require_store()
        if not VIDEO_ID.fullmatch(video_id):  # only ids this server made are ever looked up
            raise video_not_found(video_id[:100])
        resource = self.store.get(video_id, owner)
        if resource is None:
            raise video_not_found(video_id)
        return resource

    def content(self, video_id: str, owner: str, variant: str) -> tuple[str, str]:
        resource = self.get(video_id, owner)
        found = self.store.file(video_id, variant) if resource.status == "completed" else None
        if found is None:
            raise OpenAIError(
                404, f"The video '{video_id}' is {resource.status}: it has no {variant} to download.", param="video_id", code="not_found"
            )
        return str(found[0]), found[1]

    async def delete(self, video_id: str, owner: str) -> None:
        """Delete the record and files; a job still rendering is cancelled at its next step."""
        resource = self.get(video_id, owner)
        job = self.store.job(video_id)
        await run_in_threadpool(self.store.delete, video_id)
        self._notify(
            resource.model_copy(update={"status": "failed", "error": VideoJobError(code="deleted", message="The video was deleted.")})
        )
        if resource.status == "in_progress" and job is not None:
            await self.pool.cancel_video(job.job_id)

    async def watch(self, video_id: str, owner: str) -> AsyncIterator[VideoResource]:
        """The video now, then each change, until it is completed or failed."""
        watcher: asyncio.Queue[VideoResource] = asyncio.Queue()
        self._watchers.setdefault(video_id, set()).add(watcher)
        try:
            resource = self.get(video_id, owner)
            while True:
                yield resource
                if resource.status in ("completed", "failed"):
                    return
                resource = await watcher.get()
        finally:
            self._watchers[video_id].discard(watcher)
            if not self._watchers[video_id]:
                del self._watchers[video_id]

    def health(self, status: WorkerStatus) -> dict[str, object]:
        """/health's `video`: whether the model is ready, the jobs waiting, the one rendering."""
        if self.unavailable:
            return {"model": self.model_name, "ready": False, "detail": self.unavailable}
        body: dict[str, object] = {"model": self.model_name, "ready": status.video is not None, "unfinished": self.store.count_unfinished()}
        if status.video is None:
            body["detail"] = status.video_detail or status.detail
        if status.video_busy:
            body["rendering"] = {**status.video_busy, "running_s": round(time.time() - status.video_busy["started_at"], 1)}
        return body

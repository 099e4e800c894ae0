"""Running video jobs in the API process: a FIFO of video ids, one runner per worker that sends
each job to the workers, follows its progress into the store and keeps its files, watchers that
see every change (the sync route, the WebSocket), and the expiry sweep. At start, jobs a
previous server left queued run again and those it left rendering are failed (`interrupted`)."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.concurrency import run_in_threadpool

from ..config import Settings
from ..metrics import metrics
from ..video_protocol import VideoDone, VideoJobError, VideoProgress, VideoResource
from .pool import WorkerPool
from .video_store import VideoStore

logger = logging.getLogger("hypergen.videos")

INTERRUPTED = VideoJobError(code="interrupted", message="The server stopped while this video was rendering; create it again.")
EXPIRY_SWEEP_S = 60.0


class VideoQueue:
    """The video jobs waiting and rendering, and who watches them."""

    def __init__(self, settings: Settings, pool: WorkerPool, store: VideoStore) -> None:
        self.settings = settings
        self.pool = pool
        self.store = store
        self._queue: asyncio.Queue[str] | None = None
        self._watchers: dict[str, set[asyncio.Queue[VideoResource]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def started(self) -> bool:
        return self._queue is not None

    def put(self, video_id: str) -> None:
        assert self._queue is not None
        self._queue.put_nowait(video_id)
        metrics().video_queue.inc()

    def start(self) -> None:
        """In the API's event loop: recover what a previous server left, start the runners."""
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
        done: VideoDone | None = None
        try:
            async with aclosing(self.pool.render_video(job)) as events:
                async for event in events:
                    if isinstance(event, VideoProgress) and event.percent != resource.progress:
                        resource = resource.model_copy(update={"progress": event.percent})
                        self._save(resource)
                    elif isinstance(event, VideoDone):
                        done = event
                        break
            if done is None:
                raise RuntimeError("the worker's stream ended without a result")
        except Exception as error:
            logger.error("video %s (request %s): the worker failed (%s: %s)", video_id, job.request_id, type(error).__name__, error)
            lost = VideoJobError(code="worker_failed", message="The worker rendering this video stopped; create it again.")
            self._fail(resource, lost)
            return
        await self._finish(resource, done)  # outside the try: a failure to keep the files is not the worker's

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
            return
        metrics().video_jobs.labels(status="completed").inc()

    def _fail(self, resource: VideoResource, error: VideoJobError) -> None:
        expires = int(time.time() + self.settings.video_ttl)
        self._save(resource.model_copy(update={"status": "failed", "error": error, "expires_at": expires}))
        metrics().video_jobs.labels(status="failed").inc()

    def _save(self, resource: VideoResource) -> VideoResource | None:
        """Store a new state and show it to the watchers; None if the video was deleted."""
        if not self.store.update(resource):
            return None
        self.notify(resource)
        return resource

    def notify(self, resource: VideoResource) -> None:
        for watcher in self._watchers.get(resource.id, ()):
            watcher.put_nowait(resource)

    async def watch(self, resource: VideoResource) -> AsyncIterator[VideoResource]:
        """`resource`, then each change of it, until it is completed or failed."""
        watcher: asyncio.Queue[VideoResource] = asyncio.Queue()
        self._watchers.setdefault(resource.id, set()).add(watcher)
        try:
            while True:
                yield resource
                if resource.status in ("completed", "failed"):
                    return
                resource = await watcher.get()
        finally:
            self._watchers[resource.id].discard(watcher)
            if not self._watchers[resource.id]:
                del self._watchers[resource.id]

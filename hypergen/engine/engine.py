"""The diffusion engine: the only owner of torch, the pipelines and the device.

`DiffusionWorker` (hypergen/service.py) wraps one engine per worker process. Loading and every
pipeline call run on one dedicated thread: torch's intra-op pool is per calling thread, and
hopping threads between calls oversubscribes the CPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ..config import Settings
from ..protocol import (
    DoneEvent,
    GenerationJob,
    GenerationResult,
    ImageEvent,
    LoraCommand,
    LoraReply,
    WorkerEvent,
    WorkerStatus,
)
from ..video_protocol import VideoEvent, VideoJob
from .calls import BatchRunner
from .models import ServedModels
from .previews import StreamTicket
from .streams import JobTable
from .video import ImagesFirst
from .video_runner import VideoRenderer

logger = logging.getLogger("hypergen.engine")


class DiffusionEngine:
    """Loads the configured models in the background and runs batches of jobs on them."""

    def __init__(self, settings: Settings, model_path: str | None = None) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypergen-pipeline")
        self.models = ServedModels(settings, model_path)
        self.jobs = JobTable()
        self.runner = BatchRunner(self.models, self.jobs, settings.max_batch_size)
        self._loading: Future[None] = self._executor.submit(self.models.load)
        # Video renders on a thread of its own, pausing between steps while image calls run.
        self.images_first = ImagesFirst()
        self.video = VideoRenderer(settings, self.images_first, after=self._loading)

    def status(self) -> WorkerStatus:
        models = self.models
        if models.error:
            return WorkerStatus(ready=False, detail=f"model failed to load: {models.error}")
        if not models.ready:
            return WorkerStatus(ready=False, detail="loading the model")
        return WorkerStatus(
            **self.video.status_fields(),
            ready=True,
            device=models.default.device,
            dtype=str(models.default.dtype).replace("torch.", ""),
            models=models.limits(),
            pid=os.getpid(),
            memory=models.residency.snapshot(),
            busy=[dict(busy)] if (busy := self.runner.busy) else [],
        )

    async def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        """Run a batch on the pipeline thread; one result per job, in order."""
        self.images_first.image_call_started()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, list(jobs))
        finally:
            self.images_first.image_call_ended()

    def run_batch(self, jobs: list[GenerationJob], tickets: dict[int, StreamTicket] | None = None) -> list[GenerationResult]:
        """On the pipeline thread (or a test's): see `BatchRunner.run`."""
        return self.runner.run(jobs, tickets)

    async def generate_stream(self, job: GenerationJob, partial_images: int, progress: bool = False) -> AsyncIterator[WorkerEvent]:
        """Events for one streaming job: `progress` per step (if asked), `partial` images, then
        one `image` per image and `done` (its result's `error` set if it failed). Streaming jobs
        waiting together run as one batch. Closing the iterator cancels the job (dropped if it
        has not started; interrupted at the next step if everyone in its call has gone)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[WorkerEvent] = asyncio.Queue()
        ticket = StreamTicket(job, partial_images, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), progress)
        self.jobs.open_stream(ticket)
        self.images_first.image_call_started()
        loop.run_in_executor(self._executor, self._drain_streams)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, DoneEvent):
                    return
        finally:
            self.images_first.image_call_ended()
            self.jobs.close_stream(ticket)

    def cancel(self, job_id: str) -> None:
        """The API gave up on a job (its client left, or it timed out): drop it if it has not
        started; interrupt its pipeline call at the next step once nobody in it is left. The API
        says so explicitly: closing a BentoML stream early does not close its HTTP response."""
        self.jobs.cancel(job_id)

    def _drain_streams(self) -> None:
        """On the pipeline thread: run every streaming job waiting now, as one batch."""
        tickets = self.jobs.take_pending()
        if not tickets:
            return
        results = self.run_batch([ticket.job for ticket in tickets], dict(enumerate(tickets)))
        for ticket, result in zip(tickets, results):
            for index, image in enumerate(result.images_b64 if result.error is None else []):
                ticket.emit(ImageEvent(image_index=index, b64_json=image))
            ticket.emit(DoneEvent(result=result.model_copy(update={"images_b64": []})))

    def render_video(self, job: VideoJob) -> AsyncIterator[VideoEvent]:
        """Progress events, then the video's files or its error (`VideoRenderer.render`)."""
        return self.video.render(job)

    def cancel_video(self, job_id: str) -> None:
        self.video.cancel(job_id)

    async def manage_loras(self, command: LoraCommand) -> LoraReply:
        """List, load or unload adapters, on the pipeline thread (never during a pipeline call)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.models.manage_loras, command)

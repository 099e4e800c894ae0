"""The diffusion workers (one per GPU) behind one client, balanced by their load; a pool of one
when there is a single worker, so readiness and batcher warm-up take one path either way.

BentoML runs the processes of one service behind a shared socket, where the kernel, not the
load, decides who gets a connection. HyperGen declares one worker *service* per GPU instead
(BentoML pins each to its own device), and this pool picks the worker for every request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from ..protocol import GenerationJob, GenerationResult, LoraCommand, LoraReply, WorkerEvent, WorkerStatus
from ..video_protocol import VideoEvent, VideoJob

logger = logging.getLogger("hypergen.pool")

# A worker that does not answer its status within this is counted as not ready, so one hung
# worker cannot hold up the pool's answer (the API gives the whole call 3 s).
WORKER_STATUS_TIMEOUT_S = 2.0
MAX_REMEMBERED_ABANDONED = 1000


@dataclass
class WorkerLoad:
    """What the pool knows about one worker; shown in `/health`."""

    name: str
    ready: bool = False  # until a status check says so and its batcher is warm
    video: bool = False  # whether its video model is loaded
    in_flight_images: int = 0
    served: int = 0
    failed: int = 0
    device: str | None = None
    pid: int | None = None
    detail: str = ""
    catching_up: asyncio.Task[None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ready": self.ready,
            "device": self.device,
            "pid": self.pid,
            "in_flight_images": self.in_flight_images,
            "served": self.served,
            "failed": self.failed,
            **({"detail": self.detail} if self.detail else {}),
        }


class WorkerPool:
    """A worker client over several workers.

    Each request goes to the ready worker with the fewest images in flight (ties in turn; with
    none ready, to any);
    a cancel follows its request to the worker running it; adapter loads and unloads reach every
    worker, and are replayed on a worker that comes back after a restart. A worker whose call
    fails is skipped until its status says it is ready again: only its in-flight requests fail.
    A worker seen ready for the first time (at start-up, or after a restart) first has its batcher
    warmed with one-step calls, so the pool does the API's warm-up for each of its workers.
    """

    def __init__(self, workers: Sequence[Any], names: Sequence[str], warm_up_calls: int = 12) -> None:
        if len(workers) != len(names) or not workers:
            raise ValueError("a pool needs one name per worker, and at least one worker")
        self._workers = list(workers)
        self.loads = [WorkerLoad(name) for name in names]
        self._owner: dict[str, int] = {}  # job id → index of the worker running it
        # Requests whose caller gave up (timeout, disconnect): the API's cancel comes after the
        # call was abandoned here, and must still find the worker that runs the job.
        self._abandoned: OrderedDict[str, int] = OrderedDict()
        self._turn = 0
        self._adapters: dict[str, LoraCommand] = {}  # adapters loaded at run time, by name
        self.warm_up_calls = warm_up_calls  # one-step calls that warm a restarted worker's batcher
        self._rendering: list[int] = []  # the worker of each video job rendering now
        self._video_owner: dict[str, int] = {}  # video job id → its worker

    @property
    def size(self) -> int:
        return len(self._workers)

    def choose(self, images: int) -> int:
        """The worker for the next request: fewest images in flight among the ready ones."""
        candidates = [index for index, load in enumerate(self.loads) if load.ready] or list(range(self.size))
        # Among equally loaded workers, start after the last one chosen, so idle workers take turns.
        index = min(candidates, key=lambda i: (self.loads[i].in_flight_images, (i - self._turn) % self.size))
        self._turn = (index + 1) % self.size
        self.loads[index].in_flight_images += images
        return index

    def _release(self, index: int, images: int, job_ids: Sequence[str], outcome: str) -> None:
        load = self.loads[index]
        load.in_flight_images -= images
        if outcome == "served":
            load.served += len(job_ids)
        elif outcome == "failed":
            load.failed += len(job_ids)
        for job_id in job_ids:
            self._owner.pop(job_id, None)
            if outcome == "cancelled":
                self._abandoned[job_id] = index
                while len(self._abandoned) > MAX_REMEMBERED_ABANDONED:
                    self._abandoned.popitem(last=False)

    def _mark_failed(self, index: int, error: BaseException) -> None:
        load = self.loads[index]
        if load.ready:
            logger.warning("worker %s failed a call (%s): skipping it until it reports ready", load.name, type(error).__name__)
        load.ready = False
        load.detail = f"a call failed ({type(error).__name__})"

    async def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        images = sum(job.n for job in jobs)
        index = self.choose(images)
        job_ids = [job.job_id for job in jobs]
        self._owner.update(dict.fromkeys(job_ids, index))
        outcome = "cancelled"
        try:
            results = await self._workers[index].generate(jobs)
            outcome = "served"
            return results
        except Exception as error:
            outcome = "failed"
            self._mark_failed(index, error)
            raise
        finally:
            self._release(index, images, job_ids, outcome)

    async def generate_stream(self, job: GenerationJob, partial_images: int, progress: bool = False) -> AsyncIterator[WorkerEvent]:
        index = self.choose(job.n)
        self._owner[job.job_id] = index
        outcome = "cancelled"  # unless it ends or fails: the client went away
        try:
            async with aclosing(self._workers[index].generate_stream(job, partial_images, progress)) as events:
                async for event in events:
                    yield event
            outcome = "served"
        except Exception as error:
            outcome = "failed"
            self._mark_failed(index, error)
            raise
        finally:
            self._release(index, job.n, [job.job_id], outcome)

    async def render_video(self, job: VideoJob) -> AsyncIterator[VideoEvent]:
        """A video job on a ready worker with a video model (the least busy with images); a
        worker that fails mid-render is marked like one that fails an image call."""
        with_video = [index for index, load in enumerate(self.loads) if load.ready and load.video]
        index = min(with_video or range(self.size), key=lambda i: (self._rendering.count(i), self.loads[i].in_flight_images))
        self._rendering.append(index)
        self._video_owner[job.job_id] = index
        try:
            async with aclosing(self._workers[index].render_video(job)) as events:
                async for event in events:
                    yield event
        except Exception as error:
            self._mark_failed(index, error)
            raise
        finally:
            self._rendering.remove(index)
            self._video_owner.pop(job.job_id, None)

    async def cancel_video(self, job_id: str) -> None:
        index = self._video_owner.get(job_id)
        if index is not None:
            await self._workers[index].cancel_video(job_id)

    async def cancel(self, job_id: str) -> None:
        index = self._owner.get(job_id, self._abandoned.pop(job_id, None))
        if index is not None:  # else never dispatched, or finished: nothing runs anywhere
            await self._workers[index].cancel(job_id)

    async def status(self) -> WorkerStatus:
        """Ready when any worker is; models and dtype from a ready one; each worker in `workers`."""
        statuses = await asyncio.gather(
            *(asyncio.wait_for(worker.status(), WORKER_STATUS_TIMEOUT_S) for worker in self._workers), return_exceptions=True
        )
        for index, status in enumerate(statuses):
            load = self.loads[index]
            if isinstance(status, BaseException):
                status = WorkerStatus(ready=False, detail=f"not reachable ({type(status).__name__})")
            load.device, load.pid = status.device or load.device, status.pid or load.pid
            load.video = status.video is not None
            if status.ready and not load.ready:
                # Back after a restart: it rejoins once it has caught up (in the background).
                if load.catching_up is None:
                    load.catching_up = asyncio.get_running_loop().create_task(self._catch_up(index, status))
                status = WorkerStatus(ready=False, detail="warming up the batcher (and replaying run-time adapters)")
            load.ready, load.detail = status.ready, "" if status.ready else status.detail
            statuses[index] = status
        ready = [status for status in statuses if status.ready]
        workers = [load.as_dict() for load in self.loads]
        if not ready:
            details = "; ".join(load.detail if self.size == 1 else f"{load.name}: {load.detail}" for load in self.loads)
            return WorkerStatus(ready=False, detail=details, workers=workers)
        devices = ",".join(dict.fromkeys(status.device or "?" for status in ready))
        busy = [call for status in ready for call in status.busy]
        return ready[0].model_copy(update={"device": devices, "workers": workers, "pid": None, "busy": busy})

    async def _catch_up(self, index: int, status: WorkerStatus) -> None:
        """A worker that (re)started has only its start-up adapters and a cold batcher: replay
        the run-time adapters, warm the batcher with one-step calls, then let it serve again."""
        load, worker = self.loads[index], self._workers[index]
        try:
            for name, command in list(self._adapters.items()):
                reply = await worker.manage_loras(command)
                if reply.error is not None and reply.error.status != 409:  # 409: it is already there
                    logger.error("worker %s could not load adapter '%s' again: %s", load.name, name, reply.error.message)
            # Warm-up calls draw from a prompt: an edit-only model (Qwen-Image-Edit) has none to make.
            drawing = [limits for limits in status.models if "text-to-image" in limits.modes]
            if drawing:
                for call in range(self.warm_up_calls):
                    await worker.generate([GenerationJob.warm_up(drawing[0], call)])
            load.ready, load.detail = True, ""
            logger.info("worker %s is ready: batcher warmed, %d run-time adapters replayed", load.name, len(self._adapters))
        except Exception as error:  # still not well: the next status check tries again
            logger.warning("worker %s could not catch up (%s)", load.name, type(error).__name__)
        finally:
            load.catching_up = None

    async def manage_loras(self, command: LoraCommand) -> LoraReply:
        """`list` asks one ready worker; `load` and `unload` go to every worker that is ready or
        catching up (one catching up would otherwise miss a change made meanwhile)."""
        ready = [index for index, load in enumerate(self.loads) if load.ready] or list(range(self.size))
        if command.action == "list":
            return await self._workers[ready[0]].manage_loras(command)
        alive = [index for index, load in enumerate(self.loads) if load.ready or load.catching_up] or ready
        replies = await asyncio.gather(*(self._workers[index].manage_loras(command) for index in alive))
        failed = [reply for reply in replies if reply.error is not None]
        if failed:
            return failed[0]
        if command.action == "load" and command.name:
            self._adapters[command.name] = command
        elif command.action == "unload" and command.name:
            self._adapters.pop(command.name, None)
        return replies[0]

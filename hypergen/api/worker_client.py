"""How the API reaches the diffusion workers: the `WorkerClient` contract, its BentoML
implementation (`bentoml.depends` handles), and the pool every client goes through."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, Protocol

from ..protocol import WORKER_EVENT, GenerationJob, GenerationResult, LoraCommand, LoraReply, WorkerEvent, WorkerStatus
from ..video_protocol import VIDEO_EVENT, VideoEvent, VideoJob
from .pool import WorkerPool

# BentoML's adaptive batcher trains on its first 11 calls, and while training it holds single
# requests back for up to ~4 generation times, waiting for company (measured: an idle server's
# 10th and 11th requests waited ~840 ms at 20 steps). The pool spends that with one-step calls
# before it reports a worker ready.
BATCHER_WARMUP_CALLS = 12


class WorkerClient(Protocol):
    """What the API needs from a diffusion worker (a BentoML dependency, or an in-process engine)."""

    async def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]: ...

    async def status(self) -> WorkerStatus: ...

    async def manage_loras(self, command: LoraCommand) -> LoraReply: ...

    def generate_stream(self, job: GenerationJob, partial_images: int, progress: bool = False) -> AsyncIterator[WorkerEvent]: ...

    async def cancel(self, job_id: str) -> None: ...

    def render_video(self, job: VideoJob) -> AsyncIterator[VideoEvent]: ...

    async def cancel_video(self, job_id: str) -> None: ...


def keep_worker_session_open(dependency: Any) -> None:
    """Stop BentoML (>= 1.4.30) from recycling the dependency's HTTP session.

    Its client closes and replaces the aiohttp session every 100 requests or 5 minutes, and
    closing it drops every request still in flight on it (`ServerDisconnectedError`; BentoML
    issues #5540, #5544). Measured here: at concurrency 8, the requests around the 100th all
    failed. Diffusion requests are long, so the session is kept for the process's lifetime.
    """
    manager = getattr(getattr(dependency, "to_async", None), "_session_manager", None)
    if manager is not None and hasattr(manager, "max_requests"):
        manager.max_requests = sys.maxsize
        manager.max_age = float("inf")


class BentoWorkerClient:
    """Calls one `DiffusionWorker` service through `bentoml.depends`."""

    def __init__(self, dependency: Any) -> None:
        self._worker = dependency
        keep_worker_session_open(dependency)

    async def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        results = await self._worker.to_async.generate(list(jobs))
        return [GenerationResult.model_validate(result) for result in results]

    async def status(self) -> WorkerStatus:
        return WorkerStatus.model_validate(await self._worker.to_async.status())

    async def manage_loras(self, command: LoraCommand) -> LoraReply:
        return LoraReply.model_validate(await self._worker.to_async.manage_loras(command))

    async def cancel(self, job_id: str) -> None:
        await self._worker.to_async.cancel(job_id=job_id)

    async def generate_stream(self, job: GenerationJob, partial_images: int, progress: bool = False) -> AsyncIterator[WorkerEvent]:
        stream = self._worker.to_async.generate_stream(job=job, partial_images=partial_images, progress=progress)
        async with aclosing(json_lines(stream)) as lines:
            async for line in lines:
                yield WORKER_EVENT.validate_json(line)

    async def render_video(self, job: VideoJob) -> AsyncIterator[VideoEvent]:
        async with aclosing(json_lines(self._worker.to_async.render_video(job=job))) as lines:
            async for line in lines:
                yield VIDEO_EVENT.validate_json(line)

    async def cancel_video(self, job_id: str) -> None:
        await self._worker.to_async.cancel_video(job_id=job_id)


async def json_lines(stream: AsyncIterator[Any]) -> AsyncIterator[str]:
    """A worker's JSON-lines stream as whole lines (chunks may merge or split between services).
    Leaving early does not close BentoML's HTTP response (the worker learns it through a cancel
    call), but aclosing still ends BentoML's generator now rather than at collection."""
    buffer = ""
    async with aclosing(stream) as chunks:
        async for chunk in chunks:
            buffer += chunk if isinstance(chunk, str) else chunk.decode()
            while "\n" in buffer:
                line, buffer = buffer.split("\n", 1)
                if line.strip():
                    yield line


def connect_workers(dependencies: dict[str, Any], warm_up_calls: int = BATCHER_WARMUP_CALLS) -> WorkerPool:
    """The API's client for the worker services (service name → `bentoml.depends` handle)."""
    return WorkerPool([BentoWorkerClient(dependency) for dependency in dependencies.values()], list(dependencies), warm_up_calls)

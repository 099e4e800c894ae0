"""Admission, the worker call, the timeout and cancellation: ONE path for plain requests, SSE
streams and WebSockets.

- `Admission`: a request's place in the bounded FIFO, then its dispatch slot until released;
  a full queue is a 503, a turn that does not come before the deadline a 504.
- `Dispatcher.supervised`: the scaffolding around every worker call: the deadline (counted from
  arrival), cancelling the job in the worker when the client leaves or time runs out, mapping
  the worker's failure to OpenAI's error, and one log line per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..errors import OpenAIError, from_worker, generation_failed, queue_full_error, shutting_down_error, timeout_error
from ..metrics import metrics
from ..protocol import DoneEvent, GenerationJob, GenerationResult, WorkerEvent
from .forming import BatchFormer
from .pool import WorkerPool
from .queue import AdmissionQueue, QueueClosed, QueueFull
from .readiness import Readiness

logger = logging.getLogger("hypergen.requests")


def _queue_gauges(depth: int, in_flight: int) -> None:
    metrics().queue_depth.set(depth)
    metrics().in_flight.set(in_flight)


@dataclass
class Outcome:
    """What became of one request, for its log line."""

    status: int = 500
    result: GenerationResult | None = None


class Admission:
    """One request's place in the queue, then its dispatch slot, until `release()`."""

    def __init__(self, dispatcher: Dispatcher, deadline: float) -> None:
        self._dispatcher = dispatcher
        self._deadline = deadline
        self._stack = AsyncExitStack()
        self._turn: asyncio.Future[None] | None = None

    @property
    def position(self) -> int:
        """1 for the next request to be dispatched; 0 once it holds its slot."""
        return self._dispatcher.queue.position(self._turn)

    async def enter(self) -> None:
        """Wait (FIFO) for a dispatch slot until the deadline; 503 when the queue is full or the
        server shuts down before the request's turn."""
        slot = self._dispatcher.queue.slot(on_wait=self._waiting)
        try:
            async with asyncio.timeout_at(self._deadline):
                await self._stack.enter_async_context(slot)
        except QueueFull:
            raise self._dispatcher.full_queue_error() from None
        except QueueClosed:
            metrics().rejected.labels(reason="shutting_down").inc()
            raise shutting_down_error() from None
        except TimeoutError:
            metrics().rejected.labels(reason="timeout").inc()
            raise timeout_error(self._dispatcher.settings.request_timeout) from None

    def _waiting(self, turn: asyncio.Future[None]) -> None:
        self._turn = turn

    async def release(self) -> None:
        await self._stack.aclose()


class Dispatcher:
    def __init__(self, settings: Settings, worker: WorkerPool, readiness: Readiness) -> None:
        self.settings = settings
        self.worker = worker
        self.readiness = readiness
        # Each worker takes up to a batch at once; more waiting would only add to BentoML's queue.
        self.queue = AdmissionQueue(settings.max_queue, max_in_flight=settings.max_batch_size * worker.size, on_change=_queue_gauges)
        self.recent_call_s = 0.0  # moving average of pipeline-call durations, for wait estimates
        self.former = BatchFormer(worker, settings.max_batch_size, settings.max_batch_wait_ms / 1000)
        self._background: set[asyncio.Task[Any]] = set()

    def deadline(self) -> float:
        """When a request arriving now must be answered (HYPERGEN_REQUEST_TIMEOUT)."""
        return asyncio.get_running_loop().time() + self.settings.request_timeout

    def admission(self, deadline: float) -> Admission:
        return Admission(self, deadline)

    async def admit(self, deadline: float) -> Admission:
        admission = self.admission(deadline)
        await admission.enter()
        return admission

    async def run(self, job: GenerationJob) -> GenerationResult:
        """A plain request: wait for a slot, run the job, return its images (or raise)."""
        deadline = self.deadline()
        async with self.supervised(job, deadline) as outcome:
            admission = await self.admit(deadline)
            try:
                result = await self.former.generate(job)
            finally:
                await admission.release()
            outcome.result = self._checked(job, result)
        return outcome.result

    async def stream(
        self, job: GenerationJob, admission: Admission, deadline: float, partial_images: int, progress: bool = False
    ) -> AsyncIterator[WorkerEvent]:
        """An admitted streaming job's events up to its images; releases the admission at the
        end. A failure raises (the caller turns it into an `error` event); closing the iterator
        early cancels the job in the worker."""
        try:
            async with self.supervised(job, deadline) as outcome:
                async with aclosing(self.worker.generate_stream(job, partial_images, progress)) as events:
                    async for event in events:
                        if isinstance(event, DoneEvent):
                            outcome.result = self._checked(job, event.result, streamed=True)
                            break
                        yield event
                if outcome.result is None:
                    raise RuntimeError("the worker's stream ended without a result")
        finally:
            await admission.release()

    @asynccontextmanager
    async def supervised(self, job: GenerationJob, deadline: float) -> AsyncIterator[Outcome]:
        """The deadline, cancellation in the worker, error mapping and the log line of one call."""
        outcome, started = Outcome(), time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                yield outcome
            outcome.status = 200
        except TimeoutError:
            outcome.status = 504
            metrics().rejected.labels(reason="timeout").inc()
            self.cancel_in_worker(job)  # and stop spending the GPU on it
            raise timeout_error(self.settings.request_timeout) from None
        except (asyncio.CancelledError, GeneratorExit):
            outcome.status = 499  # the client went away: its job is dropped or interrupted
            self.cancel_in_worker(job)
            raise
        except OpenAIError as error:
            outcome.status = error.status_code
            raise
        except Exception:
            logger.exception("request %s: calling the diffusion worker failed", job.request_id)
            self.readiness.forget()  # the worker may have died
            self.cancel_in_worker(job)
            raise generation_failed(job.request_id) from None
        finally:
            self._log(job, outcome, started)

    @staticmethod
    def _checked(job: GenerationJob, result: GenerationResult, streamed: bool = False) -> GenerationResult:
        """The result, or its failure as OpenAI's error (logged here when it is the server's)."""
        if result.error is not None:
            if result.error.status >= 500:
                logger.error("request %s: generation failed: %s", job.request_id, result.error.message)
            raise from_worker(result.error, job.request_id)
        if not streamed and len(result.images_b64) != job.n:
            logger.error("request %s: generation failed: images missing", job.request_id)
            raise generation_failed(job.request_id)
        return result

    def cancel_in_worker(self, job: GenerationJob) -> None:
        """Fire and forget: the worker drops the job, or interrupts its call once nobody is left."""

        async def cancel() -> None:
            try:
                await self.worker.cancel(job.job_id)
            except Exception:  # the worker is gone or restarting: nothing left to cancel
                logger.warning("request %s: could not cancel it in the worker", job.request_id)

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def full_queue_error(self) -> OpenAIError:
        """The 503 for a full queue (counted in metrics), with a Retry-After estimate."""
        metrics().rejected.labels(reason="queue_full").inc()
        # About one batch per waiting batch, capped at a minute.
        retry_after = max(1, min(60, 1 + self.queue.depth // self.queue.max_in_flight))
        return queue_full_error(self.settings.max_queue, retry_after=retry_after)

    def estimated_wait(self, position: int) -> float:
        """Seconds until a request at `position` starts: the calls ahead of it (a batch each) and
        the one running, at the recent pipeline-call duration. At position 0 the request holds
        its own dispatch slot: only others in flight can be ahead of it."""
        others_in_flight = self.queue.in_flight - (1 if position == 0 else 0)
        calls_ahead = -(-position // self.queue.max_in_flight) + (1 if others_in_flight > 0 else 0)
        return round(calls_ahead * self.recent_call_s, 2)

    def _log(self, job: GenerationJob, outcome: Outcome, started: float) -> None:
        result = outcome.result
        if result is not None and result.generation_s > 0:
            recent = self.recent_call_s
            self.recent_call_s = result.generation_s if not recent else 0.8 * recent + 0.2 * result.generation_s
        logger.info(
            "request %s status=%d n=%d size=%dx%d steps=%d queue_wait=%.1fms generation=%.3fs batch_images=%d total=%.3fs",
            job.request_id,
            outcome.status,
            job.n,
            job.width,
            job.height,
            job.num_inference_steps,
            (result.queue_wait_s * 1000) if result else -1.0,
            result.generation_s if result else 0.0,
            result.batch_images if result else 0,
            time.perf_counter() - started,
        )

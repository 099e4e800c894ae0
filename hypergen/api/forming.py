"""Forming batches of plain requests in the API, before they reach a worker.

Each worker runs one call at a time, so requests that arrive while every worker is busy wait here
and leave together, as one call of up to `max_images` images, as soon as a worker is free.

Closed-loop clients (each sends its next request when its last one is answered) showed why this
is needed: the requests answered by one call come back a few milliseconds apart, and a free worker
used to take the first alone and the rest in a second call (1 + 3 at concurrency 4). So when a
worker is free and fewer images wait than the last call carried (plus those that were already
waiting when it ended), the batch waits a moment for the others: at most 5 % of the recent call time, and never more than `max_wait_s`. A lone
client (last call: one image) never waits. With several workers, each call takes at most its
worker's fair share of what waits and runs, so one worker does not take everything.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..protocol import GenerationJob, GenerationResult
from .pool import WorkerPool

# The wait for company, as a share of the recent pipeline-call time (and at least this long).
WAIT_SHARE_OF_CALL = 0.05
MIN_WAIT_S = 0.005


@dataclass
class _Waiting:
    job: GenerationJob
    future: asyncio.Future[GenerationResult]
    arrived: float


@dataclass
class BatchFormer:
    """Plain requests → worker calls of several jobs (see the module docstring)."""

    pool: WorkerPool
    max_images: int
    max_wait_s: float
    recent_call_s: float = 0.0  # moving average of call durations
    expected_images: int = 1  # the last call's images plus those waiting when it ended: the company to wait for
    _pending: list[_Waiting] = field(default_factory=list)
    _calls: int = 0
    _in_flight_images: int = 0
    _free_since: float = 0.0  # when a call last finished: the wait for company counts from then
    _timer: asyncio.TimerHandle | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def generate(self, job: GenerationJob) -> GenerationResult:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(job, loop.create_future(), loop.time())
        self._pending.append(waiting)
        self._flush()
        try:
            return await waiting.future
        finally:
            if not waiting.future.done():
                waiting.future.cancel()  # the caller left: it is skipped when the batch leaves

    def window(self) -> float:
        return min(self.max_wait_s, max(MIN_WAIT_S, WAIT_SHARE_OF_CALL * self.recent_call_s))

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Callers that left are skipped (and so is anything left from an event loop that is gone).
        self._pending = [waiting for waiting in self._pending if not waiting.future.done() and waiting.future.get_loop() is loop]
        while self._pending and self._calls < self.pool.size:
            images = sum(waiting.job.n for waiting in self._pending)
            ready_at = max(self._pending[0].arrived, self._free_since) + self.window()
            if images < min(self.expected_images, self.max_images) and loop.time() < ready_at:
                self._timer = loop.call_at(ready_at, self._flush)
                return
            # With several workers, a call takes its worker's fair share of the work in the system.
            limit = min(self.max_images, -(-(images + self._in_flight_images) // self.pool.size))
            batch = [self._pending.pop(0)]
            images = batch[0].job.n
            while self._pending and images + self._pending[0].job.n <= limit:
                images += self._pending[0].job.n
                batch.append(self._pending.pop(0))
            self._calls += 1
            self._in_flight_images += images
            task = loop.create_task(self._call(batch, images))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[_Waiting], images: int) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            results = await self.pool.generate([waiting.job for waiting in batch])
        except asyncio.CancelledError:
            for waiting in batch:
                waiting.future.cancel()
            raise
        except Exception as error:
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(error)
        else:
            for waiting, result in zip(batch, results):
                if not waiting.future.done():
                    waiting.future.set_result(result)
            seconds = loop.time() - started
            self.recent_call_s = seconds if not self.recent_call_s else 0.8 * self.recent_call_s + 0.2 * seconds
        finally:
            self._calls -= 1
            self._in_flight_images -= images
            # The clients of this call will likely come back, besides those already waiting.
            waiting = sum(item.job.n for item in self._pending if not item.future.done())
            self.expected_images, self._free_since = images + waiting, loop.time()
            self._flush()

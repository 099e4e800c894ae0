"""Whether the workers can generate, asked cheaply: the pool's status, cached briefly once
ready, polled in the background from start-up so the batcher warm-up starts before any request."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..errors import not_ready_error
from ..metrics import metrics
from ..protocol import ModelLimits, WorkerStatus
from .pool import WorkerPool

logger = logging.getLogger("hypergen.requests")

# How long a known-ready worker status is trusted before asking again.
STATUS_TTL_S = 5.0
STATUS_CALL_TIMEOUT_S = 3.0
POLL_INTERVAL_S = 0.2


class Readiness:
    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._status: WorkerStatus | None = None
        self._checked = 0.0
        self._poller: asyncio.Task[None] | None = None

    async def status(self, fresh: bool = False) -> WorkerStatus:
        """The pool's status, cached briefly once ready (unless `fresh`); unreachable counts as
        not ready."""
        if not fresh and self._status and self._status.ready and time.monotonic() - self._checked < STATUS_TTL_S:
            return self._status
        try:
            status = await asyncio.wait_for(self.pool.status(), STATUS_CALL_TIMEOUT_S)
        except Exception as error:  # the worker process is starting, restarting or gone
            status = WorkerStatus(ready=False, detail=f"the diffusion worker is not reachable yet ({type(error).__name__})")
        if self._status is not None and self._status.ready and not status.ready:
            logger.warning("the diffusion worker is not ready any more: %s", status.detail)
        self._status, self._checked = status, time.monotonic()
        return status

    def forget(self) -> None:
        """Ask again next time: a call just failed, the worker may have died."""
        self._status = None

    def start_polling(self) -> None:
        """Poll until ready once: the pool warms each worker's batcher when it first sees it ready."""

        async def poll() -> None:
            while not (await self.status()).ready:
                await asyncio.sleep(POLL_INTERVAL_S)

        self._poller = asyncio.get_running_loop().create_task(poll())

    async def ready_models(self) -> list[ModelLimits]:
        status = await self.status()
        if not status.ready:
            metrics().rejected.labels(reason="not_ready").inc()
            raise not_ready_error(f"The server is not ready: {status.detail}.")
        return status.models

    async def health(self, model_name: str, queue: Any, max_queue: int) -> tuple[bool, dict[str, Any]]:
        status = await self.status(fresh=True)  # `busy` must be what runs now
        body: dict[str, Any] = {
            "status": "ok" if status.ready else "loading",
            "model": model_name,
            "models": [model.id for model in status.models],
            "device": status.device,
            "dtype": status.dtype,
            "queue_depth": queue.depth,
            "max_queue_size": max_queue,
            "in_flight": queue.in_flight,
            # The workers' own view: a call can outlive the requests the API has given up on.
            "busy": [{**call, "running_s": round(time.time() - call["started_at"], 1)} for call in status.busy],
        }
        if status.memory:
            body["memory"] = status.memory
        if self.pool.size > 1:  # live counts, not the cached status's
            body["workers"] = [load.as_dict() for load in self.pool.loads]
        if not status.ready:
            body["detail"] = status.detail
        return status.ready, body

"""Which jobs stream and which were cancelled, keyed by the job ids the API made (never by
anything a client sent). Shared between the event loop (streams open and close, cancels arrive)
and the pipeline thread (batches read it), so every access holds one lock."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..protocol import DoneEvent, GenerationResult, WorkerError
from .previews import StreamTicket

# Job ids remembered as cancelled (a job may arrive after its cancellation).
MAX_REMEMBERED_CANCELLATIONS = 10_000


class JobTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[StreamTicket] = []  # streaming jobs waiting for the pipeline thread
        self._streams: dict[str, StreamTicket] = {}  # job id → ticket, while it streams
        self._cancelled: OrderedDict[str, None] = OrderedDict()

    def open_stream(self, ticket: StreamTicket) -> None:
        with self._lock:
            self._pending.append(ticket)
            self._streams[ticket.job.job_id] = ticket

    def close_stream(self, ticket: StreamTicket) -> None:
        ticket.cancelled.set()
        with self._lock:
            self._streams.pop(ticket.job.job_id, None)

    def take_pending(self) -> list[StreamTicket]:
        """The streaming jobs waiting now whose clients are still there."""
        with self._lock:
            tickets = [ticket for ticket in self._pending if not ticket.cancelled.is_set()]
            self._pending.clear()
        return tickets

    def cancel(self, job_id: str) -> None:
        """Remember the job as cancelled; a stream still open ends with a 499 `done` now."""
        with self._lock:
            ticket = self._streams.get(job_id)
            self._cancelled[job_id] = None
            while len(self._cancelled) > MAX_REMEMBERED_CANCELLATIONS:
                self._cancelled.popitem(last=False)
        if ticket is not None:
            ticket.cancelled.set()
            error = WorkerError(message="cancelled by the client", status=499)
            ticket.emit(DoneEvent(result=GenerationResult(request_id=ticket.job.request_id, error=error)))

    def is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

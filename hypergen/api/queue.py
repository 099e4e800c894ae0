"""Admission control: a bounded FIFO of requests waiting for the worker.

A request holds one of `max_in_flight` dispatch slots while the worker has it (those slots
feed the worker's batches); the rest wait here, in arrival order, at most `max_waiting` of
them. One more is refused at once with `QueueFull` rather than left to time out. `close()`
(the server is shutting down) turns every waiting request away with `QueueClosed`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class QueueFull(Exception):
    """Raised by `AdmissionQueue.slot()` when `max_waiting` requests are already waiting."""


class QueueClosed(Exception):
    """Raised by `AdmissionQueue.slot()` once the queue is closed (the server is shutting down)."""


class AdmissionQueue:
    def __init__(self, max_waiting: int, max_in_flight: int, on_change: Callable[[int, int], None] | None = None) -> None:
        """`on_change(depth, in_flight)` is called after every change (for metrics)."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_waiting = max_waiting
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.closed = False
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._on_change = on_change or (lambda depth, in_flight: None)

    @property
    def depth(self) -> int:
        """Requests admitted and waiting for a dispatch slot."""
        return len(self._waiting)

    @property
    def full(self) -> bool:
        """Whether one more request would be refused right now."""
        busy = self.in_flight >= self.max_in_flight or bool(self._waiting)
        return busy and len(self._waiting) >= self.max_waiting

    def position(self, turn: asyncio.Future[None] | None) -> int:
        """1 for the next request to be dispatched; 0 once `turn` has its slot (or is unknown)."""
        try:
            return self._waiting.index(turn) + 1 if turn is not None else 0
        except ValueError:
            return 0

    @asynccontextmanager
    async def slot(self, on_wait: Callable[[asyncio.Future[None]], None] | None = None) -> AsyncIterator[None]:
        """Wait (FIFO) for a dispatch slot and hold it for the body of the `async with`.

        `on_wait(turn)` is called if the request has to wait; `position(turn)` then tells where.
        Raises `QueueFull`, or `QueueClosed` (also while waiting) once `close()` was called."""
        if self.closed:
            raise QueueClosed()
        if self.in_flight < self.max_in_flight and not self._waiting:
            self.in_flight += 1
            self._changed()
        elif len(self._waiting) >= self.max_waiting:
            raise QueueFull()
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            self._changed()
            if on_wait is not None:
                on_wait(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # the slot was handed over just as we gave up
                elif turn in self._waiting:
                    self._waiting.remove(turn)
                    self._changed()
                raise
        try:
            yield
        finally:
            self._release()

    def close(self) -> None:
        """Admit nobody any more: the requests waiting get `QueueClosed` at once (they have not
        started; a client can retry them elsewhere), the ones holding a slot keep it to the end."""
        self.closed = True
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_exception(QueueClosed())
        self._changed()

    def _release(self) -> None:
        self.in_flight -= 1
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                self.in_flight += 1
                turn.set_result(None)
                break
        self._changed()

    def _changed(self) -> None:
        self._on_change(len(self._waiting), self.in_flight)

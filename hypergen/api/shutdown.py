"""Graceful shutdown of the API process: refuse new work at once, let what runs finish.

On SIGTERM (`docker stop`, Kubernetes) or SIGINT, uvicorn stops accepting and waits for the
requests in flight. But BentoML's arbiter opened the listening socket and passed it to every
process of the server (the diffusion workers hold a copy too), so uvicorn closing its own
descriptor leaves the socket listening: the kernel kept completing new connections that nobody
would accept, and those clients hung until the last request in flight had finished.
`ShutdownGate` stops the socket itself as the signal arrives, so new connections are refused at
once (and those already waiting in its backlog are reset); a request that still reaches the app
(a kept-alive connection, in the moment before uvicorn closes it) gets a 503 `shutting_down`, and
so do the requests still waiting in the queue: the workers are stopping too, so their turn would
never come (they used to wait for the whole drain and then fail with a 500).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..errors import OpenAIError, shutting_down_error

logger = logging.getLogger("hypergen.shutdown")

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # uvicorn's HANDLED_SIGNALS


class ShutdownGate:
    """`closing` turns true when the process is asked to stop; the middleware refuses requests then."""

    def __init__(self) -> None:
        self.closing = False
        self._on_close: Callable[[], None] = lambda: None

    def install(self, on_close: Callable[[], None] | None = None) -> None:
        """On SIGTERM/SIGINT: stop the listening socket, run `on_close` on the event loop (e.g.
        turn the requests still waiting in the queue away), then the handler that was there
        (uvicorn's graceful exit).

        Call it from a coroutine in the main thread once the server has started (a BentoML
        `on_startup` hook): uvicorn installs its handlers before the app starts and restores the
        originals when it exits.
        """
        loop = asyncio.get_running_loop()
        self._on_close = on_close or self._on_close
        for signum in SHUTDOWN_SIGNALS:
            signal.signal(signum, self._chained(signal.getsignal(signum), loop))

    def _chained(self, previous: Any, loop: asyncio.AbstractEventLoop) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            try:
                if not self.closing:
                    self.closing = True
                    # Now, before uvicorn closes its descriptor (it would no longer be found here);
                    # the rest runs on the loop, not inside a signal handler.
                    stopped = stop_listening()
                    loop.call_soon_threadsafe(self._closed, stopped)
            finally:  # whatever happened above, uvicorn's graceful exit still starts
                if callable(previous):
                    previous(signum, frame)

        return handler

    def _closed(self, stopped: int) -> None:
        logger.info("shutting down: new connections refused (%d listening socket(s) stopped); finishing the requests in flight", stopped)
        self._on_close()

    @staticmethod
    def error() -> OpenAIError:
        return shutting_down_error()


def stop_listening() -> int:
    """`shutdown()` every listening TCP socket this process holds; returns how many.

    `shutdown` acts on the socket that all processes share, not on this process's descriptor:
    the kernel stops listening for every holder. Each descriptor stays open, so a process that
    BentoML restarts on the same socket listens on it again (`listen()` on the bound port).
    Unix sockets (BentoML's API-to-worker sockets) are left alone: requests in flight use them.
    """
    import psutil

    stopped = 0
    for connection in psutil.Process().net_connections(kind="tcp"):
        if connection.status != psutil.CONN_LISTEN or connection.fd < 0:
            continue
        try:
            with socket.fromfd(connection.fd, connection.family, socket.SOCK_STREAM) as listener:  # a duplicate descriptor
                listener.shutdown(socket.SHUT_RD)
            stopped += 1
        except OSError as error:  # already closed by uvicorn, or not a socket any more
            logger.debug("could not stop listening socket fd %d: %s", connection.fd, error)
    return stopped

"""Shutdown: SIGTERM stops the listening socket for every process that holds it, turns the queue
away, lets the running request finish, and a request that still reaches the app gets OpenAI's 503
(tests/e2e/test_faults.py does it through `bentoml serve`)."""

import asyncio
import os
import signal
import socket

import pytest

from hypergen.api.shutdown import SHUTDOWN_SIGNALS

from .conftest import http, run
from .test_body_limits import call, scope
from .test_generations_api import ScriptedWorker


@pytest.fixture
def signal_handlers():
    """The process's SIGTERM/SIGINT handlers replaced by recorders (uvicorn's stand-ins), restored after."""
    seen: list[int] = []
    saved = {signum: signal.signal(signum, lambda signum, frame: seen.append(signum)) for signum in SHUTDOWN_SIGNALS}
    yield seen
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_sigterm_refuses_new_connections_turns_the_queue_away_and_lets_the_running_request_finish(make_app, signal_handlers):
    worker = ScriptedWorker()
    app = make_app(worker, max_batch_size=1)
    listener = socket.create_server(("127.0.0.1", 0))  # as BentoML's arbiter opens it
    port = listener.getsockname()[1]
    held_elsewhere = socket.fromfd(listener.fileno(), socket.AF_INET, socket.SOCK_STREAM)  # e.g. the worker's copy
    waiting = socket.create_connection(("127.0.0.1", port))  # accepted by the kernel, not yet by the server

    async def scenario():
        app.state.shutdown.install(on_close=app.state.serving.queue.close)
        async with http(app) as client:
            running = asyncio.create_task(client.post("/v1/images/generations", json={"prompt": "running"}))
            while worker.calls < 1:  # in the worker, holding the only slot
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(client.post("/v1/images/generations", json={"prompt": "queued"}))
            while app.state.serving.queue.depth < 1:
                await asyncio.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            turned_away = await asyncio.wait_for(queued, 10)  # not left waiting for the running one
            late = await client.post("/v1/images/generations", json={"prompt": "late"})
            worker.release.set()
            return await running, turned_away, late

    try:
        running, turned_away, late = run(scenario())
        assert signal_handlers == [signal.SIGTERM]  # uvicorn's handler still runs after ours
        assert running.status_code == 200 and len(running.json()["data"]) == 1
        for refused in (turned_away, late):
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "shutting_down" and refused.json()["error"]["type"] == "server_error"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        waiting.settimeout(5)
        with pytest.raises(ConnectionResetError):
            waiting.recv(1)  # reset at once, not left waiting for the drain
        assert held_elsewhere.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
    finally:
        for sock in (waiting, held_elsewhere, listener):
            sock.close()


def test_a_request_arriving_while_shutting_down_gets_503_and_its_body_is_not_read(make_app):
    app = make_app(ScriptedWorker())
    app.state.shutdown.closing = True
    status, body, reads = run(call(app, scope("/v1/images/generations", headers=[("content-length", "20")]), [b'{"prompt": "late"}  ']))
    assert status == 503 and reads == 0
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "shutting_down"
    health = run(http(app).get("/health"))
    assert health.status_code == 503 and health.headers["retry-after"] == "1" and health.headers["x-request-id"]

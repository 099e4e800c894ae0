"""Request bodies: nothing is read before the key and the queue are checked, and all bodies being
received at once stay within a byte budget (raw ASGI calls, to see what the app reads)."""

import asyncio
import json

from .conftest import run
from .test_generations_api import ScriptedWorker


def scope(path="/v1/images/edits", headers=(), method="POST"):
    return {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": [(key.encode(), value.encode()) for key, value in headers], "client": ("127.0.0.1", 1),
        "server": ("testserver", 80), "scheme": "http", "root_path": "", "http_version": "1.1",
    }  # fmt: skip


async def call(app, request_scope, chunks, hold=None):
    """Send `chunks` as the body (waiting on `hold` after the first); the status and how many
    body messages the app read."""
    reads, sent = [0], []

    async def receive():
        reads[0] += 1
        if reads[0] > len(chunks):
            await asyncio.Event().wait()  # the client sends nothing more
        if reads[0] == 2 and hold is not None:
            await hold.wait()
        return {"type": "http.request", "body": chunks[reads[0] - 1], "more_body": reads[0] < len(chunks)}

    async def send(message):
        sent.append(message)

    await app(request_scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return start["status"], json.loads(body or b"{}"), reads[0]


def test_no_body_is_read_without_a_key_or_with_a_full_queue(make_app):
    worker = ScriptedWorker()
    keyed = make_app(worker, api_keys=["k1"])
    full = make_app(worker, max_queue=0, max_batch_size=1)
    full.state.serving.queue.in_flight = 1  # the only slot is taken and nobody may wait

    async def scenario():
        anonymous = await call(keyed, scope(headers=[("content-length", "1000")]), [b"x" * 1000])
        refused = await call(full, scope(headers=[("content-length", "1000")]), [b"x" * 1000])
        return anonymous, refused

    (status, body, reads), (full_status, full_body, full_reads) = run(scenario())
    assert status == 401 and body["error"]["code"] == "missing_api_key" and reads == 0
    assert full_status == 503 and full_body["error"]["code"] == "queue_full" and full_reads == 0


def test_bodies_in_flight_share_one_byte_budget(make_app):
    from hypergen.api.app import create_app

    worker = ScriptedWorker()
    app = make_app(worker)
    small = create_app(max_body_bytes=1000, max_bytes_in_flight=1500)
    small.state.auth, small.state.serving = app.state.auth, app.state.serving

    async def scenario():
        hold = asyncio.Event()
        slow = asyncio.ensure_future(call(small, scope(), [b"x" * 900, b""], hold=hold))  # chunked, held open
        await asyncio.sleep(0.05)
        declared = await call(small, scope(headers=[("content-length", "900")]), [b"x" * 900])
        chunked = await call(small, scope(), [b"x" * 700, b""])
        hold.set()
        await slow
        after = await call(small, scope(headers=[("content-length", "900")]), [b"x" * 900])
        return declared, chunked, after

    (status, body, reads), (chunked_status, _, _), (after_status, after_body, _) = run(scenario())
    assert status == 503 and body["error"]["code"] == "server_busy" and reads == 0
    assert chunked_status == 503
    assert after_status == 400 and after_body["error"]["code"] != "server_busy"  # budget freed: parsed, not multipart

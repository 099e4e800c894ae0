"""ASGI middleware in front of every route: request ids, body limits and the checks that come
before a body is read, and per-route request metrics."""

from __future__ import annotations

import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import OpenAIError
from ..metrics import metrics

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestLimits:
    """ASGI middleware: a request ID on every request and response, a request body cap (413),
    and nothing read of a body before its key and the queue have been checked (401/503), nor
    beyond `max_bytes_in_flight` for all bodies being received at once (503); once the process
    is shutting down (`app.state.shutdown`), every new request gets a 503.

    Pure ASGI rather than `BaseHTTPMiddleware`, so the body limit also covers chunked uploads
    without a Content-Length, and streamed responses pass straight through.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_bytes_in_flight: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_bytes_in_flight = max(max_bytes_in_flight, max_body_bytes)
        self.bytes_in_flight = 0  # bodies held by requests in progress

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        sent_id = headers.get("x-request-id", "")
        request_id = sent_id if _CLIENT_REQUEST_ID.match(sent_id) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_seen = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [h for h in message["headers"] if h[0].lower() != b"x-request-id"]
                message["headers"].append((b"x-request-id", request_id.encode()))
            await send(message)

        refusal = self._refuse_before_reading(scope, headers)
        if refusal is not None:
            await self._refuse(scope, send_with_id, refusal, started)
            return
        # Read the (bounded) body up front, so an oversized chunked upload is refused with 413
        # before any route or parser sees it; the app then reads the buffered copy.
        chunks: list[bytes] = []
        received = 0
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                received += len(chunks[-1])
                self.bytes_in_flight += len(chunks[-1])
                refusal = self._too_large_error() if received > self.max_body_bytes else self._over_budget(0)
                if refusal is not None:
                    await self._refuse(scope, send_with_id, refusal, started)
                    return
                if not message.get("more_body", False):
                    break
            await self._call_app(scope, receive, send_with_id, chunks, status_seen, started)
        finally:
            self.bytes_in_flight -= received

    async def _call_app(
        self, scope: Scope, receive: Receive, send: Send, chunks: list[bytes], status_seen: list[int], started: float
    ) -> None:
        body: bytes | None = b"".join(chunks)
        chunks.clear()  # one copy of the body, not two

        async def receive_buffered() -> Message:
            nonlocal body
            if body is not None:
                message, body = {"type": "http.request", "body": body, "more_body": False}, None
                return message
            return await receive()

        try:
            await self.app(scope, receive_buffered, send)
        finally:
            record_request(scope, status_seen[0], time.perf_counter() - started)

    def _refuse_before_reading(self, scope: Scope, headers: dict[str, str]) -> OpenAIError | None:
        """503 (shutting down), 401, 503 or 413 decided from the headers alone, before a byte of the body is held."""
        state = getattr(scope.get("app"), "state", None)
        auth, images, shutdown = getattr(state, "auth", None), getattr(state, "serving", None), getattr(state, "shutdown", None)
        if shutdown is not None and shutdown.closing:
            return shutdown.error()
        path = scope.get("path", "")
        try:
            if scope.get("method") in ("POST", "PUT", "PATCH") and path.startswith("/v1/") and auth is not None:
                auth.check(headers.get("authorization"))
            if scope.get("method") == "POST" and path.startswith("/v1/images/") and images and images.queue.full:
                raise images.full_queue_error()
        except OpenAIError as error:
            return error
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large_error()
        return self._over_budget(int(declared) if declared.isdigit() else 0)

    def _over_budget(self, more: int) -> OpenAIError | None:
        if self.bytes_in_flight + more <= self.max_bytes_in_flight:
            return None
        return OpenAIError(
            503,
            "The server is receiving too many request bodies at once; retry shortly.",
            type="server_error",
            code="server_busy",
            headers={"Retry-After": "1"},
        )

    def _too_large_error(self) -> OpenAIError:
        message = f"The request body is larger than the limit of {self.max_body_bytes} bytes."
        return OpenAIError(413, message, code="request_too_large")

    async def _refuse(self, scope: Scope, send: Send, error: OpenAIError, started: float) -> None:
        response = JSONResponse(error.body(), status_code=error.status_code, headers=dict(error.headers))
        await response(scope, _no_body, send)
        record_request(scope, error.status_code, time.perf_counter() - started)


def record_request(scope: Scope, status: int, seconds: float) -> None:
    """Count the request by route template (not raw path: bounded label values) and status."""
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    if route == "/{path:path}":
        route = "unmatched"
    metrics().requests.labels(route=route, status=str(status)).inc()
    if route.startswith("/v1/images/") and scope.get("method") == "POST":
        metrics().request_seconds.labels(route=route).observe(seconds)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}

"""The HTTP surface: OpenAI's Images and Models routes, health and url image files.

Routes stay a few lines each: validation is the pydantic models', work is `ImageServing`'s and
errors are mapped in `errors.install_error_handlers`. `service.py` hands the serving object
over through `app.state.serving` when the BentoML service starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from contextlib import aclosing
from typing import Any, Awaitable, TypeVar

from fastapi import Depends, FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .auth import ApiKeyAuth
from .errors import OpenAIError, error_response, install_error_handlers, validation_error_to_openai
from .metrics import exposition, metrics
from .playground import mount_playground
from .protocol import (
    ALLOWED,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    LoraCommand,
    LoraLoadRequest,
    ModelCard,
    ModelList,
)
from .serving import ImageServing, Served

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_FORM_FILES = 20
FormModel = TypeVar("FormModel", ImageEditRequest, ImageVariationRequest)
MAX_FORM_FIELDS = 100


def serving(request: Request) -> ImageServing:
    return request.app.state.serving


def authorized(request: Request) -> str | None:
    auth: ApiKeyAuth = request.app.state.auth
    return auth.check(request.headers.get("authorization"))


def limiter_key(key: str | None, connection: HTTPConnection) -> str:
    """Whom a request is charged to: its API key (hashed: the key itself is never kept), or its
    client IP with auth off."""
    if key is not None:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return "ip:" + (connection.client.host if connection.client else "unknown")


def rate_limited(
    request: Request, response: Response, key: str | None = Depends(authorized), images: ImageServing = Depends(serving)
) -> str:
    """Charge one request to the caller; returns its limiter key."""
    client = limiter_key(key, request)
    if images.limiter.enabled:
        response.headers.update(images.charge_request(client))
    return client


# How often a waiting plain request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


async def unless_disconnected(request: Request, work: Awaitable[Served]) -> Served:
    """Await `work`, cancelling it if the client disconnects first (then the worker drops or
    interrupts the job instead of drawing images nobody will receive)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                break
        return await task
    except asyncio.CancelledError:
        if task.cancelled():
            raise OpenAIError(499, "The client closed the request.", code="client_closed_request") from None
        raise
    finally:
        if not task.done():
            task.cancel()


def respond(served: Served, response: Response) -> Any:
    """An ImagesResponse with its Server-Timing header, or the SSE stream of a streaming request."""
    result, timing = served
    if isinstance(result, ImagesResponse):
        response.headers["Server-Timing"] = timing
        return result
    headers = {key: value for key, value in response.headers.items() if key.startswith("x-ratelimit")}
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})


def charge_images(images: ImageServing, client: str, response: Response, n: int | None) -> None:
    if images.limiter.enabled:
        response.headers.update(images.charge_images(client, n or 1))


class RequestLimits:
    """ASGI middleware: a request ID on every request and response, a request body cap (413),
    and nothing read of a body before its key and the queue have been checked (401/503), nor
    beyond `max_bytes_in_flight` for all bodies being received at once (503).

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
        """401, 503 or 413 decided from the headers alone, before a byte of the body is held."""
        state = getattr(scope.get("app"), "state", None)
        auth, images = getattr(state, "auth", None), getattr(state, "serving", None)
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


async def read_multipart(request: Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """Form fields and uploaded files (`image[]` is read as `image`) of a multipart request."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise OpenAIError(
            400, "Send this request as multipart/form-data with the image as a file.", code="invalid_content_type"
        )
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except Exception as error:  # malformed multipart, too many parts
        raise OpenAIError(400, f"The multipart body could not be read: {error}.", code="invalid_multipart") from None
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    for key, value in form.multi_items():
        name = key[:-2] if key.endswith("[]") else key
        if isinstance(value, StarletteUploadFile):
            files.setdefault(name, []).append(await value.read())
        else:
            fields[name] = value
    return fields, files


def single_file(files: dict[str, list[bytes]], field: str, required: bool = True) -> bytes | None:
    """The one file sent as `field` (or `field[]`): a missing required file or several are a 400."""
    sent = files.get(field, [])
    if not sent:
        if required:
            raise OpenAIError(400, f"Missing required parameter: '{field}' (a file).", param=field, code="missing_required_parameter")
        return None
    if len(sent) > 1:
        raise OpenAIError(400, f"Send exactly one '{field}'; got {len(sent)}.", param=field, code="invalid_value")
    return sent[0]


async def read_image_form(
    request: Request, model: type[FormModel], images: ImageServing, client: str, response: Response
) -> tuple[FormModel, dict[str, list[bytes]]]:
    """A multipart image request: its validated fields (charged to the caller's image budget) and files."""
    fields, files = await read_multipart(request)
    body = model.model_validate(fields)
    charge_images(images, client, response, body.n)
    return body, files


async def receive_json_text(websocket: WebSocket) -> Any:
    """The first message as JSON; a binary frame or invalid JSON is a ValueError (an error event)."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is None:
        raise ValueError("a binary frame")
    return json.loads(message["text"])


# Browsers cannot set headers on a WebSocket; like OpenAI's Realtime API, they may offer the key
# as a subprotocol instead (`openai-insecure-api-key.<key>`) beside a plain one (`hypergen`).
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


def socket_credentials(websocket: WebSocket) -> tuple[str | None, str | None]:
    """The `Authorization` value of a WebSocket (its header, or a key offered as a subprotocol)
    and the subprotocol to accept: a non-key one when offered, so the key is never echoed."""
    offered = list(websocket.scope.get("subprotocols") or [])
    keys = [name[len(KEY_SUBPROTOCOL_PREFIX) :] for name in offered if name.startswith(KEY_SUBPROTOCOL_PREFIX)]
    plain = [name for name in offered if not name.startswith(KEY_SUBPROTOCOL_PREFIX)]
    authorization = websocket.headers.get("authorization") or (f"Bearer {keys[0]}" if keys else None)
    return authorization, (plain or offered or [None])[0]


def multipart_body(model: type[BaseModel], files: dict[str, bool]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a multipart route: the model's fields plus binary file parts."""
    schema = model.model_json_schema()
    schema["properties"] = {
        **{name: {"type": "string", "format": "binary"} for name in files},
        **schema.get("properties", {}),
    }
    schema["required"] = [*(name for name, required in files.items() if required), *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def create_app(max_body_bytes: int = 50 * 1024 * 1024, max_bytes_in_flight: int = 256 * 1024 * 1024) -> FastAPI:
    app = FastAPI(
        title="HyperGen",
        version=__version__,
        description="OpenAI-compatible image generation for diffusers models.",
    )
    install_error_handlers(app, ALLOWED)
    app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes, max_bytes_in_flight=max_bytes_in_flight)

    @app.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
    async def create_image(
        body: ImageGenerationRequest,
        request: Request,
        response: Response,
        client: str = Depends(rate_limited),
        images: ImageServing = Depends(serving),
    ) -> ImagesResponse:
        charge_images(images, client, response, body.n)
        work = images.generate(body, request.state.request_id, str(request.base_url))
        return respond(await unless_disconnected(request, work), response)

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        openapi_extra=multipart_body(ImageEditRequest, files={"image": True, "mask": False}),
    )
    async def edit_image(
        request: Request,
        response: Response,
        client: str = Depends(rate_limited),
        images: ImageServing = Depends(serving),
    ) -> ImagesResponse:
        body, files = await read_image_form(request, ImageEditRequest, images, client, response)
        image, mask = single_file(files, "image"), single_file(files, "mask", required=False)
        work = images.edit(body, image, mask, request.state.request_id, str(request.base_url))
        return respond(await unless_disconnected(request, work), response)

    @app.post(
        "/v1/images/variations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        openapi_extra=multipart_body(ImageVariationRequest, files={"image": True}),
    )
    async def create_variation(
        request: Request,
        response: Response,
        client: str = Depends(rate_limited),
        images: ImageServing = Depends(serving),
    ) -> ImagesResponse:
        body, files = await read_image_form(request, ImageVariationRequest, images, client, response)
        work = images.vary(body, single_file(files, "image"), request.state.request_id, str(request.base_url))
        return respond(await unless_disconnected(request, work), response)

    @app.websocket("/v1/images/ws")
    async def image_socket(websocket: WebSocket) -> None:
        """Send one generation request as JSON; receive `queued`, `started`, `progress` per step,
        partial images, `image_generation.completed` per image (or an `error` object), then the
        socket closes. Auth: the same `Authorization: Bearer` header."""
        authorization, subprotocol = socket_credentials(websocket)
        await websocket.accept(subprotocol=subprotocol)
        request_id = websocket.scope.get("state", {}).get("request_id") or f"req_{uuid.uuid4().hex}"
        images: ImageServing = websocket.app.state.serving
        try:
            client = limiter_key(websocket.app.state.auth.check(authorization), websocket)
            body = ImageGenerationRequest.model_validate(await receive_json_text(websocket))
            if images.limiter.enabled:  # the same budgets as HTTP: a request, and n images
                images.charge_request(client)
                images.charge_images(client, body.n or 1)
            async with aclosing(images.socket_events(body, request_id)) as events:
                async for event in events:
                    await websocket.send_json(event)
        except WebSocketDisconnect:
            return  # the generator was closed above: the worker drops or interrupts the job
        except OpenAIError as error:
            await websocket.send_json({"type": "error", **error.body()})
        except ValidationError as error:
            await websocket.send_json({"type": "error", **validation_error_to_openai(error, ALLOWED).body()})
        except ValueError:
            await websocket.send_json({"type": "error", "error": {"message": "Send the request as one JSON object in a text frame.", "type": "invalid_request_error", "param": None, "code": "invalid_json"}})
        await websocket.close()

    @app.get("/v1/loras")
    async def list_loras(_client: str = Depends(rate_limited), images: ImageServing = Depends(serving)) -> dict[str, Any]:
        reply = await images.manage_loras(LoraCommand(action="list"))
        return {"object": "list", "data": reply.adapters}

    @app.post("/v1/loras")
    async def load_lora(
        body: LoraLoadRequest, _client: str = Depends(rate_limited), images: ImageServing = Depends(serving)
    ) -> dict[str, Any]:
        reply = await images.manage_loras(LoraCommand(action="load", name=body.name, path=body.path, scale=body.scale))
        return next(adapter for adapter in reply.adapters if adapter["name"] == body.name)

    @app.delete("/v1/loras/{name}")
    async def unload_lora(name: str, _client: str = Depends(rate_limited), images: ImageServing = Depends(serving)) -> dict[str, Any]:
        await images.manage_loras(LoraCommand(action="unload", name=name))
        return {"name": name, "object": "lora", "deleted": True}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(_key: str | None = Depends(authorized), images: ImageServing = Depends(serving)) -> ModelList:
        return images.model_list()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def retrieve_model(
        model_id: str, _key: str | None = Depends(authorized), images: ImageServing = Depends(serving)
    ) -> ModelCard:
        return images.model_card(model_id)

    @app.get("/v1/images/files/{file_id}")
    async def image_file(file_id: str, images: ImageServing = Depends(serving)) -> FileResponse:
        # No key needed: like OpenAI's image URLs, the unguessable id is the capability.
        stored = images.store.get(file_id)
        if stored is None:
            raise OpenAIError(404, f"The image '{file_id}' does not exist or has expired.", param="file_id", code="not_found")
        return FileResponse(stored.path, media_type=stored.media_type)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request, images: ImageServing = Depends(serving)) -> Response:
        """Prometheus text; needs a key only with HYPERGEN_METRICS_AUTH (it names no request or file)."""
        if images.settings.metrics_auth:
            authorized(request)
        body, content_type = await run_in_threadpool(exposition)
        return Response(body, media_type=content_type)

    @app.get("/health")
    async def health(images: ImageServing = Depends(serving)) -> JSONResponse:
        ready, body = await images.health()
        return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})

    mount_playground(app)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"], include_in_schema=False)
    async def unknown_route(request: Request) -> Any:
        return error_response(
            OpenAIError(404, f"Unknown route: {request.method} {request.url.path}.", code="not_found"), request
        )

    return app

"""OpenAI's error object, and the one place where exceptions become HTTP responses.

Every error leaves HyperGen as `{"error": {"message", "type", "param", "code"}}`, the shape the
official clients parse into `openai.BadRequestError`, `openai.AuthenticationError`, ...
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ALLOWED, WorkerError

logger = logging.getLogger("hypergen.errors")


class OpenAIError(Exception):
    """An error a client should see, with OpenAI's fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_value(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_value")


def model_not_found(model: str, available: list[str]) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model '{model}' does not exist. Available models: {', '.join(available)}.",
        param="model",
        code="model_not_found",
    )


def queue_full_error(max_queue: int, retry_after: int) -> OpenAIError:
    return OpenAIError(
        503,
        f"The server is busy: {max_queue} requests are already waiting. Retry in a few seconds.",
        type="server_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def not_ready_error(detail: str, retry_after: int = 5) -> OpenAIError:
    return OpenAIError(503, detail, type="server_error", code="not_ready", headers={"Retry-After": str(retry_after)})


def shutting_down_error() -> OpenAIError:
    return OpenAIError(
        503,
        "The server is shutting down; retry shortly (another replica may take the request).",
        type="server_error",
        code="shutting_down",
        headers={"Retry-After": "1", "Connection": "close"},
    )


def generation_failed(request_id: str) -> OpenAIError:
    return OpenAIError(
        500,
        f"The image generation failed. The server logged the cause under request ID {request_id}.",
        type="server_error",
        code="generation_failed",
    )


def timeout_error(seconds: float) -> OpenAIError:
    return OpenAIError(
        504,
        f"The request was abandoned after {seconds:g} seconds (HYPERGEN_REQUEST_TIMEOUT).",
        type="server_error",
        code="timeout",
    )


def validation_error_to_openai(error: ValidationError | RequestValidationError, allowed: dict[str, str] = ALLOWED) -> OpenAIError:
    """Turn pydantic's first complaint into one OpenAI error naming the field and what it accepts."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return OpenAIError(400, "The request body is not valid JSON.", code="invalid_json")
    if kind == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind in ("model_type", "dict_type") and not location:
        return OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    value = first.get("input")
    shown = json.dumps(value)[:100] if _json_safe(value) else repr(value)[:100]
    message = f"Invalid value for '{param}': {shown}. {first.get('msg', '')}."
    hint = allowed.get(location[0]) if location else None
    if hint:
        message += f" Allowed: {hint}."
    return OpenAIError(400, message.replace("..", "."), param=param, code="invalid_value")


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def error_response(error: OpenAIError, request: Request | None = None) -> JSONResponse:
    headers = dict(error.headers)
    if request is not None and getattr(request.state, "request_id", None):
        headers["X-Request-ID"] = request.state.request_id
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


def client_closed() -> OpenAIError:
    return OpenAIError(499, "The client closed the request.", code="client_closed_request")


def from_worker(error: WorkerError, request_id: str) -> OpenAIError:
    """The worker's report of a failed job or adapter command, as the client sees it: 4xx with
    the worker's message (it names the field), 5xx without internals (logged by the caller)."""
    if error.status == 400:
        return invalid_value(error.param or "lora_path", error.message)
    if error.status in (404, 409):
        return OpenAIError(error.status, error.message, code="not_found" if error.status == 404 else "conflict")
    if error.status == 503:
        return not_ready_error(error.message)
    if error.status == 499:
        return client_closed()
    return generation_failed(request_id)


def to_openai(error: BaseException, request_id: str = "-", route: str = "this route") -> OpenAIError:
    """The ONE mapper: any exception a route, a stream or a WebSocket meets, as OpenAI's error.
    `route` ("POST /v1/x") is named in 404/405 messages."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, (RequestValidationError, ValidationError)):
        return validation_error_to_openai(error, ALLOWED)
    if isinstance(error, StarletteHTTPException):
        if error.status_code == 404:
            return OpenAIError(404, f"Unknown route: {route}.", code="not_found")
        if error.status_code == 405:
            return OpenAIError(405, f"The method is not allowed: {route}.", code="method_not_allowed")
        if error.status_code == 400:  # FastAPI could not parse the body (e.g. not UTF-8)
            return OpenAIError(400, "The request body could not be read as UTF-8 JSON.", code="invalid_json")
        return OpenAIError(error.status_code, str(error.detail), code="http_error")
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, NotJsonText)):
        return OpenAIError(400, "Send the request as one JSON object in a text frame.", code="invalid_json")
    logger.error("request %s failed unexpectedly", request_id, exc_info=error)
    return OpenAIError(500, f"Internal server error (request ID {request_id}).", type="server_error", code="internal_error")


class NotJsonText(ValueError):
    """A WebSocket message that is not a JSON text frame (e.g. a binary frame)."""


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception a route can raise to OpenAI's error object."""

    async def handle(request: Request, error: Exception) -> JSONResponse:
        route = f"{request.method} {request.url.path}"
        return error_response(to_openai(error, getattr(request.state, "request_id", "-"), route), request)

    for kind in (OpenAIError, RequestValidationError, ValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)

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
    return OpenAIError(
        503, detail, type="server_error", code="not_ready", headers={"Retry-After": str(retry_after)}
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


def validation_error_to_openai(error: ValidationError | RequestValidationError, allowed: dict[str, str]) -> OpenAIError:
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


def install_error_handlers(app: FastAPI, allowed: dict[str, str]) -> None:
    """Map every exception a route can raise to OpenAI's error object."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error_response(error, request)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error_to_openai(error, allowed), request)

    @app.exception_handler(ValidationError)
    async def _pydantic_validation(request: Request, error: ValidationError) -> JSONResponse:
        return error_response(validation_error_to_openai(error, allowed), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            body = OpenAIError(404, f"Unknown route: {request.method} {request.url.path}.", code="not_found")
        elif error.status_code == 405:
            body = OpenAIError(405, f"Method {request.method} is not allowed on {request.url.path}.", code="method_not_allowed")
        elif error.status_code == 400:  # FastAPI could not parse the body (e.g. not UTF-8)
            body = OpenAIError(400, "The request body could not be read as UTF-8 JSON.", code="invalid_json")
        else:
            body = OpenAIError(error.status_code, str(error.detail), type="invalid_request_error", code="http_error")
        return error_response(body, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        logger.exception("request %s failed unexpectedly", request_id)
        return error_response(
            OpenAIError(500, f"Internal server error (request ID {request_id}).", type="server_error", code="internal_error"),
            request,
        )

"""Who is calling and what it costs them: the API-key check and rate-limit charging, as FastAPI
dependencies for HTTP routes and as plain functions for the WebSocket."""

from __future__ import annotations

import hashlib

from fastapi import Depends, Request, Response, WebSocket
from starlette.requests import HTTPConnection

from .auth import ApiKeyAuth
from .serving import ImageServing

# Browsers cannot set headers on a WebSocket; like OpenAI's Realtime API, they may offer the key
# as a subprotocol instead (`openai-insecure-api-key.<key>`) beside a plain one (`hypergen`).
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


def serving(connection: HTTPConnection) -> ImageServing:
    return connection.app.state.serving


def authorized(request: Request) -> str | None:
    """The caller's key (None with auth off); a 401 without a valid one."""
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


def charge_images(images: ImageServing, client: str, response: Response | None, n: int | None) -> None:
    """Charge a request's `n` images to the caller's image budget (a 429 when over it)."""
    if images.limiter.enabled:
        headers = images.charge_images(client, n or 1)
        if response is not None:
            response.headers.update(headers)


def socket_credentials(websocket: WebSocket) -> tuple[str | None, str | None]:
    """The `Authorization` value of a WebSocket (its header, or a key offered as a subprotocol)
    and the subprotocol to accept: a non-key one when offered, so the key is never echoed."""
    offered = list(websocket.scope.get("subprotocols") or [])
    keys = [name[len(KEY_SUBPROTOCOL_PREFIX) :] for name in offered if name.startswith(KEY_SUBPROTOCOL_PREFIX)]
    plain = [name for name in offered if not name.startswith(KEY_SUBPROTOCOL_PREFIX)]
    authorization = websocket.headers.get("authorization") or (f"Bearer {keys[0]}" if keys else None)
    return authorization, (plain or offered or [None])[0]


def charge_socket(websocket: WebSocket, key: str | None, n: int | None) -> None:
    """Charge a WebSocket request as HTTP is charged: one request, and `n` images."""
    images: ImageServing = websocket.app.state.serving
    client = limiter_key(key, websocket)
    if images.limiter.enabled:
        images.charge_request(client)
    charge_images(images, client, None, n)

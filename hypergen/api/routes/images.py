"""OpenAI's image routes: generations, edits, variations, and the WebSocket."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from ...errors import NotJsonText, OpenAIError, client_closed, to_openai
from ...protocol import ImageEditRequest, ImageGenerationRequest, ImagesResponse, ImageVariationRequest
from ..access import charge_images, charge_socket, rate_limited, serving, socket_credentials
from ..serving import ImageServing, Served
from ..uploads import read_multipart, single_file

router = APIRouter()
FormModel = TypeVar("FormModel", ImageEditRequest, ImageVariationRequest)

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
            raise client_closed() from None
        raise
    finally:
        if not task.done():
            task.cancel()


def respond(served: Served, response: Response) -> Any:
    """An ImagesResponse with its Server-Timing header, or the SSE stream of a streaming request."""
    if isinstance(served, tuple):
        result, timing = served
        response.headers["Server-Timing"] = timing
        return result
    headers = {key: value for key, value in response.headers.items() if key.startswith("x-ratelimit")}
    return StreamingResponse(served, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})


async def read_image_form(
    request: Request, model: type[FormModel], images: ImageServing, client: str, response: Response
) -> tuple[FormModel, dict[str, list[bytes]]]:
    """A multipart image request: its validated fields (charged to the caller's image budget) and files."""
    fields, files = await read_multipart(request)
    body = model.model_validate(fields)
    charge_images(images, client, response, body.n)
    return body, files


def multipart_body(model: type[BaseModel], files: dict[str, bool]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a multipart route: the model's fields plus binary file parts."""
    schema = model.model_json_schema()
    schema["properties"] = {**{name: {"type": "string", "format": "binary"} for name in files}, **schema.get("properties", {})}
    schema["required"] = [*(name for name, required in files.items() if required), *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
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


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    openapi_extra=multipart_body(ImageEditRequest, files={"image": True, "mask": False}),
)
async def edit_image(
    request: Request, response: Response, client: str = Depends(rate_limited), images: ImageServing = Depends(serving)
) -> ImagesResponse:
    body, files = await read_image_form(request, ImageEditRequest, images, client, response)
    image, mask = single_file(files, "image"), single_file(files, "mask", required=False)
    work = images.edit(body, image, mask, request.state.request_id, str(request.base_url))
    return respond(await unless_disconnected(request, work), response)


@router.post(
    "/v1/images/variations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    openapi_extra=multipart_body(ImageVariationRequest, files={"image": True}),
)
async def create_variation(
    request: Request, response: Response, client: str = Depends(rate_limited), images: ImageServing = Depends(serving)
) -> ImagesResponse:
    body, files = await read_image_form(request, ImageVariationRequest, images, client, response)
    work = images.vary(body, single_file(files, "image"), request.state.request_id, str(request.base_url))
    return respond(await unless_disconnected(request, work), response)


async def receive_json_text(websocket: WebSocket) -> Any:
    """The first message as JSON; a binary frame or invalid JSON becomes an `error` event."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is None:
        raise NotJsonText("a binary frame")
    return json.loads(message["text"])


@router.websocket("/v1/images/ws")
async def image_socket(websocket: WebSocket) -> None:
    """Send one generation request as JSON; receive `queued`, `started`, `progress` per step,
    partial images, `image_generation.completed` per image (or an `error` object), then the
    socket closes. Auth: the `Authorization: Bearer` header, or (browsers) the key offered as
    the subprotocol `openai-insecure-api-key.<key>`; charged like HTTP."""
    authorization, subprotocol = socket_credentials(websocket)
    await websocket.accept(subprotocol=subprotocol)
    request_id = f"req_{uuid.uuid4().hex}"
    images: ImageServing = websocket.app.state.serving
    try:
        key = websocket.app.state.auth.check(authorization)  # before reading anything
        body = ImageGenerationRequest.model_validate(await receive_json_text(websocket))
        charge_socket(websocket, key, body.n)
        async with aclosing(images.socket_events(body, request_id)) as events:
            async for event in events:
                await websocket.send_json(event)
    except WebSocketDisconnect:
        return  # the generator was closed above: the worker drops or interrupts the job
    except (OpenAIError, ValueError) as error:  # ValueError: pydantic's, or not JSON
        await websocket.send_json({"type": "error", **to_openai(error, request_id).body()})
    await websocket.close()

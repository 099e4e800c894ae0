"""OpenAI's video routes (`/v1/videos...`), vLLM-Omni's synchronous `POST /v1/videos/sync`, and
the video WebSocket. Each key sees only its own videos (all are shared with auth off)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from pydantic import BaseModel, ValidationError

from ...errors import OpenAIError, client_closed, invalid_value, to_openai, validation_error_to_openai
from ...video_protocol import VIDEO_ALLOWED, DeletedVideo, VideoCreateRequest, VideoJobError, VideoList, VideoRemixRequest, VideoResource
from ..access import authorized, charge_images, charge_socket, limiter_key, rate_limited, socket_credentials
from ..uploads import read_multipart, single_file
from ..videos import VideoServing
from .images import DISCONNECT_POLL_S, multipart_body, receive_json_text

router = APIRouter()
MAX_DATA_URL_CHARS = 28 * 1024 * 1024  # a 20 MB image as base64


def videos_of(request: Request) -> VideoServing:
    return request.app.state.videos


def owner_of(request: Request, key: str | None = Depends(authorized)) -> str:
    """Whose videos these are: the hashed API key ("" with auth off: one shared space)."""
    return limiter_key(key, request) if key is not None else ""


def parse_video_body(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise validation_error_to_openai(error, VIDEO_ALLOWED) from None


def reference_from_url(image_url: str | None, file_id: str | None) -> bytes | None:
    """JSON `input_reference`: a base64 data URL (HyperGen fetches nothing from the network)."""
    if file_id is not None:
        raise invalid_value(
            "input_reference", "HyperGen has no Files API: upload the image as the multipart file 'input_reference', or send a data URL."
        )
    if image_url is None:
        return None
    if not image_url.startswith("data:") or ";base64," not in image_url[:100]:
        raise invalid_value(
            "input_reference", "input_reference.image_url must be a base64 data URL (data:image/png;base64,...): HyperGen fetches no URLs."
        )
    try:
        return base64.b64decode(image_url.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise invalid_value("input_reference", "input_reference.image_url is not valid base64.") from None


async def json_object(request: Request) -> dict[str, Any]:
    """The body as one JSON object (a 400 otherwise)."""
    try:
        payload = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise OpenAIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    return payload


async def read_video_request(request: Request) -> tuple[VideoCreateRequest, bytes | None]:
    """A create request as JSON or multipart (what the official client sends), and its reference image."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        fields, files = await read_multipart(request)
        upload = single_file(files, "input_reference", required=False)
        if isinstance(fields.get("input_reference"), str) and fields["input_reference"].strip().startswith("{"):
            try:  # the reference object as a JSON string, as multipart forms carry objects
                fields["input_reference"] = json.loads(fields["input_reference"])
            except ValueError:
                raise invalid_value("input_reference", "input_reference is neither a file nor a JSON object.") from None
        body = parse_video_body(VideoCreateRequest, fields)
    else:
        body, upload = parse_video_body(VideoCreateRequest, await json_object(request)), None
    if upload is None and body.input_reference is not None:
        upload = reference_from_url(body.input_reference.image_url, body.input_reference.file_id)
    return body, upload


async def create_video_job(request: Request, response: Response | None, client: str, owner: str) -> VideoResource:
    """Validate, charge the frames to the caller's image budget, queue."""
    videos = videos_of(request)
    body, reference = await read_video_request(request)

    def charge(frames: int) -> None:
        charge_images(request.app.state.serving, client, response, frames)

    return await videos.create(body, reference, owner, request.state.request_id, charge=charge)


CREATE_DOC = multipart_body(VideoCreateRequest, files={"input_reference": False})


@router.post("/v1/videos", response_model=VideoResource, openapi_extra=CREATE_DOC)
async def create_video(
    request: Request, response: Response, client: str = Depends(rate_limited), owner: str = Depends(owner_of)
) -> VideoResource:
    return await create_video_job(request, response, client, owner)


@router.post("/v1/videos/sync", openapi_extra=CREATE_DOC, response_class=FileResponse)
async def create_video_sync(request: Request, client: str = Depends(rate_limited), owner: str = Depends(owner_of)) -> FileResponse:
    """vLLM-Omni's synchronous route: the MP4 itself once rendered (the job is kept as usual)."""
    videos = videos_of(request)
    resource = await create_video_job(request, None, client, owner)
    final = await until_finished(request, videos, resource.id, owner)
    if final.status != "completed":
        error = final.error or VideoJobError(code="generation_failed", message="The video generation failed.")
        if error.code == "invalid_request":
            raise OpenAIError(400, error.message, code="invalid_value")
        raise OpenAIError(500, error.message, type="server_error", code=error.code)
    path, media_type = videos.content(resource.id, owner, "video")
    return FileResponse(path, media_type=media_type, headers={"X-Video-ID": resource.id})


async def until_finished(request: Request, videos: VideoServing, video_id: str, owner: str) -> VideoResource:
    """The video once completed or failed; a client that leaves first takes its job with it."""

    async def last() -> VideoResource:
        async with aclosing(videos.watch(video_id, owner)) as states:
            async for state in states:
                final = state
        return final

    task = asyncio.ensure_future(last())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await videos.delete(video_id, owner)
                raise client_closed()
        return task.result()
    finally:
        task.cancel()


@router.get("/v1/videos", response_model=VideoList)
async def list_videos(
    request: Request,
    owner: str = Depends(owner_of),
    limit: int = Query(default=20, ge=0, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = Query(default=None, max_length=100),
) -> VideoList:
    data, has_more = videos_of(request).page(owner, limit, order, after)
    return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=has_more)


@router.get("/v1/videos/{video_id}", response_model=VideoResource)
async def retrieve_video(video_id: str, request: Request, owner: str = Depends(owner_of)) -> VideoResource:
    return videos_of(request).get(video_id, owner)


@router.delete("/v1/videos/{video_id}", response_model=DeletedVideo)
async def delete_video(video_id: str, request: Request, owner: str = Depends(owner_of)) -> DeletedVideo:
    await videos_of(request).delete(video_id, owner)
    return DeletedVideo(id=video_id)


@router.get("/v1/videos/{video_id}/content", response_class=FileResponse)
async def video_content(
    video_id: str, request: Request, owner: str = Depends(owner_of), variant: Literal["video", "thumbnail", "spritesheet"] = "video"
) -> FileResponse:
    path, media_type = videos_of(request).content(video_id, owner, variant)
    return FileResponse(path, media_type=media_type)


@router.post("/v1/videos/{video_id}/remix", response_model=VideoResource, openapi_extra=multipart_body(VideoRemixRequest, files={}))
async def remix_video(
    video_id: str, request: Request, client: str = Depends(rate_limited), owner: str = Depends(owner_of)
) -> VideoResource:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        fields, _ = await read_multipart(request)
    else:
        fields = await json_object(request)
    body = parse_video_body(VideoRemixRequest, fields)
    videos = videos_of(request)

    def charge(frames: int) -> None:
        charge_images(request.app.state.serving, client, None, frames)

    return await videos.remix(video_id, body, owner, request.state.request_id, charge=charge)


@router.websocket("/v1/videos/ws")
async def video_socket(websocket: WebSocket) -> None:
    """Send one create request as JSON; receive `video` events (the VideoResource: queued, each
    progress change, then completed or failed), or an `error` object; then the socket closes.
    Auth and charges as for HTTP; leaving does not cancel the job (it stays retrievable)."""
    authorization, subprotocol = socket_credentials(websocket)
    await websocket.accept(subprotocol=subprotocol)
    request_id = f"req_{uuid.uuid4().hex}"
    videos: VideoServing = websocket.app.state.videos
    try:
        key = websocket.app.state.auth.check(authorization)
        owner = limiter_key(key, websocket) if key is not None else ""
        body = parse_video_body(VideoCreateRequest, await receive_json_text(websocket))
        reference = reference_from_url(body.input_reference.image_url, body.input_reference.file_id) if body.input_reference else None
        resource = await videos.create(body, reference, owner, request_id, charge=lambda frames: charge_socket(websocket, key, frames))
        async with aclosing(socket_states(videos, resource.id, owner)) as events:
            async for event in events:
                await websocket.send_json(event)
    except WebSocketDisconnect:
        return
    except (OpenAIError, ValueError) as error:
        await websocket.send_json({"type": "error", **to_openai(error, request_id).body()})
    await websocket.close()


async def socket_states(videos: VideoServing, video_id: str, owner: str) -> AsyncIterator[dict[str, Any]]:
    async with aclosing(videos.watch(video_id, owner)) as states:
        async for state in states:
            yield {"type": "video", "video": state.model_dump()}

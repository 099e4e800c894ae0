"""What leaves the API: OpenAI's ImagesResponse (JSON), image stream events (SSE) and the
WebSocket's events, made from the worker's typed events in one place each."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..errors import to_openai
from ..protocol import (
    OPENAI_RESPONSE_SIZES,
    GenerationJob,
    GenerationResult,
    ImageData,
    ImageEvent,
    ImagesResponse,
    PartialImageEvent,
    ProgressEvent,
    WorkerEvent,
)
from .store import ImageStore

NO_USAGE = {"total_tokens": 0, "input_tokens": 0, "output_tokens": 0, "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}


def openai_size(job: GenerationJob) -> str | None:
    """The job's size when it is one of OpenAI's enum values; strict clients decode nothing else."""
    size = f"{job.width}x{job.height}"
    return size if size in OPENAI_RESPONSE_SIZES else None


def server_timing(result: GenerationResult) -> str:
    """`Server-Timing` header (W3C): where the time went inside HyperGen, in milliseconds, and
    how many images the request's pipeline call made."""
    durations = (("queue", result.queue_wait_s), ("generation", result.generation_s), ("encode", result.encode_s))
    parts = [f"{name};dur={seconds * 1000:.2f}" for name, seconds in durations]
    return ", ".join([*parts, f'batch;desc="{result.batch_images}"'])


async def images_response(
    result: GenerationResult, job: GenerationJob, response_format: str, base_url: str, store: ImageStore
) -> ImagesResponse:
    """OpenAI's ImagesResponse: the images inline (b64_json), or stored and linked (url)."""
    if response_format == "b64_json":
        data = [ImageData(b64_json=image) for image in result.images_b64]
    else:
        file_ids = await run_in_threadpool(lambda: [store.put(base64.b64decode(image), job.output_format) for image in result.images_b64])
        data = [ImageData(url=f"{base_url.rstrip('/')}/v1/images/files/{file_id}") for file_id in file_ids]
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        background="opaque",
        output_format=job.output_format,
        size=openai_size(job),
        quality=job.quality,
    )


def stream_event(event: WorkerEvent, job: GenerationJob, prefix: str) -> dict[str, Any]:
    """OpenAI's image stream event (`<prefix>.partial_image` / `<prefix>.completed`), or
    HyperGen's `progress`. The schema requires `size`, `quality`, `background`: `auto` unless
    known (every model served today draws opaque images); `image_index` tells the images of an `n > 1` request apart."""
    if isinstance(event, ProgressEvent):
        return {"type": "progress", "step": event.step, "total_steps": event.total_steps}
    assert isinstance(event, (PartialImageEvent, ImageEvent))
    partial = isinstance(event, PartialImageEvent)
    body: dict[str, Any] = {
        "type": f"{prefix}.partial_image" if partial else f"{prefix}.completed",
        "b64_json": event.b64_json,
        "created_at": int(time.time()),
        "size": openai_size(job) or "auto",
        "quality": job.quality or "auto",
        "background": "opaque",
        "output_format": job.output_format,
    }
    if isinstance(event, PartialImageEvent):
        body["partial_image_index"] = event.partial_image_index
    else:
        body["usage"] = NO_USAGE
    if job.n > 1:
        body["image_index"] = event.image_index
    return body


async def openai_events(events: AsyncIterator[WorkerEvent], job: GenerationJob, prefix: str) -> AsyncIterator[dict[str, Any]]:
    """The client's events; a failure after the first event is one last `error` event (the
    response has started: no status code can say it any more)."""
    async with aclosing(events) as stream:
        try:
            async for event in stream:
                yield stream_event(event, job, prefix)
        except Exception as error:
            yield {"type": "error", **to_openai(error, job.request_id).body()}


async def sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-Sent Events text: `event: <type>` and the event as one JSON data line."""
    async with aclosing(events) as stream:
        async for event in stream:
            yield f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"

"""The serving layer: a validated request becomes a job, is dispatched, and its images come back
as OpenAI's ImagesResponse, SSE events or WebSocket events. The parts live in their own
modules (jobs, dispatch, responses, readiness); this class wires them for the routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..config import Settings
from ..errors import OpenAIError, from_worker, model_not_found
from ..metrics import metrics
from ..protocol import (
    GenerationJob,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequestOptions,
    ImagesResponse,
    ImageVariationRequest,
    LoraCommand,
    LoraReply,
    ModelCard,
    ModelLimits,
    ModelList,
    VideoLimits,
)
from . import jobs
from .dispatch import Admission, Dispatcher
from .pool import WorkerPool
from .queue import AdmissionQueue
from .ratelimit import RateLimiter
from .readiness import Readiness
from .responses import images_response, openai_events, server_timing, sse
from .store import ImageStore
from .uploads import FittedUpload, default_size, fit_upload, open_upload

# A plain request's response and its Server-Timing value, or a streaming request's SSE text.
Served = tuple[ImagesResponse, str] | AsyncIterator[str]

QUEUE_UPDATE_INTERVAL_S = 0.25
# Uploads decoded at once: each may be tens of MB decoded, and decoding is CPU-bound anyway.
MAX_CONCURRENT_DECODES = 2


class ImageServing:
    def __init__(self, settings: Settings, worker: WorkerPool, store: ImageStore | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.readiness = Readiness(worker)
        self.dispatcher = Dispatcher(settings, worker, self.readiness)
        self.store = store or ImageStore(settings.home / "images", settings.url_ttl, settings.store_max_bytes)
        self.limiter = RateLimiter(settings.rate_rules)
        self.started = int(time.time())
        self._decoding = asyncio.Semaphore(MAX_CONCURRENT_DECODES)

    @property
    def queue(self) -> AdmissionQueue:
        return self.dispatcher.queue

    # --- models, health, adapters --------------------------------------------------------------

    async def health(self) -> tuple[bool, dict[str, Any]]:
        return await self.readiness.health(self.settings.served_model_name, self.queue, self.settings.max_queue)

    @property
    def all_model_names(self) -> list[str]:
        """The image models, then the video model (if any)."""
        video = self.settings.served_video_model_name
        return [*self.settings.model_names, *([video] if video else [])]

    async def model_list(self) -> ModelList:
        return ModelList(data=[await self.model_card(name) for name in self.all_model_names])

    async def model_card(self, model_id: str) -> ModelCard:
        """OpenAI's model object; with its sizes, modes and schedulers (a video model's fps and
        frames) once the worker has loaded it."""
        if model_id not in self.all_model_names:
            raise model_not_found(model_id, self.all_model_names)
        card = ModelCard(id=model_id, created=self.started)
        status = await self.readiness.status()
        for limits in [*status.models, *([status.video] if status.video else [])] if status.ready else []:
            if limits.id == model_id:
                card.native_size = f"{limits.native_width}x{limits.native_height}"
                card.max_size = f"{limits.max_side}x{limits.max_side}"
                card.modes, card.schedulers = limits.modes, limits.schedulers or None
                if isinstance(limits, VideoLimits):
                    card.fps, card.max_frames = limits.fps, limits.max_frames
        return card

    async def manage_loras(self, command: LoraCommand, request_id: str) -> LoraReply:
        """Forward an adapter operation to the workers; a failure becomes OpenAI's error."""
        await self.readiness.ready_models()
        reply = await self.worker.manage_loras(command)
        if reply.error is not None:
            raise from_worker(reply.error, request_id)
        return reply

    # --- rate limits ---------------------------------------------------------------------------

    def charge_request(self, client_key: str) -> dict[str, str]:
        """Count one request against the client's limits; `x-ratelimit-*` headers or a 429."""
        return self._limited(lambda: self.limiter.acquire(client_key, "requests"))

    def charge_images(self, client_key: str, count: int) -> dict[str, str]:
        return self._limited(lambda: self.limiter.acquire(client_key, "images", count))

    @staticmethod
    def _limited(acquire: Any) -> dict[str, str]:
        try:
            return acquire()
        except OpenAIError:
            metrics().rejected.labels(reason="rate_limited").inc()
            raise

    def full_queue_error(self) -> OpenAIError:
        return self.dispatcher.full_queue_error()

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, request: ImageGenerationRequest, request_id: str, base_url: str) -> Served:
        job = await self._generation_job(request, request_id)
        return await self._serve(job, request, base_url, "image_generation")

    async def edit(self, request: ImageEditRequest, image: bytes, mask: bytes | None, request_id: str, base_url: str) -> Served:
        """Inpainting (mask: transparent = edit) of one uploaded image; without a mask, an
        instruction-edit model's own edit (the image as its reference) or else image-to-image."""
        limits = jobs.resolve_model(request.model, await self.readiness.ready_models())
        mode = jobs.edit_mode(limits, mask is not None, request.strength)
        strength = request.strength or jobs.EDIT_STRENGTHS.get(mode)  # None: an instruction edit takes none
        upload = await self._prepare_upload(image, mask, request.size, limits)
        jobs.refuse_unaffordable_size(limits, upload.image.size, self.settings.request_timeout)
        job = jobs.build_job(request, limits, request_id, request.prompt, request.negative_prompt, upload.image.size)
        return await self._serve(jobs.with_upload(job, mode, strength, upload, limits), request, base_url, "image_edit")

    async def vary(self, request: ImageVariationRequest, image: bytes, request_id: str, base_url: str) -> Served:
        """Variations: image-to-image with an empty prompt (strength 0.6 by default)."""
        if request.stream:
            raise jobs.refuse_streamed_variation()
        limits = jobs.resolve_model(request.model, await self.readiness.ready_models())
        upload = await self._prepare_upload(image, None, request.size, limits)
        jobs.refuse_unaffordable_size(limits, upload.image.size, self.settings.request_timeout)
        job = jobs.build_job(request, limits, request_id, jobs.VARIATION_PROMPT, None, upload.image.size)
        strength = request.strength or jobs.VARIATION_STRENGTH
        return await self._serve(jobs.with_upload(job, "image-to-image", strength, upload, limits), request, base_url, "")

    async def _generation_job(self, request: ImageGenerationRequest, request_id: str) -> GenerationJob:
        limits = jobs.resolve_model(request.model, await self.readiness.ready_models())
        jobs.refuse_drawing_without_image(limits)
        size = jobs.resolve_size(limits, request.size)
        jobs.refuse_unaffordable_size(limits, size, self.settings.request_timeout)
        return jobs.build_job(request, limits, request_id, request.prompt, request.negative_prompt, size)

    async def _serve(self, job: GenerationJob, request: ImageRequestOptions, base_url: str, prefix: str) -> Served:
        if request.stream:
            # Admitted now, so a full queue is a plain 503 before any event.
            deadline = self.dispatcher.deadline()
            admission = await self.dispatcher.admit(deadline)
            events = self.dispatcher.stream(job, admission, deadline, request.partial_images or 0)
            return sse(openai_events(events, job, prefix))
        result = await self.dispatcher.run(job)
        response_format = request.response_format or self.settings.default_response_format
        formatted = await images_response(result, job, response_format, self.settings.public_url or base_url, self.store)
        return formatted, server_timing(result)

    async def _prepare_upload(self, image: bytes, mask: bytes | None, size: str | None, limits: ModelLimits) -> FittedUpload:
        """Decode, check and fit the upload off the event loop: only when the queue has room
        (a request that would be refused is never decoded), a few at a time (a decoded 4096²
        upload is 64 MB: 24 at once took the API process to 4 GB)."""
        if self.queue.full:
            raise self.full_queue_error()

        def prepare() -> FittedUpload:
            decoded = open_upload(image, "image", self.settings.max_upload_pixels)
            decoded_mask = open_upload(mask, "mask", self.settings.max_upload_pixels) if mask is not None else None
            if size is None or size.strip().lower() == "auto":
                target = default_size(*decoded.size, max_side=limits.max_side, min_side=limits.min_side, multiple=limits.size_multiple)
            else:
                target = jobs.resolve_size(limits, size)
            return fit_upload(decoded, decoded_mask, target)

        async with self._decoding:
            return await run_in_threadpool(prepare)

    # --- WebSocket -----------------------------------------------------------------------------

    async def socket_events(self, request: ImageGenerationRequest, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """The WebSocket protocol: `queued` (position, estimated wait; again whenever the position
        changes), `started`, `progress` per step, partial images, `image_generation.completed` per
        image, or `error`."""
        job = await self._generation_job(request, request_id)
        deadline = self.dispatcher.deadline()
        admission = self.dispatcher.admission(deadline)
        async with aclosing(self._wait_for_turn(admission, request_id)) as updates:
            async for update in updates:
                yield update
        try:
            yield {"type": "started", "request_id": request_id, "total_steps": job.num_inference_steps}
        except BaseException:  # the client left before its stream began: give the slot back
            await admission.release()
            raise
        events = self.dispatcher.stream(job, admission, deadline, request.partial_images or 0, progress=True)
        async with aclosing(openai_events(events, job, "image_generation")) as stream:
            async for event in stream:
                yield event

    async def _wait_for_turn(self, admission: Admission, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """`queued` events while the request waits; returns once it holds its slot. A client that
        leaves meanwhile gives its place (or its slot) back."""
        entering = asyncio.ensure_future(admission.enter())
        await asyncio.sleep(0)  # let it take a free slot or join the queue
        last_position = None
        try:
            while last_position is None or not entering.done():
                position = 0 if entering.done() else admission.position
                if position != last_position:
                    wait_s = self.dispatcher.estimated_wait(position)
                    yield {"type": "queued", "request_id": request_id, "position": position, "estimated_wait_s": wait_s}
                    last_position = position
                if not entering.done():
                    await asyncio.wait({entering}, timeout=QUEUE_UPDATE_INTERVAL_S)
            entering.result()  # a full queue (503) or no turn in time (504) raises here
        except BaseException:
            if not entering.done():
                entering.cancel()
            elif not entering.cancelled() and entering.exception() is None:
                await admission.release()
            raise

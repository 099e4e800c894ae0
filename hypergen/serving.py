"""The serving layer: a validated request becomes a job, waits its turn, and its images come back
formatted as OpenAI's ImagesResponse."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import sys
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Protocol, Sequence

from starlette.concurrency import run_in_threadpool

from .balancing import WorkerPool
from .config import Settings
from .errors import (
    OpenAIError,
    generation_failed,
    invalid_value,
    model_not_found,
    not_ready_error,
    queue_full_error,
    timeout_error,
)
from .images import FittedUpload, default_size, fit_upload, open_upload, to_png_b64
from .metrics import metrics
from .protocol import (
    MAX_SEED,
    OPENAI_RESPONSE_SIZES,
    GenerationJob,
    GenerationResult,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequestOptions,
    ImagesResponse,
    ImageVariationRequest,
    LoraCommand,
    LoraReply,
    Mode,
    ModelCard,
    ModelLimits,
    ModelList,
    WorkerStatus,
)
from .queue import AdmissionQueue, QueueFull
from .ratelimit import RateLimiter, parse_rate_limit
from .store import ImageStore

logger = logging.getLogger("hypergen.requests")

# How long a known-ready worker status is trusted before asking again.
STATUS_TTL_S = 5.0
STATUS_CALL_TIMEOUT_S = 3.0
# BentoML's adaptive batcher trains on its first 11 calls, and while training it holds single
# requests back for up to ~4 generation times, waiting for company (measured: an idle server's
# 10th and 11th requests waited ~840 ms at 20 steps). One-step warm-up calls spend that before
# /health reports ready.
BATCHER_WARMUP_CALLS = 12
QUEUE_UPDATE_INTERVAL_S = 0.25
# Uploads decoded at once: each may be tens of MB decoded, and decoding is CPU-bound anyway.
MAX_CONCURRENT_DECODES = 2
# Variations have no prompt: an empty one lets the model vary the image freely (guidance then
# has nothing to pull towards, so any guidance scale gives the same result).
VARIATION_PROMPT = ""


class WorkerClient(Protocol):
    """What the API needs from the diffusion worker (a BentoML dependency, or an in-process engine)."""

    async def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]: ...

    async def status(self) -> WorkerStatus: ...

    async def manage_loras(self, command: LoraCommand) -> LoraReply: ...

    def generate_stream(self, job: GenerationJob, partial_images: int, progress: bool = False) -> AsyncIterator[dict[str, Any]]: ...

    async def cancel(self, job_id: str) -> None: ...


def keep_worker_session_open(dependency: Any) -> None:
    """Stop BentoML (>= 1.4.30) from recycling the dependency's HTTP session.

    Its client closes and replaces the aiohttp session every 100 requests or 5 minutes, and
    closing it drops every request still in flight on it (`ServerDisconnectedError`; BentoML
    issues #5540, #5544). Measured here: at concurrency 8, the requests around the 100th all
    failed. Diffusion requests are long, so the session is kept for the process's lifetime.
    """
    manager = getattr(getattr(dependency, "to_async", None), "_session_manager", None)
    if manager is not None and hasattr(manager, "max_requests"):
        manager.max_requests = sys.maxsize
        manager.max_age = float("inf")


class BentoWorkerClient:
    """Calls the `DiffusionWorker` service through `bentoml.depends`."""

    def __init__(self, dependency: Any) -> None:
        self._worker = dependency
        keep_worker_session_open(dependency)

    async def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        results = await self._worker.to_async.generate(list(jobs))
        return [GenerationResult.model_validate(result) for result in results]

    async def status(self) -> WorkerStatus:
        return WorkerStatus.model_validate(await self._worker.to_async.status())

    async def manage_loras(self, command: LoraCommand) -> LoraReply:
        return LoraReply.model_validate(await self._worker.to_async.manage_loras(command))

    async def cancel(self, job_id: str) -> None:
        await self._worker.to_async.cancel(job_id=job_id)

    async def generate_stream(
        self, job: GenerationJob, partial_images: int, progress: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """The worker's JSON-lines stream, reassembled into events (chunks may merge or split)."""
        buffer = ""
        # Leaving early does not close BentoML's HTTP response (the worker learns it through
        # `cancel`), but aclosing still ends BentoML's generator now rather than at collection.
        async with aclosing(self._worker.to_async.generate_stream(job=job, partial_images=partial_images, progress=progress)) as stream:
            async for chunk in stream:
                buffer += chunk if isinstance(chunk, str) else chunk.decode()
                while "\n" in buffer:
                    line, buffer = buffer.split("\n", 1)
                    if line.strip():
                        yield json.loads(line)


def worker_client(dependencies: dict[str, Any]) -> WorkerClient:
    """The API's client for the worker services (service name → `bentoml.depends` handle): one
    worker directly, several through a pool that balances them by load."""
    clients = [BentoWorkerClient(dependency) for dependency in dependencies.values()]
    return clients[0] if len(clients) == 1 else WorkerPool(clients, list(dependencies), BATCHER_WARMUP_CALLS)


def server_timing(result: GenerationResult) -> str:
    """`Server-Timing` header (W3C): where the time went inside HyperGen, in milliseconds, and
    how many images the request's pipeline call made."""
    durations = (("queue", result.queue_wait_s), ("generation", result.generation_s), ("encode", result.encode_s))
    parts = [f"{name};dur={seconds * 1000:.2f}" for name, seconds in durations]
    return ", ".join([*parts, f'batch;desc="{result.batch_images}"'])


Served = tuple[ImagesResponse | AsyncIterator[str], str]


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def stream_event(event_type: str, job: GenerationJob, event: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI image stream event; `size` is `auto` unless it is one of OpenAI's sizes, and
    `image_index` tells the images of an `n > 1` request apart."""
    size = f"{job.width}x{job.height}"
    body: dict[str, Any] = {
        "type": event_type,
        "b64_json": event["b64_json"],
        "created_at": int(time.time()),
        "size": size if size in OPENAI_RESPONSE_SIZES else "auto",
        "quality": "auto",
        "background": "auto",
        "output_format": job.output_format,
    }
    if "partial_image_index" in event:
        body["partial_image_index"] = event["partial_image_index"]
    else:
        body["usage"] = {"total_tokens": 0, "input_tokens": 0, "output_tokens": 0, "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}
    if job.n > 1:
        body["image_index"] = event["image_index"]
    return body


def _queue_gauges(depth: int, in_flight: int) -> None:
    metrics().queue_depth.set(depth)
    metrics().in_flight.set(in_flight)


class ImageServing:
    """Admission, job building, the worker call and response formatting for image requests."""

    def __init__(self, settings: Settings, worker: WorkerClient, store: ImageStore | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.store = store or ImageStore(settings.home / "images", settings.url_ttl, settings.store_max_bytes)
        # Each worker takes up to a batch at once; more waiting would only add to BentoML's queue.
        in_flight = settings.max_batch_size * (worker.size if isinstance(worker, WorkerPool) else 1)
        self.queue = AdmissionQueue(settings.max_queue, max_in_flight=in_flight, on_change=_queue_gauges)
        self.limiter = RateLimiter(parse_rate_limit(settings.rate_limit))
        self.started = int(time.time())
        self._status: WorkerStatus | None = None
        self._status_checked = 0.0
        self._warm_up: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._recent_call_s = 0.0  # moving average of pipeline-call durations, for wait estimates
        self._decoding = asyncio.Semaphore(MAX_CONCURRENT_DECODES)
        self.warmed_up = False

    # --- readiness and models --------------------------------------------------------------------

    async def worker_status(self) -> WorkerStatus:
        """The worker's status, cached briefly once ready; unreachable counts as not ready."""
        if self._status and self._status.ready and time.monotonic() - self._status_checked < STATUS_TTL_S:
            return self._status
        try:
            status = await asyncio.wait_for(self.worker.status(), STATUS_CALL_TIMEOUT_S)
        except Exception as error:  # the worker process is starting, restarting or gone
            status = WorkerStatus(ready=False, detail=f"the diffusion worker is not reachable yet ({type(error).__name__})")
        if not status.ready and self.warmed_up and self._warm_up is not None:
            # The worker went away (BentoML restarts it): its new batcher needs warming again.
            logger.warning("the diffusion worker is not ready any more: %s", status.detail)
            self.warmed_up, self._warm_up = False, None
        if status.ready and not self.warmed_up:
            if self._warm_up is None:
                self._warm_up = asyncio.create_task(self._warm_up_batcher(status.models[0]))
            status = status.model_copy(update={"ready": False, "detail": "warming up the batcher"})
        self._status, self._status_checked = status, time.monotonic()
        return status

    def start_warm_up(self) -> None:
        """Begin polling the worker in the background; warm up its batcher once it is loaded."""

        async def poll() -> None:
            while not self.warmed_up:
                await self.worker_status()
                await asyncio.sleep(0.2)

        asyncio.get_running_loop().create_task(poll())

    async def _warm_up_batcher(self, model: ModelLimits) -> None:
        # A pool warms each of its workers itself, before it reports them ready.
        if not isinstance(self.worker, WorkerPool):
            started = time.perf_counter()
            try:
                for index in range(BATCHER_WARMUP_CALLS):
                    await self.worker.generate([GenerationJob.warm_up(model, index)])
                logger.info("batcher warmed up with %d one-step calls in %.2fs", BATCHER_WARMUP_CALLS, time.perf_counter() - started)
            except Exception:  # a model that cannot run one step will fail real requests visibly
                logger.exception("warming up the batcher failed; serving without it")
        self.warmed_up = True
        self._status = None

    async def ready_models(self) -> list[ModelLimits]:
        status = await self.worker_status()
        if not status.ready:
            metrics().rejected.labels(reason="not_ready").inc()
            raise not_ready_error(f"The server is not ready: {status.detail}.")
        return status.models

    async def health(self) -> tuple[bool, dict[str, Any]]:
        status = await self.worker_status()
        body = {
            "status": "ok" if status.ready else "loading",
            "model": self.settings.served_model_name,
            "models": [model.id for model in status.models],
            "device": status.device,
            "dtype": status.dtype,
            "queue_depth": self.queue.depth,
            "max_queue_size": self.settings.max_queue,
            "in_flight": self.queue.in_flight,
        }
        if status.memory:
            body["memory"] = status.memory
        # The worker's own view: a call can outlive the requests the API has already given up on.
        body["busy"] = [{**call, "running_s": round(time.time() - call["started_at"], 1)} for call in status.busy]
        if isinstance(self.worker, WorkerPool):  # live counts, not the cached status's
            body["workers"] = [load.as_dict() for load in self.worker.loads]
        if not status.ready:
            body["detail"] = status.detail
        return status.ready, body

    def model_list(self) -> ModelList:
        return ModelList(data=[self.model_card(name) for name in self.settings.model_names])

    def model_card(self, model_id: str) -> ModelCard:
        if model_id not in self.settings.model_names:
            raise model_not_found(model_id, self.settings.model_names)
        return ModelCard(id=model_id, created=self.started)

    # --- LoRA adapters ---------------------------------------------------------------------------

    async def manage_loras(self, command: LoraCommand) -> LoraReply:
        """Forward an adapter operation to the worker; failures become OpenAI errors."""
        await self.ready_models()
        reply = await self.worker.manage_loras(command)
        if not reply.ok:
            code = {404: "not_found", 409: "conflict"}.get(reply.status, "invalid_value")
            param = {"load": "path", "unload": "name"}.get(command.action) if reply.status == 400 else None
            raise OpenAIError(reply.status, reply.message, param=param, code=code)
        return reply

    # --- generation ------------------------------------------------------------------------------

    async def generate(self, request: ImageGenerationRequest, request_id: str, base_url: str) -> Served:
        """The response (or, with `stream`, its Server-Sent Events) and its `Server-Timing` value."""
        job = await self._generation_job(request, request_id)
        if request.stream:
            return await self._serve_stream(job, request, "image_generation")
        return await self._serve(job, request, base_url)

    async def _generation_job(self, request: ImageGenerationRequest, request_id: str) -> GenerationJob:
        limits = self._resolve_model(request.model, await self.ready_models())
        try:
            width, height = limits.resolve_size(request.size)
        except ValueError as error:
            raise invalid_value("size", f"Invalid 'size': {error}.") from None
        return self._build_job(request, limits, request_id, request.prompt, request.negative_prompt, (width, height))

    async def edit(
        self, request: ImageEditRequest, image: bytes, mask: bytes | None, request_id: str, base_url: str
    ) -> Served:
        """Image-to-image (no mask) or inpainting (mask: transparent = edit) of one uploaded image."""
        mode: Mode = "inpainting" if mask is not None else "image-to-image"
        limits = self._resolve_model(request.model, await self.ready_models())
        strength = request.strength or (1.0 if mask is not None else 0.75)
        upload = await self._prepare_upload(image, mask, request.size, limits)
        job = self._build_job(request, limits, request_id, request.prompt, request.negative_prompt, upload.image.size)
        job = self._with_upload(job, mode, strength, upload, limits)
        if request.stream:
            return await self._serve_stream(job, request, "image_edit")
        return await self._serve(job, request, base_url)

    async def vary(self, request: ImageVariationRequest, image: bytes, request_id: str, base_url: str) -> Served:
        """Variations: image-to-image with an empty prompt at strength 0.6 (by default)."""
        if request.stream:
            raise invalid_value("stream", "Variations cannot be streamed (as in OpenAI's API); send 'stream': false.")
        limits = self._resolve_model(request.model, await self.ready_models())
        upload = await self._prepare_upload(image, None, request.size, limits)
        job = self._build_job(request, limits, request_id, VARIATION_PROMPT, None, upload.image.size)
        return await self._serve(self._with_upload(job, "image-to-image", request.strength or 0.6, upload, limits), request, base_url)

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
                target = default_size(*decoded.size, max_side=limits.max_side, min_side=limits.min_side)
            else:
                try:
                    target = limits.resolve_size(size)
                except ValueError as error:
                    raise invalid_value("size", f"Invalid 'size': {error}.") from None
            return fit_upload(decoded, decoded_mask, target)

        async with self._decoding:
            return await run_in_threadpool(prepare)

    @staticmethod
    def _with_upload(job: GenerationJob, mode: Mode, strength: float, upload: FittedUpload, limits: ModelLimits) -> GenerationJob:
        if mode not in limits.modes:
            param = "mask" if mode == "inpainting" else "image"
            raise invalid_value(
                param, f"Model '{limits.id}' cannot do {mode}; it supports: {', '.join(limits.modes)}."
            )
        if int(job.num_inference_steps * strength) < 1:
            raise invalid_value(
                "strength",
                f"strength {strength} × num_inference_steps {job.num_inference_steps} leaves no denoising step; "
                "raise either so that their product is at least 1.",
            )
        return job.model_copy(
            update={
                "mode": mode,
                "strength": strength,
                "image_b64": to_png_b64(upload.image),
                "mask_b64": to_png_b64(upload.mask) if upload.mask is not None else None,
            }
        )

    def charge_request(self, client_key: str) -> dict[str, str]:
        """Count one image request against the client's limits; `x-ratelimit-*` headers or a 429."""
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

    async def _serve_stream(self, job: GenerationJob, request: ImageRequestOptions, prefix: str) -> Served:
        """Admit now (a full queue, or no turn before the timeout, is a plain 503/504 before any
        event), then stream the events; the request timeout counts from arrival."""
        deadline = self._deadline()
        slot = await self._admit(deadline)
        return self._sse(self.stream_events(job, request.partial_images or 0, prefix, slot, deadline=deadline)), ""

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.request_timeout

    async def _admit(self, deadline: float) -> Any:
        """Enter a queue slot (waiting FIFO) by `deadline`; the caller must exit it. A full queue
        is a 503, a turn that does not come in time a 504."""
        slot = self.queue.slot()
        try:
            async with asyncio.timeout_at(deadline):
                await slot.__aenter__()
        except QueueFull:
            raise self.full_queue_error() from None
        except TimeoutError:
            metrics().rejected.labels(reason="timeout").inc()
            raise timeout_error(self.settings.request_timeout) from None
        return slot

    @staticmethod
    async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        async with aclosing(events) as stream:
            async for event in stream:
                yield sse(event["type"], event.get("body", event))

    async def stream_events(
        self, job: GenerationJob, partial_images: int, prefix: str, slot: Any, progress: bool = False, deadline: float = 0.0
    ) -> AsyncIterator[dict[str, Any]]:
        """A streaming job's events, holding its queue slot: `<prefix>.partial_image`, then
        `<prefix>.completed` per image (with `progress` also `progress` per step); a failure is
        an `error` event. Closing the iterator early cancels the job in the worker."""
        started = time.perf_counter()
        result: GenerationResult | None = None
        status = 500
        try:
            async with asyncio.timeout_at(deadline or self._deadline()), aclosing(
                self.worker.generate_stream(job, partial_images, progress)
            ) as events:
                async for event in events:
                    if event["kind"] == "partial":
                        yield {"type": f"{prefix}.partial_image", "body": stream_event(f"{prefix}.partial_image", job, event)}
                    elif event["kind"] == "image":
                        yield {"type": f"{prefix}.completed", "body": stream_event(f"{prefix}.completed", job, event)}
                    elif event["kind"] == "progress":
                        yield {"type": "progress", "step": event["step"], "total_steps": event["total_steps"]}
                    elif event["kind"] == "done":
                        result, status = GenerationResult.model_validate(event["result"]), 200
                    else:
                        failed = GenerationResult.model_validate(event["result"])
                        status = failed.error_status
                        logger.error("request %s: generation failed: %s", job.request_id, failed.error)
                        error = (
                            invalid_value(failed.error_param or "lora_path", failed.error or "")
                            if failed.error_status == 400
                            else generation_failed(job.request_id)
                        )
                        yield {"type": "error", "body": error.body()}
        except TimeoutError:
            status = 504
            self._cancel_in_worker(job)
            yield {"type": "error", "body": timeout_error(self.settings.request_timeout).body()}
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away: tell the worker to drop or interrupt the job
            self._cancel_in_worker(job)
            raise
        except Exception:  # the worker died mid-stream: the headers are sent, so an error event
            logger.exception("request %s: the worker's stream failed", job.request_id)
            self._status = None  # ask again: the worker may have died
            self._cancel_in_worker(job)
            yield {"type": "error", "body": generation_failed(job.request_id).body()}
        finally:
            await slot.__aexit__(None, None, None)
            self._log_request(job, status, started, result)

    def _estimated_wait(self, position: int) -> float:
        """Seconds until a request at `position` starts: the calls ahead of it (a batch each) and
        the one running (a batch per worker), at the recent pipeline-call duration. At position
        0 the request holds its own dispatch slot: only others in flight can be ahead of it."""
        others_in_flight = self.queue.in_flight - (1 if position == 0 else 0)
        calls_ahead = -(-position // self.queue.max_in_flight) + (1 if others_in_flight > 0 else 0)
        return round(calls_ahead * self._recent_call_s, 2)

    async def socket_events(self, request: ImageGenerationRequest, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """The WebSocket protocol: `queued` (position, estimated wait; again whenever the position
        changes), `started`, `progress` per step, partial images, `image_generation.completed` per
        image, or `error`."""
        job = await self._generation_job(request, request_id)
        deadline = self._deadline()
        turns: list[Any] = []
        slot = self.queue.slot(on_wait=turns.append)
        admission = asyncio.ensure_future(slot.__aenter__())
        await asyncio.sleep(0)  # let it take a free slot or join the queue
        last_position = None
        try:
            while last_position is None or not admission.done():
                if asyncio.get_running_loop().time() >= deadline:
                    metrics().rejected.labels(reason="timeout").inc()
                    raise timeout_error(self.settings.request_timeout)
                position = self.queue.position(turns[0]) if turns else 0
                if position != last_position:
                    wait_s = self._estimated_wait(position)
                    yield {"type": "queued", "request_id": request_id, "position": position, "estimated_wait_s": wait_s}
                    last_position = position
                if not admission.done():
                    await asyncio.wait({admission}, timeout=QUEUE_UPDATE_INTERVAL_S)
        except BaseException:  # the client left while waiting: give the place or the slot back
            if not admission.done():
                admission.cancel()
            elif admission.exception() is None:
                await slot.__aexit__(None, None, None)
            raise
        if isinstance(admission.exception(), QueueFull):
            raise self.full_queue_error()
        admission.result()
        yield {"type": "started", "request_id": request_id, "total_steps": job.num_inference_steps}
        events_of_job = self.stream_events(job, request.partial_images or 0, "image_generation", slot, progress=True, deadline=deadline)
        async with aclosing(events_of_job) as events:
            async for event in events:
                yield {"type": event["type"], **event["body"]} if "body" in event else event

    async def _serve(self, job: GenerationJob, request: ImageRequestOptions, base_url: str) -> Served:
        started = time.perf_counter()
        result: GenerationResult | None = None
        status = 500
        try:
            result = await asyncio.wait_for(self._run(job), self.settings.request_timeout)
            status = 200
        except asyncio.TimeoutError:
            status = 504
            metrics().rejected.labels(reason="timeout").inc()
            self._cancel_in_worker(job)  # and stop spending the GPU on it
            raise timeout_error(self.settings.request_timeout) from None
        except OpenAIError as error:
            status = error.status_code
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away: its slot is freed, its job dropped or interrupted
            self._cancel_in_worker(job)
            raise
        finally:
            self._log_request(job, status, started, result)
        response_format = request.response_format or self.settings.default_response_format
        return await self._format(result, job, response_format, base_url), server_timing(result)

    def _resolve_model(self, requested: str | None, models: list[ModelLimits]) -> ModelLimits:
        if not models:
            raise not_ready_error("The server is not ready: no model is loaded.")
        if requested is None or requested == "":
            return models[0]
        for limits in models:
            if limits.id == requested:
                return limits
        raise model_not_found(requested, [limits.id for limits in models])

    def _build_job(
        self,
        request: ImageRequestOptions,
        limits: ModelLimits,
        request_id: str,
        prompt: str,
        negative_prompt: str | None,
        size: tuple[int, int],
    ) -> GenerationJob:
        n = request.n or 1
        # With a seed, image i uses seed + i, so a request is reproducible; without, each image is new.
        if request.seed is not None:
            seeds = [(request.seed + index) % (MAX_SEED + 1) for index in range(n)]
        else:
            seeds = [secrets.randbelow(MAX_SEED + 1) for _ in range(n)]
        return GenerationJob(
            request_id=request_id,
            model=limits.id,
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=size[0],
            height=size[1],
            num_inference_steps=request.num_inference_steps or limits.default_steps,
            guidance_scale=request.guidance_scale if request.guidance_scale is not None else limits.default_guidance_scale,
            seeds=seeds,
            output_format=request.output_format or "png",
            output_compression=100 if request.output_compression is None else request.output_compression,
            lora_path=request.lora_path,
            lora_scale=request.lora_scale,
            admitted_at=time.time(),
        )

    async def _run(self, job: GenerationJob) -> GenerationResult:
        try:
            async with self.queue.slot():
                results = await self.worker.generate([job])
        except QueueFull:
            raise self.full_queue_error() from None
        except OpenAIError:
            raise
        except Exception:
            logger.exception("request %s: calling the diffusion worker failed", job.request_id)
            self._status = None  # ask again: the worker may have died
            raise generation_failed(job.request_id) from None
        result = results[0]
        if result.error and result.error_status == 400:
            raise invalid_value(result.error_param or "lora_path", result.error)
        if result.error or len(result.images_b64) != job.n:
            logger.error("request %s: generation failed: %s", job.request_id, result.error or "images missing")
            raise generation_failed(job.request_id)
        return result

    def _cancel_in_worker(self, job: GenerationJob) -> None:
        """Fire and forget: the worker drops the job, or interrupts its call once nobody is left."""

        async def cancel() -> None:
            try:
                await self.worker.cancel(job.job_id)
            except Exception:  # the worker is gone or restarting: nothing left to cancel
                logger.warning("request %s: could not cancel it in the worker", job.request_id)

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def full_queue_error(self) -> OpenAIError:
        """The 503 for a full queue (counted in metrics), with a Retry-After estimate."""
        metrics().rejected.labels(reason="queue_full").inc()
        return queue_full_error(self.settings.max_queue, retry_after=self._retry_after())

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: about one batch per waiting batch, capped at a minute."""
        return max(1, min(60, 1 + self.queue.depth // self.queue.max_in_flight))

    async def _format(self, result: GenerationResult, job: GenerationJob, response_format: str, base_url: str) -> ImagesResponse:
        if response_format == "b64_json":
            data = [ImageData(b64_json=image) for image in result.images_b64]
        else:
            base = (self.settings.public_url or base_url).rstrip("/")
            file_ids = await run_in_threadpool(
                lambda: [self.store.put(base64.b64decode(image), job.output_format) for image in result.images_b64]
            )
            data = [ImageData(url=f"{base}/v1/images/files/{file_id}") for file_id in file_ids]
        size = f"{job.width}x{job.height}"
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=job.output_format,
            size=size if size in OPENAI_RESPONSE_SIZES else None,
        )

    def _log_request(self, job: GenerationJob, status: int, started: float, result: GenerationResult | None) -> None:
        if result is not None and result.generation_s > 0:
            self._recent_call_s = result.generation_s if not self._recent_call_s else 0.8 * self._recent_call_s + 0.2 * result.generation_s
        logger.info(
            "request %s status=%d n=%d size=%dx%d steps=%d queue_wait=%.1fms generation=%.3fs batch_images=%d total=%.3fs",
            job.request_id,
            status,
            job.n,
            job.width,
            job.height,
            job.num_inference_steps,
            (result.queue_wait_s * 1000) if result else -1.0,
            result.generation_s if result else 0.0,
            result.batch_images if result else 0,
            time.perf_counter() - started,
        )

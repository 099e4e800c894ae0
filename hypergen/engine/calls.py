"""Running a batch of jobs as grouped pipeline calls, on the engine's pipeline thread.

A failure that belongs to one job fails that job alone: its adapter cannot be had (400 for its
bad input, 500 otherwise), or its pipeline call fails and, retried alone, fails again. A call
that every job in it gave up on is interrupted and delivers no images.
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..codec import decode_image_b64, encode_image_b64
from ..metrics import metrics
from ..protocol import GenerationJob, GenerationResult, WorkerError
from .batching import PipelineCall, group_compatible_jobs
from .guidance import call_parameters, guidance_arguments
from .loras import Choice, LoraError, RoutingError
from .models import ServedModels
from .pipelines import call_context
from .previews import InterruptedInsideStep, StepPreviews, StreamTicket, interrupt_inside_steps, step_callback_arguments
from .schedulers import SchedulerChoice
from .streams import JobTable

logger = logging.getLogger("hypergen.engine")


class CallInterrupted(Exception):
    """A pipeline call stopped early because every request in it was cancelled."""


def keep_unmasked(generated: Any, original: Any, mask: Any) -> Any:
    """OpenAI's edit contract: pixels outside the mask come back as they were sent, not as the
    autoencoder's round trip of them. The mask is binarized at 50 % as diffusers does."""
    from PIL import Image

    binary = mask.convert("L").point(lambda value: 255 if value >= 128 else 0)
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), binary)


def observe_call(mode: str, images: int, requests: int, generation_s: float, encode_s: float) -> None:
    recorded = metrics()
    recorded.generation_seconds.labels(mode=mode).observe(generation_s)
    recorded.encode_seconds.observe(encode_s)
    recorded.batch_images.observe(images)
    recorded.batch_requests.observe(requests)
    recorded.images.labels(mode=mode).inc(images)
    import torch

    if torch.cuda.is_available():
        recorded.gpu_memory_bytes.set(torch.cuda.memory_allocated())


def failure(error: BaseException) -> WorkerError:
    return WorkerError(message=f"{type(error).__name__}: {error}")


@dataclass
class Batch:
    """One `run` of jobs: their results, adapters and streaming tickets (job index → ticket)."""

    jobs: list[GenerationJob]
    tickets: dict[int, StreamTicket]
    results: list[GenerationResult] = field(init=False)
    adapters: dict[int, list[Choice]] = field(default_factory=dict)  # job index → its adapters and scales

    def adapter_key(self, index: int) -> tuple[tuple[str, float | None], ...] | None:
        """None where the job's adapters can be routed per image (it may share any call), else
        the adapters and scales that a call with it must share."""
        choices = self.adapters.get(index, [])
        if all(adapter.routable for adapter, _ in choices):
            return None
        return tuple((adapter.name, scale) for adapter, scale in choices)

    def __post_init__(self) -> None:
        self.results = [GenerationResult(request_id=job.request_id) for job in self.jobs]

    def fail(self, index: int, error: WorkerError) -> None:
        self.results[index].error = error


class BatchRunner:
    def __init__(self, models: ServedModels, table: JobTable, max_batch_size: int) -> None:
        self.models = models
        self.table = table
        self.max_batch_size = max_batch_size
        self.busy: dict[str, Any] | None = None  # the pipeline call running now, for /health
        self.schedulers: dict[tuple[str, str], SchedulerChoice] = {}  # (model, mode) → its schedulers by name

    def run(self, jobs: list[GenerationJob], tickets: dict[int, StreamTicket] | None = None) -> list[GenerationResult]:
        """Run jobs (in arrival order) as grouped pipeline calls; one result per job. Streaming
        jobs (`tickets`) get progress and partial images and can be cancelled mid-call."""
        batch = Batch(jobs, tickets or {})
        if not self.models.ready:
            for index in range(len(jobs)):
                batch.fail(index, WorkerError(message=self.models.error or "the model is not loaded", status=503))
            return batch.results
        self._resolve_adapters(batch)
        runnable = [index for index, result in enumerate(batch.results) if result.error is None and not self._cancelled(batch, index)]
        keys = [batch.adapter_key(index) for index in runnable]
        for call in group_compatible_jobs([jobs[index] for index in runnable], self.max_batch_size, keys):
            call.images = [(runnable[job], image) for job, image in call.images]
            self._run_isolating_failures(batch, call)
        return batch.results

    def _all_gone(self, batch: Batch, call: PipelineCall) -> bool:
        return all(self._cancelled(batch, job) for job in call.job_indices)

    def _cancelled(self, batch: Batch, index: int) -> bool:
        ticket = batch.tickets.get(index)
        return (ticket is not None and ticket.cancelled.is_set()) or self.table.is_cancelled(batch.jobs[index].job_id)

    def _resolve_adapters(self, batch: Batch) -> None:
        """Each job's adapter, loading allowed paths on first use; a job whose adapter cannot be
        had fails alone (400 naming `lora_path` for a bad path) and does not run."""
        in_use: set[str] = set()
        for index, job in enumerate(batch.jobs):
            if not job.loras:
                continue
            if job.mode == "inpainting" and self.models.settings.inpaint_model and not self.models.is_extra(job.model):
                message = "LoRA adapters do not apply to the dedicated inpainting model (HYPERGEN_INPAINT_MODEL)."
                batch.fail(index, WorkerError(message=message, status=400, param=job.lora_field))
                continue
            try:
                manager = self.models.get(job.model)[1]
                choices: list[Choice] = []
                for choice in job.loras:
                    choices.append((manager.resolve(choice.path, protect=in_use), choice.scale))
                    in_use.add(choices[-1][0].name)
                batch.adapters[index] = choices
            except LoraError as error:
                batch.fail(index, WorkerError(message=error.message, status=400, param=job.lora_field))
            except Exception as error:
                logger.exception("request %s: resolving its adapter failed", job.request_id)
                batch.fail(index, failure(error))

    def _run_isolating_failures(self, batch: Batch, call: PipelineCall) -> None:
        """Run one call; if it fails and served several jobs, retry each job alone so that one
        bad request cannot fail the others."""
        try:
            self._run_call(batch, call)
            return
        except CallInterrupted as interrupted:
            # Everyone in the call had gone: half-denoised images must never be delivered.
            for job_index in call.job_indices:
                batch.fail(job_index, WorkerError(message=f"cancelled: {interrupted}", status=499))
            return
        except RoutingError as error:  # the adapters are now marked unroutable (LoraManager.routed)
            logger.info("per-image adapters do not fit this model (%s): running the call's requests one by one", error)
        except Exception as error:
            ids = ", ".join(batch.jobs[index].request_id for index in call.job_indices)
            logger.error("pipeline call for requests [%s] failed: %s\n%s", ids, error, traceback.format_exc())
            if len(call.job_indices) == 1:
                batch.fail(call.job_indices[0], failure(error))
                return
        for job_index in call.job_indices:
            alone = PipelineCall(call.key, [image for image in call.images if image[0] == job_index])
            try:
                self._run_call(batch, alone)
            except Exception as error:
                logger.error("request %s failed alone too: %s\n%s", batch.jobs[job_index].request_id, error, traceback.format_exc())
                batch.fail(job_index, failure(error))

    def _run_call(self, batch: Batch, call: PipelineCall) -> None:
        first_index = call.images[0][0]
        first = batch.jobs[first_index]
        loaded, loras = self.models.get(first.model)
        self.models.residency.use(loaded.name)
        per_image = [batch.adapters.get(job, []) for job, _ in call.images]
        routing = any(choices != per_image[0] for choices in per_image)
        if not routing:
            loras.activate(per_image[0])
        pipe = loaded.modes.get(first.mode)
        if pipe is None:
            raise ValueError(f"model '{first.model}' cannot do {first.mode}")
        arguments = call_arguments(batch.jobs, call, pipe)
        started_at = time.time()
        busy = {
            "requests": [batch.jobs[job].request_id for job in call.job_indices],
            "images": len(call.images),
            "size": f"{first.width}x{first.height}",
            "steps": first.num_inference_steps,
            "step": 0,
            "started_at": started_at,
        }
        call_tickets = {job: batch.tickets[job] for job in call.job_indices if job in batch.tickets}
        previews = StepPreviews(
            call.images,
            call_tickets,
            lambda job: self._cancelled(batch, job),
            on_step=lambda done: busy.update(step=done),
            total_steps=first.num_inference_steps,
        )
        arguments.update(step_callback_arguments(pipe, previews))
        own_scheduler = pipe.scheduler
        if first.scheduler is not None:
            key = (loaded.name, first.mode)  # a dedicated inpainting model has a scheduler of its own
            if key not in self.schedulers:
                self.schedulers[key] = SchedulerChoice(own_scheduler)
            pipe.scheduler = self.schedulers[key].fresh(first.scheduler)
        started = time.perf_counter()
        self.busy = busy
        try:
            with (
                call_context(loaded.levers),
                loras.routed(per_image) if routing else nullcontext(),
                interrupt_inside_steps(pipe, lambda: self._all_gone(batch, call)),
            ):
                output = pipe(**arguments)
        except InterruptedInsideStep:
            if not getattr(pipe, "_interrupt", False):  # else the step-end check has already said so (this is its VAE decode)
                logger.info("interrupting a pipeline call inside step %d: every request in it has gone", busy["step"] + 1)
            raise CallInterrupted(f"interrupted inside step {busy['step'] + 1} of {first.num_inference_steps}") from None
        finally:
            self.busy = None
            pipe.scheduler = own_scheduler
        if getattr(pipe, "_interrupt", False):
            raise CallInterrupted(f"interrupted at step {busy['step']} of {first.num_inference_steps}")
        generation_s = time.perf_counter() - started
        self._deliver(batch, call, output.images, arguments, started_at, generation_s)

    def _deliver(
        self, batch: Batch, call: PipelineCall, images: list[Any], arguments: dict[str, Any], started_at: float, generation_s: float
    ) -> None:
        """Encode a call's images and hand each job its own, with its timings."""
        first = batch.jobs[call.images[0][0]]
        encode_started = time.perf_counter()
        if first.mode == "inpainting":
            images = [keep_unmasked(image, *pair) for image, *pair in zip(images, arguments["image"], arguments["mask_image"])]
        encoded = {
            position: encode_image_b64(image, batch.jobs[position[0]].output_format, batch.jobs[position[0]].output_compression)
            for position, image in zip(call.images, images)
        }
        encode_s = time.perf_counter() - encode_started
        for job_index in call.job_indices:
            job, result = batch.jobs[job_index], batch.results[job_index]
            if not result.images_b64:
                result.queue_wait_s = max(0.0, started_at - job.admitted_at)
                metrics().queue_wait_seconds.observe(result.queue_wait_s)
            job_images = [encoded[(job_index, image)] for image in range(job.n) if (job_index, image) in encoded]
            result.images_b64.extend(job_images)
            result.generation_s += generation_s
            result.encode_s += encode_s * len(job_images) / len(call.images)
            result.batch_images = max(result.batch_images, len(call.images))
        observe_call(first.mode, len(call.images), len(call.job_indices), generation_s, encode_s)
        if first.is_warm_up and len(call.images) == 1:  # a warm-up call is one step at the native size
            self.models.record_step(first.model, generation_s / first.num_inference_steps)
        logger.log(
            logging.DEBUG if first.is_warm_up else logging.INFO,
            "pipeline call: %d images for %d requests, %dx%d, %d steps, %.3fs generation, %.3fs encoding",
            len(call.images),
            len(call.job_indices),
            first.width,
            first.height,
            first.num_inference_steps,
            generation_s,
            encode_s,
        )


def call_arguments(jobs: list[GenerationJob], call: PipelineCall, pipe: Any) -> dict[str, Any]:
    """The arguments of `pipe` for one call: per-image prompts and generators, guidance and
    negative prompts as the pipeline takes them; the size for text-to-image, init images (and
    masks, strength) for edits, reference images for instruction edits."""
    import torch

    first = jobs[call.images[0][0]]
    negative_prompts = None if first.negative_prompt is None else [jobs[job].negative_prompt for job, _ in call.images]
    arguments: dict[str, Any] = {
        "prompt": [jobs[job].prompt for job, _ in call.images],
        **guidance_arguments(pipe, first.guidance_scale, negative_prompts, len(call.images)),
        "num_inference_steps": first.num_inference_steps,
        # CPU generators: the same seed gives the same image on any device.
        "generator": [torch.Generator("cpu").manual_seed(jobs[job].seeds[image]) for job, image in call.images],
        "output_type": "pil",
    }
    if first.mode == "text-to-image":
        return {**arguments, **size_arguments(pipe, first.width, first.height)}
    decoded: dict[int, tuple[Any, Any]] = {}
    for job_index in call.job_indices:
        job = jobs[job_index]
        mask = decode_image_b64(job.mask_b64).convert("L") if job.mask_b64 else None
        decoded[job_index] = (decode_image_b64(job.image_b64 or "").convert("RGB"), mask)
    arguments["image"] = [decoded[job][0] for job, _ in call.images]
    if first.mode != "instruction-edit":  # an instruction edit's image is its reference: no strength
        arguments["strength"] = first.strength
    if first.mode == "inpainting":
        arguments["mask_image"] = [decoded[job][1] for job, _ in call.images]
    return {**arguments, **size_arguments(pipe, first.width, first.height)}


def size_arguments(pipe: Any, width: int, height: int) -> dict[str, Any]:
    """`width` and `height` where the pipeline takes them (SD's image-to-image draws at the
    image's size instead). FLUX.1 Kontext would resize its output to `max_area` (1024² by default)
    and its reference to the nearest of its preferred ~1 MP resolutions: the size asked for, and
    the upload fitted to it, are kept."""
    parameters = call_parameters(type(pipe))
    arguments: dict[str, Any] = {"width": width, "height": height} if "width" in parameters else {}
    if "max_area" in parameters:
        arguments["max_area"] = width * height
    if "_auto_resize" in parameters:
        arguments["_auto_resize"] = False
    return arguments

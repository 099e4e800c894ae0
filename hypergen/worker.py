"""The diffusion engine: the only owner of torch, the pipelines and the device.

`DiffusionWorker` in `service.py` wraps one engine per worker process. Loading and every
pipeline call run on one dedicated thread: torch's intra-op pool is per calling thread, and
hopping threads between calls oversubscribes the CPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from .batching import PipelineCall, group_compatible_jobs
from .config import Settings, is_bentoml_tag
from .encoding import encode_image_b64
from .logs import quiet_model_libraries
from .loras import LoadedAdapter, LoraError, LoraManager, resolve_allowed_path, shown_path
from .metrics import metrics
from .previews import StepPreviews, StreamTicket
from .protocol import GenerationJob, GenerationResult, LoraCommand, LoraReply, ModelLimits, WorkerStatus
from .residency import MB, ModelResidency

logger = logging.getLogger("hypergen.worker")


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


def keep_unmasked(generated: Any, original: Any, mask: Any) -> Any:
    """OpenAI's edit contract: pixels outside the mask come back as they were sent, not as the
    autoencoder's round trip of them. The mask is binarized at 50 % as diffusers does."""
    from PIL import Image

    binary = mask.convert("L").point(lambda value: 255 if value >= 128 else 0)
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), binary)


def _count_move(model: str, to_device: bool) -> None:
    metrics().model_moves.labels(model=model, direction="reload" if to_device else "offload").inc()


def pipeline_bytes(loaded: Any) -> int:
    """Bytes of a model's weights (parameters and buffers of every torch component)."""
    import torch

    modules = {  # the mode pipelines share components: count each once
        id(component): component
        for pipe in loaded.modes.values()
        for component in pipe.components.values()
        if isinstance(component, torch.nn.Module)
    }
    return sum(t.numel() * t.element_size() for module in modules.values() for t in (*module.parameters(), *module.buffers()))


def model_limits(loaded: Any) -> ModelLimits:
    native_side = max(loaded.native_width, loaded.native_height)
    return ModelLimits(
        id=loaded.name,
        native_width=loaded.native_width,
        native_height=loaded.native_height,
        min_side=min(64, native_side),
        max_side=max(loaded.max_side, native_side),
        default_steps=loaded.default_steps,
        default_guidance_scale=loaded.default_guidance_scale,
        modes=list(loaded.modes),
    )


def locate_model(source: str) -> str:
    """A BentoML model tag's directory in the store; paths and Hub ids as they are."""
    if is_bentoml_tag(source):
        import bentoml

        return bentoml.models.get(source).path
    return source


def _looks_like_hub_id(source: str, allowed_dirs: list[Any]) -> bool:
    """`org/name` that is no path under an allowed directory nor relative to the worker's own
    directory (diffusers would load that local path): left to diffusers' Hub loader."""
    import re

    if os.path.isabs(source) or source.startswith(".") or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return False
    if os.path.exists(source):
        return False
    return not any(os.path.exists(os.path.join(directory, source)) for directory in allowed_dirs)


class CallInterrupted(Exception):
    """A pipeline call stopped early because every request in it was cancelled."""


# Job IDs remembered as cancelled (a job may arrive after its cancellation).
MAX_REMEMBERED_CANCELLATIONS = 10_000


class DiffusionEngine:
    """Loads the configured model in the background and runs batches of jobs on it."""

    def __init__(self, settings: Settings, model_path: str | None = None) -> None:
        self.settings = settings
        self._model_path = model_path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hypergen-pipeline")
        self._loaded: Any = None  # pipelines.LoadedPipeline once ready
        self._tickets: dict[int, StreamTicket] = {}  # streaming jobs of the batch being run (pipeline thread)
        self._stream_pending: list[StreamTicket] = []
        self._streams: dict[str, StreamTicket] = {}  # request ID → ticket, while it streams
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # request IDs the API gave up on
        self._stream_lock = threading.Lock()
        self._busy: dict[str, Any] | None = None  # the pipeline call running now, for /health
        self.loras: LoraManager | None = None  # the default model's adapters
        self._extra: dict[str, tuple[Any, LoraManager]] = {}  # HYPERGEN_MODELS beyond the first
        budget = int(settings.memory_budget_mb * MB) if settings.memory_budget_mb else None
        self.residency = ModelResidency(budget, move=self._move_model, on_move=_count_move)
        self._load_error: str | None = None
        self._loading: Future[None] = self._executor.submit(self._load)

    # --- loading -------------------------------------------------------------------------------

    def _model_source(self) -> str:
        """The directory or Hub id to load the default model from."""
        from .pipelines import embedded_default_path

        if self._model_path:
            return self._model_path
        source = self.settings.default_model_source
        if not source:
            return str(embedded_default_path())
        return locate_model(source)

    def _load(self) -> None:
        quiet_model_libraries()
        import torch

        from .pipelines import load_inpainting, load_text_to_image

        threads = int(os.environ.get("HYPERGEN_TORCH_THREADS", "0")) or os.cpu_count() or 1
        torch.set_num_threads(threads)
        try:
            self._loaded = load_text_to_image(self.settings.served_model_name, self._model_source(), self.settings.device)
            if self.settings.inpaint_model:
                loaded = self._loaded
                loaded.modes["inpainting"] = load_inpainting(self.settings.inpaint_model, loaded.device, loaded.dtype)
                logger.info("inpainting uses the dedicated checkpoint %s", self.settings.inpaint_model)
        except Exception as error:  # reported through /health; the worker stays up to say why
            self._load_error = f"{type(error).__name__}: {error}"
            logger.exception("loading the model failed")
            return
        loaded = self._loaded
        self.residency.register(loaded.name, pipeline_bytes(loaded))
        loras = LoraManager(loaded.modes["text-to-image"], self.settings.lora_dir_list, self.settings.max_loras)
        for spec in self.settings.lora_specs:
            try:
                local = not is_bentoml_tag(spec.source) and os.path.exists(spec.source)
                shown = shown_path(Path(os.path.realpath(spec.source)), self.settings.lora_dir_list) if local else None
                loras.load(spec.name, spec.source, spec.scale, pinned=True, shown=shown)
            except LoraError as error:
                self._load_error = f"start-up LoRA '{spec.name}' failed to load: {error.message}"
                logger.error("%s", self._load_error)
                return
        try:
            for name, source in self.settings.extra_models:
                extra = load_text_to_image(name, locate_model(source), self.settings.device)
                self._extra[name] = (extra, LoraManager(extra.modes["text-to-image"], self.settings.lora_dir_list, self.settings.max_loras))
                self.residency.register(name, pipeline_bytes(extra))
                logger.info("model '%s' loaded from %s in %.2fs", name, source, extra.load_seconds)
        except Exception as error:
            self._load_error = f"{type(error).__name__}: {error}"
            logger.exception("loading an additional model failed")
            return
        self.residency.use(loaded.name)  # most requests name no model: start with the default on the device
        self.loras = loras  # ready only now: start-up adapters and every model are loaded
        logger.info(
            "model '%s' loaded from %s on %s (%s) in %.2fs; native size %dx%d, default %d steps%s",
            loaded.name,
            loaded.source,
            loaded.device,
            str(loaded.dtype).replace("torch.", ""),
            loaded.load_seconds,
            loaded.native_width,
            loaded.native_height,
            loaded.default_steps,
            "; its weights are RANDOM (it draws noise, not your prompt)" if loaded.random_weights else "",
        )

    def status(self) -> WorkerStatus:
        if self._load_error:
            return WorkerStatus(ready=False, detail=f"model failed to load: {self._load_error}")
        loaded = self._loaded
        if loaded is None or self.loras is None:
            return WorkerStatus(ready=False, detail="loading the model")
        models = [model_limits(loaded)] + [model_limits(extra) for extra, _ in self._extra.values()]
        return WorkerStatus(
            ready=True,
            device=loaded.device,
            dtype=str(loaded.dtype).replace("torch.", ""),
            models=models,
            pid=os.getpid(),
            memory=self.residency.snapshot(),
            busy=[dict(busy)] if (busy := self._busy) else [],
        )

    def _model(self, name: str) -> tuple[Any, LoraManager]:
        """The loaded pipeline and adapters of a served model (the API only sends known names)."""
        if name in self._extra:
            return self._extra[name]
        assert self.loras is not None
        return self._loaded, self.loras

    def _move_model(self, name: str, to_device: bool) -> None:
        """Move a model's weights (all its mode pipelines share them) to its device or to host
        memory. On a CPU-only worker the device *is* host memory: only the bookkeeping changes."""
        loaded = self._extra[name][0] if name in self._extra else self._loaded  # also while loading
        target = loaded.device if to_device else "cpu"
        for pipe in dict.fromkeys(loaded.modes.values()):  # a dedicated inpainting pipeline has its own weights
            pipe.to(target)

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        """Run a batch on the pipeline thread; one result per job, in order."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, list(jobs))

    def run_batch(self, jobs: list[GenerationJob], tickets: dict[int, StreamTicket] | None = None) -> list[GenerationResult]:
        """Run jobs (in arrival order) as grouped pipeline calls; one result per job.

        `tickets` (job index → StreamTicket) marks streaming jobs: they get partial images and
        can be cancelled mid-call."""
        self._tickets = tickets or {}
        results = [GenerationResult(request_id=job.request_id) for job in jobs]
        if self._loaded is None or self.loras is None:
            for result in results:
                result.error = self._load_error or "the model is not loaded"
            return results
        adapters = self._resolve_adapters(jobs, results)
        runnable = [index for index, result in enumerate(results) if result.error is None and not self._job_cancelled(jobs, index)]
        for call in group_compatible_jobs([jobs[index] for index in runnable], self.settings.max_batch_size):
            call.images = [(runnable[job], image) for job, image in call.images]
            self._run_call_isolating_failures(jobs, call, results, adapters)
        return results

    def _resolve_adapters(self, jobs: list[GenerationJob], results: list[GenerationResult]) -> dict[int, LoadedAdapter]:
        """Each job's adapter, loading allowed paths on first use; a job whose adapter cannot be
        had gets a 400 naming `lora_path` and does not run."""
        assert self.loras is not None
        adapters: dict[int, LoadedAdapter] = {}
        in_use: set[str] = set()
        for index, job in enumerate(jobs):
            if job.lora_path is None:
                continue
            if job.mode == "inpainting" and self.settings.inpaint_model and job.model not in self._extra:
                results[index].error = "LoRA adapters do not apply to the dedicated inpainting model (HYPERGEN_INPAINT_MODEL)."
                results[index].error_status, results[index].error_param = 400, "lora_path"
                continue
            try:
                adapters[index] = self._model(job.model)[1].resolve(job.lora_path, protect=in_use)
                in_use.add(adapters[index].name)
            except LoraError as error:
                results[index].error = error.message
                results[index].error_status, results[index].error_param = 400, "lora_path"
            except Exception as error:  # this job's adapter failed: it fails alone, never its batch-mates
                logger.exception("request %s: resolving its adapter failed", job.request_id)
                results[index].error = f"{type(error).__name__}: {error}"
        return adapters

    # --- streaming -----------------------------------------------------------------------------

    async def generate_stream(
        self, job: GenerationJob, partial_images: int, progress: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Events for one streaming job: `partial` images while it runs, then one `image` per
        image and `done` (or one `error`). Streaming jobs waiting together run as one batch.
        Closing the iterator cancels the job (dropped if it has not started; interrupted at the
        next step if everyone in its pipeline call has gone)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        ticket = StreamTicket(job, partial_images, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), progress)
        with self._stream_lock:
            self._stream_pending.append(ticket)
            self._streams[job.job_id] = ticket
        loop.run_in_executor(self._executor, self._drain_streams)
        try:
            while True:
                event = await events.get()
                yield event
                if event["kind"] in ("done", "error"):
                    return
        finally:
            ticket.cancelled.set()
            with self._stream_lock:
                self._streams.pop(job.job_id, None)

    def cancel(self, job_id: str) -> None:
        """The API gave up on a request (its client left, or it timed out): drop the job if it has
        not started; interrupt its pipeline call at the next step once nobody in it is left. The
        API says so explicitly: closing a BentoML stream early does not close its HTTP response."""
        with self._stream_lock:
            ticket = self._streams.get(job_id)
            self._cancelled[job_id] = None
            while len(self._cancelled) > MAX_REMEMBERED_CANCELLATIONS:
                self._cancelled.popitem(last=False)
        if ticket is not None:
            ticket.cancelled.set()
            ticket.emit({"kind": "error", "result": {"request_id": ticket.job.request_id, "error": "cancelled by the client"}})

    def _job_cancelled(self, jobs: list[GenerationJob], index: int) -> bool:
        ticket = self._tickets.get(index)
        return (ticket is not None and ticket.cancelled.is_set()) or jobs[index].job_id in self._cancelled

    def _drain_streams(self) -> None:
        """On the pipeline thread: run every streaming job waiting now, as one batch."""
        with self._stream_lock:
            tickets = [ticket for ticket in self._stream_pending if not ticket.cancelled.is_set()]
            self._stream_pending.clear()
        if not tickets:
            return
        results = self.run_batch([ticket.job for ticket in tickets], dict(enumerate(tickets)))
        for ticket, result in zip(tickets, results):
            if result.error:
                ticket.emit({"kind": "error", "result": result.model_dump(exclude={"images_b64"})})
                continue
            for index, image in enumerate(result.images_b64):
                ticket.emit({"kind": "image", "image_index": index, "b64_json": image})
            ticket.emit({"kind": "done", "result": result.model_dump(exclude={"images_b64"})})

    # --- adapters (admin) ----------------------------------------------------------------------

    async def manage_loras(self, command: LoraCommand) -> LoraReply:
        """List, load or unload adapters, on the pipeline thread (never during a pipeline call)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._manage_loras, command)

    def _manage_loras(self, command: LoraCommand) -> LoraReply:
        if self.loras is None:
            return LoraReply(ok=False, status=503, message="The model is not loaded yet.")
        try:
            if command.action == "load":
                source = shown = command.path or ""
                if not is_bentoml_tag(source) and not _looks_like_hub_id(source, self.settings.lora_dir_list):
                    real = resolve_allowed_path(source, self.settings.lora_dir_list)
                    source, shown = str(real), shown_path(real, self.settings.lora_dir_list)
                self.loras.load(command.name or "", source, command.scale, shown=shown)
            elif command.action == "unload":
                self.loras.unload(command.name or "")
        except LoraError as error:
            return LoraReply(ok=False, status=error.status, message=error.message, adapters=self.loras.list())
        return LoraReply(adapters=self.loras.list())

    def _run_call_isolating_failures(
        self, jobs: list[GenerationJob], call: PipelineCall, results: list[GenerationResult], adapters: dict[int, LoadedAdapter]
    ) -> None:
        """Run one call; if it fails and served several jobs, retry each job alone so that one
        bad request cannot fail the others."""
        try:
            self._run_call(jobs, call, results, adapters)
            return
        except CallInterrupted as interrupted:
            # Everyone in the call had gone: half-denoised images must never be delivered.
            for job_index in call.job_indices:
                results[job_index].error = f"cancelled: {interrupted}"
                results[job_index].error_status = 499
            return
        except Exception as error:
            failed_jobs = call.job_indices
            ids = ", ".join(jobs[index].request_id for index in failed_jobs)
            logger.error("pipeline call for requests [%s] failed: %s\n%s", ids, error, traceback.format_exc())
            if len(failed_jobs) == 1:
                results[failed_jobs[0]].error = f"{type(error).__name__}: {error}"
                return
        for job_index in failed_jobs:
            alone = PipelineCall(call.key, [image for image in call.images if image[0] == job_index])
            try:
                self._run_call(jobs, alone, results, adapters)
            except Exception as error:
                logger.error("request %s failed alone too: %s\n%s", jobs[job_index].request_id, error, traceback.format_exc())
                results[job_index].error = f"{type(error).__name__}: {error}"

    @staticmethod
    def _mode_arguments(jobs: list[GenerationJob], call: PipelineCall) -> dict[str, Any]:
        """Size for text-to-image; init images (and masks, strength) for edits, one per image."""
        from .images import from_png_b64

        first = jobs[call.images[0][0]]
        if first.mode == "text-to-image":
            return {"width": first.width, "height": first.height}
        decoded: dict[int, tuple[Any, Any]] = {}
        for job_index in call.job_indices:
            job = jobs[job_index]
            mask = from_png_b64(job.mask_b64).convert("L") if job.mask_b64 else None
            decoded[job_index] = (from_png_b64(job.image_b64 or "").convert("RGB"), mask)
        arguments: dict[str, Any] = {
            "image": [decoded[job][0] for job, _ in call.images],
            "strength": first.strength,
        }
        if first.mode == "inpainting":
            arguments["mask_image"] = [decoded[job][1] for job, _ in call.images]
            arguments["width"], arguments["height"] = first.width, first.height
        return arguments

    def _run_call(
        self, jobs: list[GenerationJob], call: PipelineCall, results: list[GenerationResult], adapters: dict[int, LoadedAdapter]
    ) -> None:
        import torch

        first_index = call.images[0][0]
        first = jobs[first_index]
        loaded, loras = self._model(first.model)
        self.residency.use(loaded.name)
        loras.activate(adapters.get(first_index), first.lora_scale)
        pipe = loaded.modes.get(first.mode)
        if pipe is None:
            raise ValueError(f"model '{first.model}' cannot do {first.mode}")
        prompts = [jobs[job].prompt for job, _ in call.images]
        negatives = None if first.negative_prompt is None else [jobs[job].negative_prompt for job, _ in call.images]
        # CPU generators: the same seed gives the same image on any device.
        generators = [torch.Generator("cpu").manual_seed(jobs[job].seeds[image]) for job, image in call.images]
        arguments: dict[str, Any] = {
            "prompt": prompts,
            "negative_prompt": negatives,
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": generators,
            "output_type": "pil",
        }
        arguments.update(self._mode_arguments(jobs, call))
        call_tickets = {job: self._tickets[job] for job in call.job_indices if job in self._tickets}
        started_at = time.time()
        busy = {
            "requests": [jobs[job].request_id for job in call.job_indices],
            "images": len(call.images),
            "size": f"{first.width}x{first.height}",
            "steps": first.num_inference_steps,
            "step": 0,
            "started_at": started_at,
        }
        arguments["callback_on_step_end"] = StepPreviews(
            call.images, call_tickets, lambda job: self._job_cancelled(jobs, job), on_step=lambda done: busy.update(step=done)
        )
        arguments["callback_on_step_end_tensor_inputs"] = ["latents"]
        started = time.perf_counter()
        self._busy = busy
        try:
            output = pipe(**arguments)
        finally:
            self._busy = None
        if getattr(pipe, "_interrupt", False):
            raise CallInterrupted(f"interrupted at step {busy['step']} of {first.num_inference_steps}")
        generation_s = time.perf_counter() - started
        encode_started = time.perf_counter()
        images = output.images
        if first.mode == "inpainting":
            images = [
                keep_unmasked(image, original, mask)
                for image, original, mask in zip(images, arguments["image"], arguments["mask_image"])
            ]
        encoded: dict[tuple[int, int], str] = {
            position: encode_image_b64(image, jobs[position[0]].output_format, jobs[position[0]].output_compression)
            for position, image in zip(call.images, images)
        }
        encode_s = time.perf_counter() - encode_started
        for job_index in call.job_indices:
            job, result = jobs[job_index], results[job_index]
            if not result.images_b64:
                result.queue_wait_s = max(0.0, started_at - job.admitted_at)
                metrics().queue_wait_seconds.observe(result.queue_wait_s)
            job_images = [encoded[(job_index, image)] for image in range(job.n) if (job_index, image) in encoded]
            result.images_b64.extend(job_images)
            result.generation_s += generation_s
            result.encode_s += encode_s * len(job_images) / len(call.images)
            result.batch_images = max(result.batch_images, len(call.images))
        observe_call(first.mode, len(call.images), len(call.job_indices), generation_s, encode_s)
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

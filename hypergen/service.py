"""HyperGen's two BentoML services: `ImageAPI` (the entry, CPU) in front of `DiffusionWorker`
(one per GPU). `bentoml serve` runs them from the top-level `service.py`, `hypergen serve` from
here (so it works from an installed wheel). Only wiring: the logic lives in `hypergen.api` and
`hypergen.engine`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import bentoml

from hypergen.api.app import create_app
from hypergen.api.auth import ApiKeyAuth
from hypergen.api.serving import ImageServing
from hypergen.api.videos import VideoServing
from hypergen.api.worker_client import connect_workers
from hypergen.bento import (
    depend_on_each,
    extra_references,
    model_reference,
    traffic,
    worker_attributes,
    worker_batching,
    worker_copies,
)
from hypergen.config import load_settings
from hypergen.logs import access_logging, configure_logging
from hypergen.metrics import use_own_multiprocess_dir
from hypergen.protocol import GenerationJob, GenerationResult, LoraCommand, LoraReply, WorkerStatus
from hypergen.video_protocol import VideoJob

use_own_multiprocess_dir()  # before BentoML picks the one directory every server shares
settings = load_settings(vars(bentoml.use_arguments()))
configure_logging(settings.log_level)
app = create_app(settings.max_body_bytes, settings.max_body_bytes_in_flight)


@bentoml.service(
    name="hypergen-worker", resources={"gpu": 1}, traffic=traffic(settings, "worker"), workers=1, logging=access_logging("worker")
)
class DiffusionWorker:
    """Owns the diffusers pipelines; the only process that imports torch."""

    base_model = model_reference(settings)  # a BentoML model the Bento carries, or None

    def __init__(self) -> None:
        from hypergen.engine.engine import DiffusionEngine

        self.engine = DiffusionEngine(settings, model_path=self.base_model.path if self.base_model else None)

    @bentoml.api(batchable=True, **worker_batching(settings))
    async def generate(self, jobs: list[GenerationJob]) -> list[GenerationResult]:
        return await self.engine.generate(jobs)

    @bentoml.api
    async def generate_stream(self, job: GenerationJob, partial_images: int = 0, progress: bool = False) -> AsyncGenerator[str, None]:
        # JSON lines: chunks may merge or split between services, the API side reassembles lines.
        async for event in self.engine.generate_stream(job, partial_images, progress):
            yield event.model_dump_json() + "\n"

    @bentoml.api
    async def cancel(self, job_id: str) -> None:
        self.engine.cancel(job_id)

    @bentoml.api
    async def render_video(self, job: VideoJob) -> AsyncGenerator[str, None]:
        async for event in self.engine.render_video(job):
            yield event.model_dump_json() + "\n"

    @bentoml.api
    async def cancel_video(self, job_id: str) -> None:
        self.engine.cancel_video(job_id)

    @bentoml.api
    async def status(self) -> WorkerStatus:
        return self.engine.status()

    @bentoml.api
    async def manage_loras(self, command: LoraCommand) -> LoraReply:
        return await self.engine.manage_loras(command)


# Other models and start-up adapters stored as BentoML models travel with the Bento too.
DiffusionWorker.models.extend(extra_references(settings))
# HYPERGEN_WORKERS > 1: one worker service per GPU (hypergen-worker-2, ...), balanced by load.
DIFFUSION_WORKERS = worker_copies(DiffusionWorker, settings)


# BentoML's HTTP metrics label requests by raw path (file ids, probes): the app serves /metrics.
@bentoml.service(name="hypergen", traffic=traffic(settings, "api"), workers=1, logging=access_logging("api"), metrics={"enabled": False})
@bentoml.asgi_app(app, path="/")
@depend_on_each(DIFFUSION_WORKERS)  # `worker`, `worker_2`, ...: a bentoml.depends each
class ImageAPI:
    """OpenAI's Images API: validation, auth, admission control, response formatting."""

    def __init__(self) -> None:
        attributes = worker_attributes(len(DIFFUSION_WORKERS))
        workers = {service.name: getattr(self, attribute) for service, attribute in zip(DIFFUSION_WORKERS, attributes)}
        app.state.auth = ApiKeyAuth(settings.api_key_list)
        app.state.auth.warn_if_open()
        app.state.serving = ImageServing(settings, connect_workers(workers))
        app.state.videos = VideoServing(settings, app.state.serving.worker, app.state.serving.readiness)

    @bentoml.on_startup
    async def warm_up(self) -> None:
        # SIGTERM: refuse new connections and turn the queue away at once, finish what runs.
        app.state.shutdown.install(on_close=app.state.serving.queue.close)
        app.state.serving.readiness.start_polling()
        app.state.videos.start()

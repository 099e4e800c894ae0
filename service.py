"""HyperGen's Bento: an OpenAI-compatible API service in front of a batching diffusion worker.

`bentoml serve` (port 3000) or `hypergen serve` starts both. Logic lives in `hypergen/`.
"""

from __future__ import annotations

import json
from typing import AsyncGenerator

import bentoml

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
from hypergen.protocol import GenerationJob, GenerationResult, LoraCommand, LoraReply, WorkerStatus
from hypergen.routes import create_app
from hypergen.serving import ImageServing, worker_client

settings = load_settings(vars(bentoml.use_arguments()))
configure_logging(settings.log_level)
app = create_app(settings.max_body_bytes, settings.max_body_bytes_in_flight)


@bentoml.service(
    name="hypergen-worker", resources={"gpu": 1}, traffic=traffic(settings, "worker"), workers=1, logging=access_logging()
)
class DiffusionWorker:
    """Owns the diffusers pipeline; the only process that imports torch."""

    base_model = model_reference(settings)  # a BentoML model the Bento carries, or None

    def __init__(self) -> None:
        from hypergen.worker import DiffusionEngine

        self.engine = DiffusionEngine(settings, model_path=self.base_model.path if self.base_model else None)

    @bentoml.api(batchable=True, **worker_batching(settings))
    async def generate(self, jobs: list[GenerationJob]) -> list[GenerationResult]:
        return await self.engine.generate(jobs)

    @bentoml.api
    async def generate_stream(
        self, job: GenerationJob, partial_images: int = 0, progress: bool = False
    ) -> AsyncGenerator[str, None]:
        # JSON lines: chunks may merge or split between services, the API side reassembles lines.
        async for event in self.engine.generate_stream(job, partial_images, progress):
            yield json.dumps(event) + "\n"

    @bentoml.api
    async def cancel(self, job_id: str) -> None:
        self.engine.cancel(job_id)

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
@bentoml.service(
    name="hypergen", traffic=traffic(settings, "api"), workers=1, logging=access_logging(), metrics={"enabled": False}
)
@bentoml.asgi_app(app, path="/")
@depend_on_each(DIFFUSION_WORKERS)  # `worker`, `worker_2`, ...: a bentoml.depends each
class ImageAPI:
    """OpenAI's Images API: validation, auth, admission control, response formatting."""

    def __init__(self) -> None:
        from hypergen.auth import ApiKeyAuth

        attributes = worker_attributes(len(DIFFUSION_WORKERS))
        workers = {service.name: getattr(self, attribute) for service, attribute in zip(DIFFUSION_WORKERS, attributes)}
        app.state.auth = ApiKeyAuth(settings.api_key_list)
        app.state.auth.warn_if_open()
        app.state.serving = ImageServing(settings, worker_client(workers))

    @bentoml.on_startup
    async def warm_up(self) -> None:
        app.state.serving.start_warm_up()

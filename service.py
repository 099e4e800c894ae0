"""HyperGen's Bento: an OpenAI-compatible API service in front of a batching diffusion worker.

`bentoml serve` (port 3000) or `hypergen serve` starts both. Logic lives in `hypergen/`.
"""

from __future__ import annotations

import json
from typing import AsyncGenerator

import bentoml

from hypergen.bento import extra_references, model_reference, worker_batching
from hypergen.config import load_settings
from hypergen.logs import configure_logging
from hypergen.protocol import GenerationJob, GenerationResult, LoraCommand, LoraReply, WorkerStatus
from hypergen.routes import create_app
from hypergen.serving import BentoWorkerClient, ImageServing

settings = load_settings(vars(bentoml.use_arguments()))
configure_logging(settings.log_level)
# BentoML, not HyperGen, would answer 429/503 past these, so they sit well above our own bounds.
TRAFFIC = {"timeout": settings.request_timeout + 60, "max_concurrency": 100_000}

app = create_app(settings.max_body_bytes)


@bentoml.service(name="hypergen-worker", resources={"gpu": 1}, traffic=TRAFFIC, workers=1)
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
    async def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    @bentoml.api
    async def status(self) -> WorkerStatus:
        return self.engine.status()

    @bentoml.api
    async def manage_loras(self, command: LoraCommand) -> LoraReply:
        return await self.engine.manage_loras(command)


# Other models and start-up adapters stored as BentoML models travel with the Bento too.
DiffusionWorker.models.extend(extra_references(settings))


@bentoml.service(name="hypergen", traffic=TRAFFIC, workers=1)
@bentoml.asgi_app(app, path="/")
class ImageAPI:
    """OpenAI's Images API: validation, auth, admission control, response formatting."""

    worker = bentoml.depends(DiffusionWorker)

    def __init__(self) -> None:
        from hypergen.auth import ApiKeyAuth

        app.state.auth = ApiKeyAuth(settings.api_key_list)
        app.state.serving = ImageServing(settings, BentoWorkerClient(self.worker))

    @bentoml.on_startup
    async def warm_up(self) -> None:
        app.state.serving.start_warm_up()

"""In-process app: the real FastAPI routes and serving layer, with a real engine on a tiny
pipeline (or a scripted worker where a test needs exact timing), reached through httpx's ASGI
transport and the official AsyncOpenAI client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import contextmanager

import httpx
import pytest
from openai import AsyncOpenAI

from hypergen.api.app import create_app
from hypergen.api.auth import ApiKeyAuth
from hypergen.api.pool import WorkerPool
from hypergen.api.serving import ImageServing
from hypergen.config import Settings
from hypergen.protocol import GenerationJob, GenerationResult, LoraCommand, LoraReply, WorkerStatus


class EngineClient:
    """WorkerClient backed by an in-process DiffusionEngine."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def generate(self, jobs: Sequence[GenerationJob]) -> list[GenerationResult]:
        return await self.engine.generate(jobs)

    async def status(self) -> WorkerStatus:
        return self.engine.status()

    async def manage_loras(self, command: LoraCommand) -> LoraReply:
        return await self.engine.manage_loras(command)

    def generate_stream(self, job: GenerationJob, partial_images: int, progress: bool = False):
        return self.engine.generate_stream(job, partial_images, progress)

    async def cancel(self, job_id: str) -> None:
        self.engine.cancel(job_id)

    def render_video(self, job):
        return self.engine.render_video(job)

    async def cancel_video(self, job_id: str) -> None:
        self.engine.cancel_video(job_id)


def start_engine(settings: Settings, model_path) -> DiffusionEngine:  # noqa: F821
    """A DiffusionEngine on `model_path`, once it reports ready (start-up LoRAs included)."""
    from hypergen.engine.engine import DiffusionEngine

    engine = DiffusionEngine(settings, model_path=str(model_path))
    deadline = time.monotonic() + 120
    while not engine.status().ready:
        assert time.monotonic() < deadline, engine.status().detail
        time.sleep(0.05)
    return engine


@pytest.fixture(scope="session")
def engine(tiny_sd_dir, tmp_path_factory):
    return start_engine(Settings(model=str(tiny_sd_dir), home=tmp_path_factory.mktemp("engine-home")), tiny_sd_dir)


async def until_ready(serving: ImageServing) -> None:
    """Poll as the server does at start, until the pool reports the worker (if it is) ready."""
    for _ in range(3):
        if (await serving.readiness.status()).ready:
            return
        await asyncio.sleep(0)


@pytest.fixture
def make_app(tmp_path):
    """make_app(worker, api_keys=[...], **settings) → (app, settings)."""

    def build(worker, api_keys=(), max_body_bytes=1_000_000, warmed_up=True, **overrides):
        """`warmed_up`: the pool has seen the worker ready (no warm-up calls); else it warms
        the worker's batcher with 12 calls once polled."""
        settings = Settings(**{"home": tmp_path, "model_name": "tiny", "api_keys": ",".join(api_keys) or None, **overrides})
        app = create_app(max_body_bytes)
        app.state.auth = ApiKeyAuth(settings.api_key_list)
        pool = WorkerPool([worker], ["hypergen-worker"], warm_up_calls=0 if warmed_up else 12)
        app.state.serving = ImageServing(settings, pool)
        if warmed_up:
            asyncio.run(until_ready(app.state.serving))
        return app

    return build


@pytest.fixture
def app(make_app, engine):
    return make_app(EngineClient(engine))


def http(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def openai_client(app, api_key: str = "anything") -> AsyncOpenAI:
    return AsyncOpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=http(app), max_retries=0)


@contextmanager
def failing_pipeline(engine, marker: str, error: Exception):
    """While active, text-to-image calls whose prompts contain `marker` raise `error`."""
    original = engine.models.default.modes["text-to-image"]

    class Failing:
        def __getattr__(self, name):
            return getattr(original, name)

        def __call__(self, *args, **kwargs):
            if any(marker in prompt for prompt in kwargs["prompt"]):
                raise error
            return original(*args, **kwargs)

    engine.models.default.modes["text-to-image"] = Failing()
    try:
        yield
    finally:
        engine.models.default.modes["text-to-image"] = original


def run(coroutine):
    return asyncio.run(coroutine)

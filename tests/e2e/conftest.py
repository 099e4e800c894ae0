"""A real `bentoml serve` per scenario, on a free port, its process group killed at the end."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from hypergen.testing import BentoServer

URL_TTL_S = 6


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml-home")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, hypergen_home, bentoml_home):
    """start_server(env={...}) → a started BentoServer (not yet ready); all are stopped at the end."""
    servers: list[BentoServer] = []

    def start(env: dict[str, str] | None = None, **kwargs) -> BentoServer:
        log_path = tmp_path_factory.mktemp("server") / "serve.log"
        # Each server its own video directory: one server owns a directory at a time.
        videos = tmp_path_factory.mktemp("videos")
        base = {"HYPERGEN_HOME": str(hypergen_home), "BENTOML_HOME": str(bentoml_home), "HYPERGEN_VIDEO_DIR": str(videos)}
        server = BentoServer(log_path, {**base, **(env or {})}, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def default_server(start_server):
    """The embedded default model, as `bentoml serve` starts it with no configuration."""
    server = start_server({"HYPERGEN_URL_TTL": str(URL_TTL_S)})
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def client(default_server) -> OpenAI:
    return OpenAI(base_url=f"{default_server.base_url}/v1", api_key="anything", max_retries=0)

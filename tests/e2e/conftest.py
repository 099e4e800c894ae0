"""A real `bentoml serve` per scenario, on a free port, its process group killed at the end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BentoServer:
    """`bentoml serve TARGET` as a subprocess; `health_seen` records /health codes while starting."""

    def __init__(self, log_path: Path, env: dict[str, str], target: str = "service:ImageAPI", cwd: Path = ROOT) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.health_seen: list[int] = []
        full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", **env}
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--port", str(self.port), "--host", "127.0.0.1"],
            cwd=cwd,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_until(self, predicate, timeout: float = 180.0) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                response = httpx.get(f"{self.base_url}/health", timeout=5)
                self.health_seen.append(response.status_code)
                if predicate(response):
                    return response
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def wait_ready(self, timeout: float = 180.0) -> httpx.Response:
        return self.wait_until(lambda response: response.status_code == 200, timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml-home")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, hypergen_home, bentoml_home):
    """start_server(env={...}) → a started BentoServer (not yet ready); all are stopped at the end."""
    servers: list[BentoServer] = []

    def start(env: dict[str, str] | None = None, **kwargs) -> BentoServer:
        log_path = tmp_path_factory.mktemp("server") / "serve.log"
        base = {"HYPERGEN_HOME": str(hypergen_home), "BENTOML_HOME": str(bentoml_home)}
        server = BentoServer(log_path, {**base, **(env or {})}, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()

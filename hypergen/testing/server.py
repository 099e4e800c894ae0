"""A real `bentoml serve` subprocess, for the end-to-end tests and `bench/`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BentoServer:
    """`bentoml serve TARGET` in its own process group, logging to `log_path`.

    `health_seen` records the /health status codes observed while waiting for readiness.
    """

    def __init__(
        self,
        log_path: Path,
        env: dict[str, str],
        target: str = "service:ImageAPI",
        cwd: Path = PROJECT_ROOT,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.health_seen: list[int] = []
        full_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", **env}
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed by stop())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--port", str(self.port), "--host", "127.0.0.1", *extra_args],
            cwd=cwd,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_until(self, predicate: Callable[[httpx.Response], bool], timeout: float = 180.0) -> httpx.Response:
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
        """SIGTERM the whole process group (API and worker processes), SIGKILL after 20 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> BentoServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

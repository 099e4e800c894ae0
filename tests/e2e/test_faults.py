"""Faults through `bentoml serve`: the diffusion worker process is killed mid-request."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.e2e


def worker_process(server) -> psutil.Process:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return next(child for child in children if "hypergen-worker" in " ".join(child.cmdline()))


def test_a_killed_worker_fails_only_its_requests_and_comes_back(start_server):
    server = start_server({"HYPERGEN_LOG_LEVEL": "INFO"})
    server.wait_ready()
    url = f"{server.base_url}/v1/images/generations"
    victim = worker_process(server)
    outcome: dict[str, httpx.Response] = {}

    def long_request() -> None:
        outcome["response"] = httpx.post(url, json={"prompt": "long", "size": "64x64", "num_inference_steps": 150}, timeout=120)

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)  # the request is in the worker now
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=120)
    failed = outcome["response"]
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    assert "Traceback" not in failed.text
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        code = httpx.get(f"{server.base_url}/health", timeout=10).status_code
        seen.append(code)
        if code == 200 and 503 in seen:
            break
        time.sleep(0.2)
    assert 503 in seen and seen[-1] == 200, seen
    assert worker_process(server).pid != victim.pid  # BentoML started a new worker process
    again = httpx.post(url, json={"prompt": "after", "size": "64x64", "num_inference_steps": 2}, timeout=120)
    assert again.status_code == 200
    server.stop()


def test_sigterm_lets_the_request_in_flight_finish(start_server):
    server = start_server({})
    server.wait_ready()
    url = f"{server.base_url}/v1/images/generations"
    outcome: dict[str, httpx.Response] = {}

    def long_request() -> None:
        outcome["response"] = httpx.post(url, json={"prompt": "drain", "size": "64x64", "num_inference_steps": 100}, timeout=120)

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)  # what `docker stop` / Kubernetes send
    thread.join(timeout=120)
    assert outcome["response"].status_code == 200 and len(outcome["response"].json()["data"]) == 1
    assert server.process.wait(timeout=60) is not None
    with pytest.raises(httpx.HTTPError):
        httpx.post(url, json={"prompt": "late"}, timeout=10)  # no longer admitted

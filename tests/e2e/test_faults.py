"""Faults through `bentoml serve`: the diffusion worker process is killed mid-request; SIGTERM while a request runs."""

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


def test_sigterm_refuses_new_connections_at_once_and_lets_the_request_in_flight_finish(start_server):
    server = start_server({"HYPERGEN_MAX_BATCH_SIZE": "1"})  # one request in the worker, the next one waits in the queue
    server.wait_ready()
    url = f"{server.base_url}/v1/images/generations"
    outcome: dict[str, httpx.Response] = {}

    def send(name: str, steps: int) -> None:
        outcome[name] = httpx.post(url, json={"prompt": name, "size": "64x64", "num_inference_steps": steps}, timeout=300)

    running = threading.Thread(target=send, args=("running", 150))
    running.start()
    health = f"{server.base_url}/health"
    deadline = time.monotonic() + 60
    while not httpx.get(health, timeout=10).json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)  # until its pipeline call runs
    queued = threading.Thread(target=send, args=("queued", 2))
    queued.start()
    while httpx.get(health, timeout=10).json()["queue_depth"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    server.process.send_signal(signal.SIGTERM)  # what `docker stop` / Kubernetes send
    queued.join(timeout=10)  # turned away at once: the workers are stopping, its turn would never come
    time.sleep(0.5)
    # While it drains, a new client gets a refused connection (or OpenAI's 503), never a hang:
    # the listening socket used to stay open in BentoML's other processes, and new connections
    # waited unanswered until the request in flight had finished.
    answers = []
    for _ in range(3):
        try:
            late = httpx.post(url, json={"prompt": "late", "size": "64x64"}, timeout=5)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down" and "retry-after" in late.headers
            answers.append(late.status_code)
        except httpx.ConnectError:
            answers.append("refused")
        time.sleep(0.2)
    assert running.is_alive(), "the request in flight should still be running while new ones are refused"
    assert answers and all(answer in ("refused", 503) for answer in answers), answers
    turned_away = outcome["queued"]
    assert turned_away.status_code == 503 and turned_away.json()["error"]["code"] == "shutting_down"
    assert turned_away.headers["retry-after"] == "1"
    running.join(timeout=300)
    assert outcome["running"].status_code == 200 and len(outcome["running"].json()["data"]) == 1
    assert server.process.wait(timeout=60) is not None
    assert "new connections refused" in server.log()
    with pytest.raises(httpx.HTTPError):
        httpx.post(url, json={"prompt": "late"}, timeout=10)  # no longer admitted

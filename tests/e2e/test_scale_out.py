"""Two diffusion worker services (HYPERGEN_WORKERS=2, as on a two-GPU machine, here on CPU):
both serve, the load is balanced, and a killed worker fails only its own requests."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.e2e


def workers(server) -> list[dict]:
    return httpx.get(f"{server.base_url}/health", timeout=10).json()["workers"]


def generate(server, steps: int, prompt: str = "a") -> httpx.Response:
    body = {"prompt": prompt, "size": "64x64", "num_inference_steps": steps, "response_format": "b64_json"}
    return httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=180)


def test_two_workers_share_the_load_and_a_killed_one_fails_only_its_requests(start_server):
    server = start_server({"HYPERGEN_WORKERS": "2", "HYPERGEN_TORCH_THREADS": "1"})
    # /health turns 200 with the first warmed worker; wait for both.
    server.wait_until(lambda response: response.status_code == 200 and all(w["ready"] for w in response.json()["workers"]))
    before = workers(server)
    assert [worker["name"] for worker in before] == ["hypergen-worker", "hypergen-worker-2"]
    assert all(worker["ready"] for worker in before) and None not in (before[0]["pid"], before[1]["pid"])
    assert before[0]["pid"] != before[1]["pid"]

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda index: generate(server, 4, f"p{index}"), range(8)))
    assert [response.status_code for response in responses] == [200] * 8
    served = [after["served"] - start["served"] for after, start in zip(workers(server), before)]
    assert sum(served) == 8 and min(served) >= 3, served  # balanced by load: about half each

    # Two long requests at once: one per worker. Kill the second worker mid-call.
    outcomes: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda i=i: outcomes.append(generate(server, 150, f"long{i}"))) for i in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    assert [worker["in_flight_images"] for worker in workers(server)] == [1, 1]
    victim = before[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200  # the other worker still serves
    for thread in threads:
        thread.join(timeout=180)
    codes = sorted(response.status_code for response in outcomes)
    assert codes == [200, 500], codes
    failed = next(response for response in outcomes if response.status_code == 500)
    assert failed.json()["error"]["code"] == "generation_failed"
    assert generate(server, 2).status_code == 200  # meanwhile requests go to the live worker

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = workers(server)
        if all(worker["ready"] for worker in now) and now[1]["pid"] not in (None, victim):
            break
        time.sleep(0.5)
    assert all(worker["ready"] for worker in now) and now[1]["pid"] != victim, now
    with ThreadPoolExecutor(4) as pool:
        assert all(response.status_code == 200 for response in pool.map(lambda i: generate(server, 4, f"q{i}"), range(4)))
    assert workers(server)[1]["served"] > now[1]["served"]  # the restarted worker serves again
    server.stop()

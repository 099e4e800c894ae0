"""A hostile client against a real `bentoml serve`: one bad request must not hurt another, no side
door around auth and limits, nothing leaks. Each case failed before its fix (issue "Hardening")."""

from __future__ import annotations

import base64
import io
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import psutil
import pytest
from openai import OpenAI
from PIL import Image

pytestmark = pytest.mark.e2e

KEYS = {"poison": "k-poison", "ids": "k-ids", "socket": "k-socket", "uploads": "k-uploads"}
REQUESTS_PER_MINUTE = 30


@pytest.fixture(scope="module")
def hostile_server(start_server, tmp_path_factory):
    server = start_server(
        {
            "HYPERGEN_API_KEYS": ",".join(KEYS.values()),
            "HYPERGEN_RATE_LIMIT": f"{REQUESTS_PER_MINUTE}/minute",
            "HYPERGEN_LORA_DIRS": str(tmp_path_factory.mktemp("allowed-loras")),
            "HYPERGEN_MAX_BODY_BYTES_IN_FLIGHT": str(60 * 1024 * 1024),
        }
    )
    server.wait_ready()
    return server


def client_for(server, purpose: str, **options) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key=KEYS[purpose], max_retries=0, **options)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_a_poisoned_lora_path_fails_alone_and_its_batch_mates_get_their_images(hostile_server):
    client = client_for(hostile_server, "poison")

    def innocent(seed: int):
        return client.images.generate(prompt="a red circle on a blue background", extra_body={"seed": seed, "num_inference_steps": 4})

    def poisoned():
        # Passes the API's checks (printable, 300 characters) but no file system takes a
        # 300-character name: the path check raised OSError and failed the whole batch.
        return client.images.generate(prompt="a red circle", extra_body={"lora_path": "a" * 300, "num_inference_steps": 4})

    with ThreadPoolExecutor(6) as pool:
        innocents = [pool.submit(innocent, seed) for seed in range(5)]
        poison = pool.submit(poisoned)
        results = [future.result() for future in innocents]
        with pytest.raises(openai.BadRequestError) as caught:
            poison.result()
    assert all(len(result.data) == 1 for result in results)
    assert caught.value.body["param"] == "lora_path"


def test_a_clients_request_id_cannot_cancel_or_poison_someone_elses_request(hostile_server):
    url = f"{hostile_server.base_url}/v1/images/generations"
    headers = {"Authorization": f"Bearer {KEYS['ids']}", "X-Request-ID": "shared-id"}
    body = {"prompt": "a green square on a black background", "seed": 11, "num_inference_steps": 150}
    victim: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: victim.update(response=httpx.post(url, json=body, headers=headers, timeout=120)))
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the victim's call runs
        if any("shared-id" in call["requests"] for call in httpx.get(f"{hostile_server.base_url}/health").json()["busy"]):
            break
        time.sleep(0.05)
    with pytest.raises(httpx.ReadTimeout):  # the attacker sends the victim's id, then leaves
        httpx.post(url, json={**body, "prompt": "a red circle"}, headers=headers, timeout=0.3)
    thread.join()
    reference = httpx.post(url, json=body, headers={"Authorization": headers["Authorization"]}, timeout=120)
    again = httpx.post(url, json={**body, "num_inference_steps": 2}, headers=headers, timeout=120)
    assert victim["response"].status_code == 200 and victim["response"].headers["x-request-id"] == "shared-id"
    finished = pixels(victim["response"].json()["data"][0]["b64_json"])
    assert np.array_equal(finished, pixels(reference.json()["data"][0]["b64_json"]))  # not half-denoised
    assert again.status_code == 200  # a cancelled id does not poison later requests


def test_the_websocket_charges_the_same_rate_limit_as_http(hostile_server):
    from httpx_ws import connect_ws

    headers = {"Authorization": f"Bearer {KEYS['socket']}"}
    statuses = [httpx.get(f"{hostile_server.base_url}/v1/loras", headers=headers).status_code for _ in range(REQUESTS_PER_MINUTE + 1)]
    assert statuses[-1] == 429  # /v1/loras is charged too
    url = hostile_server.base_url.replace("http://", "ws://") + "/v1/images/ws"
    with httpx.Client(timeout=30, headers=headers) as http, connect_ws(url, http) as socket:
        socket.send_json({"prompt": "a red circle", "n": 4})
        event = socket.receive_json()
    assert event["type"] == "error" and event["error"]["code"] == "rate_limit_exceeded"


def test_metrics_name_no_file_ids_and_do_not_grow_with_unique_urls(hostile_server):
    before = httpx.get(f"{hostile_server.base_url}/metrics").text
    probes = [f"img_{secrets.token_urlsafe(18)}.png" for _ in range(200)]
    with httpx.Client(base_url=hostile_server.base_url) as http:
        assert {http.get(f"/v1/images/files/{probe}").status_code for probe in probes} == {404}
    after = httpx.get(f"{hostile_server.base_url}/metrics").text
    assert not any(probe in after for probe in probes)
    assert len(after) - len(before) < 4096  # counters moved; no new series per URL
    assert 'route="/v1/images/files/{file_id}"' in after


def server_memory(server) -> int:
    """Resident bytes of every process of the server (API and workers)."""
    total = 0
    for process in psutil.Process(server.process.pid).children(recursive=True) + [psutil.Process(server.process.pid)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def test_uploads_are_not_held_before_auth_and_bodies_in_flight_are_bounded(hostile_server):
    url = f"{hostile_server.base_url}/v1/images/edits"
    upload = secrets.token_bytes(20 * 1024 * 1024)
    baseline, peak, done = server_memory(hostile_server), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server_memory(hostile_server))
            time.sleep(0.05)

    def send(key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            return httpx.post(url, files={"image": ("a.png", upload)}, data={"prompt": "x"}, headers=headers, timeout=60).status_code
        except httpx.HTTPError:  # refused before the upload finished: the server closed on us
            return 0

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(10) as pool:
        anonymous = list(pool.map(send, [None] * 10))
        keyed = list(pool.map(send, [KEYS["uploads"]] * 6))
    done.set()
    sampler.join()
    assert set(anonymous) <= {401, 0} and 401 in anonymous
    assert set(keyed) <= {400, 503, 0}  # not an image, or over the in-flight budget; never a 500
    # 16 uploads of 20 MB: before, the API held every body (and 24 × 40 MB took it to 4 GB).
    assert peak[0] - baseline < 200 * 1024 * 1024

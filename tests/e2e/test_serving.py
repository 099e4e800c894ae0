"""The serving core as a user meets it: `bentoml serve` and the official openai client."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from .conftest import URL_TTL_S

pytestmark = pytest.mark.e2e


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB"), dtype=np.int16)


def test_generate_two_png_images_with_the_openai_client(default_server, client, validate_openai):
    response = client.images.generate(prompt="a red circle", n=2, size="64x64", response_format="b64_json")
    assert len(response.data) == 2 and response.created > 1_700_000_000
    for item in response.data:
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (64, 64)
    raw = httpx.post(
        f"{default_server.base_url}/v1/images/generations",
        json={"prompt": "a red circle", "n": 2, "size": "64x64", "response_format": "b64_json"},
        timeout=60,
    )
    validate_openai("ImagesResponse", raw.json())
    assert "size" not in raw.json()  # 64x64 is outside OpenAI's enum, so it is left out


def test_url_images_download_until_they_expire(default_server, client):
    body = dict(prompt="a blue square", size="64x64", extra_body={"seed": 11, "num_inference_steps": 4})
    as_b64 = client.images.generate(response_format="b64_json", **body)
    as_url = client.images.generate(response_format="url", **body)
    url = as_url.data[0].url
    assert url.startswith(f"{default_server.base_url}/v1/images/files/")
    downloaded = httpx.get(url, timeout=10)
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    assert downloaded.content == base64.b64decode(as_b64.data[0].b64_json)
    time.sleep(URL_TTL_S + 1)
    expired = httpx.get(url, timeout=10)
    assert expired.status_code == 404 and expired.json()["error"]["code"] == "not_found"


def test_models_and_health(default_server, client, validate_openai):
    models = client.models.list()
    assert [model.id for model in models.data] == ["hypergen-tiny-sd"]
    assert client.models.retrieve("hypergen-tiny-sd").id == "hypergen-tiny-sd"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1")
    validate_openai("ListModelsResponse", httpx.get(f"{default_server.base_url}/v1/models").json())
    health = httpx.get(f"{default_server.base_url}/health")
    assert health.status_code == 200
    assert {"status": "ok", "model": "hypergen-tiny-sd", "queue_depth": 0, "max_queue_size": 100}.items() <= health.json().items()


def test_seeds_make_images_reproducible(client):
    def one(seed=None, n=1):
        extra = {"num_inference_steps": 4} | ({"seed": seed} if seed is not None else {})
        response = client.images.generate(prompt="a green triangle", n=n, size="64x64", response_format="b64_json", extra_body=extra)
        return [pixels(item.b64_json) for item in response.data]

    first, again, other = one(seed=42)[0], one(seed=42)[0], one(seed=43)[0]
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1.0
    unseeded = one(n=2) + one()
    assert all(np.abs(a - b).mean() > 1.0 for i, a in enumerate(unseeded) for b in unseeded[i + 1 :])


def test_bad_input_raises_bad_request_naming_the_field(client, default_server):
    cases = [
        ({"n": 11}, "n"),
        ({"size": "100x100"}, "size"),
        ({"size": "8192x8192"}, "size"),
        ({"response_format": "gif"}, "response_format"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a", **fields)
        assert caught.value.body["param"] == param
    for extra, param in [
        ({"num_inference_steps": 500}, "num_inference_steps"),
        ({"guidance_scale": 21}, "guidance_scale"),
        ({"lora_scale": 3}, "lora_scale"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a", extra_body=extra)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="a", model="no-such-model")
    unknown = httpx.post(f"{default_server.base_url}/v1/nothing/here", json={})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    ok = client.images.generate(
        prompt="a",
        size="64x64",
        quality="high",
        style="vivid",
        user="me",
        extra_body={"num_inference_steps": 2, "background": "opaque", "moderation": "low"},
    )
    assert len(ok.data) == 1


def test_concurrent_requests_are_batched_and_each_gets_its_own_images(default_server, client):
    """Eight concurrent requests with different prompts, seeds, sizes, n and negative prompts:
    each answer equals the same request sent alone, and some pipeline call served several."""
    requests = [
        {
            "prompt": f"shape {index}",
            "size": "64x64" if index % 3 else "128x64",
            "n": 1 + index % 2,
            "extra_body": {"seed": 100 + index, "num_inference_steps": 8} | ({"negative_prompt": f"not {index}"} if index % 4 == 1 else {}),
        }
        for index in range(8)
    ]

    def send(request):
        response = client.images.generate(response_format="b64_json", **request)
        return [pixels(item.b64_json) for item in response.data]

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(send, requests))
    alone = [send(request) for request in requests]
    for request, batched_images, single_images in zip(requests, together, alone):
        assert len(batched_images) == request["n"] == len(single_images)
        for batched, single in zip(batched_images, single_images):
            assert batched.shape == single.shape
            assert np.abs(batched - single).mean() <= 1.0  # ≤ 1/255 on average (float32 CPU)
    calls = [line for line in default_server.log().splitlines() if "pipeline call:" in line]
    shared = [line for line in calls if int(line.split(" images for ")[1].split(" requests")[0]) > 1]
    assert shared, "no pipeline call served more than one request:\n" + "\n".join(calls[-20:])


def test_request_ids_and_logs(default_server, client):
    response = httpx.post(
        f"{default_server.base_url}/v1/images/generations",
        json={"prompt": "a", "size": "64x64", "num_inference_steps": 2},
        headers={"X-Request-ID": "my-trace-42"},
        timeout=60,
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "my-trace-42"
    assert httpx.get(f"{default_server.base_url}/health").headers["x-request-id"].startswith("req_")
    log = default_server.log()
    assert "model 'hypergen-tiny-sd' loaded from" in log and "on cpu (float32)" in log
    assert "assets/demo-model" in log and "RANDOM" not in log  # the trained demo model, not noise
    request_line = next(line for line in log.splitlines() if "request my-trace-42" in line)
    for fragment in ("status=200", "n=1", "size=64x64", "steps=2", "queue_wait=", "generation="):
        assert fragment in request_line
    assert float(request_line.split("queue_wait=")[1].split("ms")[0]) >= 0  # timings are bench/'s business


def test_sustained_concurrent_load_loses_no_request(default_server):
    """150 requests at concurrency 8 through one server: every one answered 200 with an image.
    (BentoML's dependency client recycles its session every 100 requests and, unpatched, drops
    the requests in flight on it.)"""

    def send(index: int) -> tuple[int, int]:
        response = httpx.post(
            f"{default_server.base_url}/v1/images/generations",
            json={"prompt": f"load {index}", "size": "64x64", "num_inference_steps": 1, "seed": index},
            timeout=120,
        )
        return response.status_code, len(response.json().get("data", []))

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(send, range(150)))
    assert outcomes == [(200, 1)] * 150


def test_a_start_shows_what_loads_and_no_noise(default_server, client):
    client.images.generate(prompt="a red circle", size="64x64", extra_body={"num_inference_steps": 2})
    httpx.get(f"{default_server.base_url}/health")
    log = default_server.log()
    assert "loading model 'hypergen-tiny-sd'" in log and "UNet2DConditionModel" in log  # what loads, and how long
    assert "requires torchvision" not in log and "Loading pipeline components" not in log
    assert "path=/status" not in log and "path=/health" not in log  # the API's own polling
    assert "path=/v1/images/generations" in log  # real requests stay
    assert "API keys are off" in log

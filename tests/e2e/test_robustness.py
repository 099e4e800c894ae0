"""Robustness against a real `bentoml serve`: schemathesis fuzzing over the served OpenAPI
document (no 5xx for anything a client can send, every error OpenAI's error object), and a burst
of twice the queue bound (every request answered 200 or 503, none lost or mixed up).

Bounded (HYPERGEN_FUZZ_EXAMPLES, default 10 per operation) so the suite stays fast; set it
higher for a longer run. Valid-but-costly values (steps, n, sizes) are clamped to cheap valid
ones: their validation is covered, and the CPU is not spent drawing 1024² images.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
from urllib.parse import unquote

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("HYPERGEN_FUZZ_EXAMPLES", "10"))


MAX_QUEUE = 12


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    server = start_server({"HYPERGEN_REQUEST_TIMEOUT": "60", "HYPERGEN_MAX_QUEUE": str(MAX_QUEUE)})
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("fuzz_schema")


def cheap(body, path: str = ""):
    """Keep generation requests that pass validation cheap to run (video jobs: one step)."""
    if isinstance(body, dict) and path.startswith("/v1/videos"):
        body.setdefault("num_inference_steps", 1)
    if isinstance(body, dict):
        if isinstance(body.get("num_inference_steps"), int) and 1 <= body["num_inference_steps"] <= 150:
            body["num_inference_steps"] = 1
        if isinstance(body.get("n"), int) and 1 <= body["n"] <= 10:
            body["n"] = 1
        if isinstance(body.get("size"), str) and body["size"] != "auto":
            body["size"] = "64x64" if "x" in body["size"] else body["size"]
    return body


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_openai_error_objects(case):
    if isinstance(case.body, dict):
        case.body = cheap(case.body, case.path)
    response = case.call(timeout=120)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    content_type = response.headers.get("content-type") or [""]
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if any(ord(char) < 32 for char in unquote(case.formatted_path)):
        # A control character in the path (e.g. %0A) matches no route of the mounted app, not even
        # its catch-all: BentoML's own router answers that 404 in plain text (README: known limits).
        return
    if response.status_code >= 400:
        assert content_type.startswith("application/json"), f"{case.method} {case.path}: {content_type}"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


def test_a_burst_of_twice_the_queue_gets_200_or_503_and_every_image_is_its_own(fuzz_server):
    url = f"{fuzz_server.base_url}/v1/images/generations"

    def body(seed: int) -> dict:
        return {"prompt": f"burst {seed}", "size": "64x64", "num_inference_steps": 2, "seed": seed, "response_format": "b64_json"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.wait_for(asyncio.gather(*(client.post(url, json=body(seed)) for seed in range(2 * MAX_QUEUE + 8))), 300)

    responses = asyncio.run(burst())
    codes = [response.status_code for response in responses]
    assert set(codes) <= {200, 503} and codes.count(200) >= MAX_QUEUE, codes
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "queue_full" and "retry-after" in response.headers
    with httpx.Client(timeout=120) as client:
        for seed, response in enumerate(responses):
            if response.status_code == 200:
                alone = pixels(client.post(url, json=body(seed)).json()["data"][0]["b64_json"])
                batched = pixels(response.json()["data"][0]["b64_json"])
                assert np.abs(batched - alone).mean() <= 1.0, seed  # float32 CPU: batched ≈ solo


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)

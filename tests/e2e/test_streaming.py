"""Streaming through `bentoml serve` with the official client."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_stream_partials_then_the_final_image_equal_to_the_non_streamed_one(client):
    extra = {"seed": 9, "num_inference_steps": 8}
    events = list(client.images.generate(prompt="a moon", size="64x64", stream=True, partial_images=3, extra_body=extra))
    plain = client.images.generate(prompt="a moon", size="64x64", response_format="b64_json", extra_body=extra)
    assert [event.type for event in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:3]] == [0, 1, 2]
    assert events[-1].b64_json == plain.data[0].b64_json


def test_a_client_that_leaves_mid_stream_frees_its_slot(default_server):
    url = f"{default_server.base_url}/v1/images/generations"
    body = {"prompt": "long", "size": "64x64", "stream": True, "partial_images": 3, "num_inference_steps": 150, "seed": 2}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", url, json=body) as response:
            for line in response.iter_lines():
                if "partial_image" in line:
                    break  # leave after the first partial image
        deadline = time.monotonic() + 30
        while httpx.get(f"{default_server.base_url}/health").json()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{default_server.base_url}/health").json()["in_flight"] == 0
        follow = http.post(url, json={"prompt": "next", "size": "64x64", "num_inference_steps": 2})
        assert follow.status_code == 200
    log = default_server.log()
    assert "status=499" in log  # logged as abandoned by the client
    assert "interrupting a pipeline call" in log  # the 150-step call stopped early


def test_websocket_progress_through_bentoml_serve(default_server):
    from httpx_ws import connect_ws

    url = default_server.base_url.replace("http://", "ws://") + "/v1/images/ws"
    with httpx.Client(timeout=60) as http, connect_ws(url, http) as socket:
        socket.send_json({"prompt": "a sun", "size": "64x64", "partial_images": 1, "num_inference_steps": 5, "seed": 3})
        events = []
        while not events or events[-1]["type"] not in ("image_generation.completed", "error"):
            events.append(socket.receive_json())
    steps = [event["step"] for event in events if event["type"] == "progress"]
    assert [event["type"] for event in events[:2]] == ["queued", "started"]
    assert steps == [1, 2, 3, 4, 5] and events[-1]["type"] == "image_generation.completed"


def test_a_plain_request_whose_client_leaves_is_cancelled_too(default_server):
    def abandoned() -> int:
        return sum("status=499" in line and "steps=149" in line for line in default_server.log().splitlines())

    def interrupted() -> int:
        return default_server.log().count("interrupting a pipeline call")

    url = f"{default_server.base_url}/v1/images/generations"
    before = interrupted()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"prompt": "abandoned", "size": "64x64", "num_inference_steps": 149}, timeout=0.8)
    deadline = time.monotonic() + 30
    while (abandoned() == 0 or interrupted() == before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert abandoned() == 1 and interrupted() == before + 1
    follow = httpx.post(url, json={"prompt": "next", "size": "64x64", "num_inference_steps": 2}, timeout=60)
    assert follow.status_code == 200

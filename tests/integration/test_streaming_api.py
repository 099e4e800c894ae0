"""Streaming (OpenAI image stream events over SSE) through the in-process app and a real engine."""

import asyncio
import base64
import io
import json
import threading
import time

from PIL import Image

from hypergen.engine.previews import preview_steps
from hypergen.protocol import ProgressEvent

from .conftest import EngineClient, http, openai_client, run


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_preview_steps_are_evenly_spaced_and_never_the_last():
    assert preview_steps(20, 3) == {4, 9, 14}
    assert preview_steps(4, 3) == {0, 1, 2}
    assert preview_steps(2, 3) == {0}
    assert preview_steps(20, 0) == set() and preview_steps(1, 2) == set()


def test_the_official_client_streams_partials_then_the_same_final_image(make_app, engine):
    client = openai_client(make_app(EngineClient(engine)))
    extra = {"seed": 5, "num_inference_steps": 6}

    async def scenario():
        stream = await client.images.generate(prompt="a star", size="64x64", stream=True, partial_images=2, extra_body=extra)
        events = [event async for event in stream]
        plain = await client.images.generate(prompt="a star", size="64x64", response_format="b64_json", extra_body=extra)
        return events, plain

    events, plain = run(scenario())
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert events[-1].b64_json == plain.data[0].b64_json
    assert events[-1].usage is not None and events[-1].size == "auto" and events[-1].output_format == "png"
    for event in events[:2]:
        assert Image.open(io.BytesIO(base64.b64decode(event.b64_json))).size == (64, 64)


def test_n_images_stream_with_their_index_and_edits_use_edit_events(make_app, engine):
    app = make_app(EngineClient(engine))

    async def scenario():
        async with http(app) as client:
            generated = await client.post(
                "/v1/images/generations",
                json={"prompt": "a", "n": 2, "stream": True, "partial_images": 1, "num_inference_steps": 4, "seed": 1},
            )
            edited = await client.post(
                "/v1/images/edits",
                data={"prompt": "b", "stream": "true", "partial_images": "1", "num_inference_steps": "4"},
                files={"image": ("s.png", png(Image.new("RGB", (64, 64), (0, 90, 200))), "image/png")},
            )
            return generated, edited

    generated, edited = run(scenario())
    assert generated.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in generated.text.splitlines() if line.startswith("data: ")]
    kinds = [(event["type"], event["image_index"]) for event in events]
    assert sorted(kinds) == sorted(
        [
            ("image_generation.partial_image", 0),
            ("image_generation.partial_image", 1),
            ("image_generation.completed", 0),
            ("image_generation.completed", 1),
        ]
    )
    edit_types = [json.loads(line[6:])["type"] for line in edited.text.splitlines() if line.startswith("data: ")]
    assert edit_types == ["image_edit.partial_image", "image_edit.completed"]


def test_a_failure_after_the_headers_is_an_error_event(make_app, engine):
    app = make_app(EngineClient(engine))

    async def scenario():
        async with http(app) as client:
            return await client.post(
                "/v1/images/generations", json={"prompt": "a", "stream": True, "lora_path": "no-such-adapter", "num_inference_steps": 2}
            )

    response = run(scenario())
    assert response.status_code == 200  # headers were sent before the worker found out
    assert "event: error" in response.text and '"param":"lora_path"' in response.text


def test_abandoned_streams_are_dropped_or_interrupted_and_free_their_slot(make_app, engine):
    app = make_app(EngineClient(engine), max_batch_size=1)
    serving = app.state.serving

    async def scenario():
        async with http(app) as client:

            async def abandon():
                async with client.stream(
                    "POST", "/v1/images/generations",
                    json={"prompt": "long", "stream": True, "partial_images": 3, "num_inference_steps": 150, "seed": 1},
                ) as response:  # fmt: skip
                    async for line in response.aiter_lines():
                        if "partial_image" in line:
                            return  # leave mid-generation, closing the stream

            await asyncio.wait_for(abandon(), 120)
            await asyncio.sleep(0.1)
            in_flight_after = serving.queue.in_flight
            follow = await asyncio.wait_for(client.post("/v1/images/generations", json={"prompt": "next", "num_inference_steps": 2}), 120)
            return in_flight_after, follow

    in_flight_after, follow = run(scenario())
    assert in_flight_after == 0
    assert follow.status_code == 200


def test_variations_cannot_stream(make_app, engine):
    app = make_app(EngineClient(engine))

    async def scenario():
        async with http(app) as client:
            return await client.post(
                "/v1/images/variations",
                data={"stream": "true"},
                files={"image": ("s.png", png(Image.new("RGB", (64, 64))), "image/png")},
            )

    response = run(scenario())
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream"


def test_websocket_sends_queue_state_monotonic_progress_partials_and_the_result(make_app, engine):
    from starlette.testclient import TestClient

    app = make_app(EngineClient(engine))
    request = {"prompt": "a star", "size": "64x64", "partial_images": 2, "num_inference_steps": 6, "seed": 5}
    with TestClient(app) as client, client.websocket_connect("/v1/images/ws") as socket:
        socket.send_json(request)
        events = []
        while not events or events[-1]["type"] not in ("image_generation.completed", "error"):
            events.append(socket.receive_json())
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "image_generation.completed"
    assert events[0]["position"] == 0  # nobody ahead
    steps = [event["step"] for event in events if event["type"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == events[1]["total_steps"] == 6
    assert kinds.count("image_generation.partial_image") == 2
    plain = run(
        openai_client(app).images.generate(
            prompt="a star", size="64x64", response_format="b64_json", extra_body={"seed": 5, "num_inference_steps": 6}
        )
    )
    assert events[-1]["b64_json"] == plain.data[0].b64_json


def test_websocket_errors_are_openai_error_objects(make_app, engine):
    from starlette.testclient import TestClient

    app = make_app(EngineClient(engine), api_keys=["k1"])
    with TestClient(app) as client:
        with client.websocket_connect("/v1/images/ws") as socket:
            socket.send_json({"prompt": "a"})
            assert socket.receive_json()["error"]["code"] == "missing_api_key"
        with client.websocket_connect("/v1/images/ws", headers={"Authorization": "Bearer k1"}) as socket:
            socket.send_json({"prompt": "a", "n": 99})
            error = socket.receive_json()
            assert error["type"] == "error" and error["error"]["param"] == "n"


def occupy_the_only_slot(client, queue) -> threading.Event:
    """Hold the queue's one dispatch slot from the test client's event loop until released."""
    release = threading.Event()

    async def hold():
        async with queue.slot():
            while not release.is_set():
                await asyncio.sleep(0.01)

    client.portal.start_task_soon(hold)
    while queue.in_flight == 0:
        time.sleep(0.01)
    return release


def test_websocket_clients_see_their_queue_position_while_they_wait(make_app, engine):
    from starlette.testclient import TestClient

    app = make_app(EngineClient(engine), max_batch_size=1)
    queue = app.state.serving.queue
    with TestClient(app) as client:
        release = occupy_the_only_slot(client, queue)
        with client.websocket_connect("/v1/images/ws") as socket:
            socket.send_json({"prompt": "second", "num_inference_steps": 2})
            events = [socket.receive_json()]
            release.set()
            while events[-1]["type"] not in ("image_generation.completed", "error"):
                events.append(socket.receive_json())
    queued = [event for event in events if event["type"] == "queued"]
    assert [event["position"] for event in queued] == [1]  # then "started"
    assert [event["type"] for event in events[:2]] == ["queued", "started"]
    assert queued[0]["estimated_wait_s"] >= 0 and events[-1]["type"] == "image_generation.completed"


def test_browsers_send_the_websocket_key_as_a_subprotocol_that_is_never_echoed(make_app, engine):
    from starlette.testclient import TestClient

    app = make_app(EngineClient(engine), api_keys=["k1"])
    with TestClient(app) as client:
        offered = ["hypergen", "openai-insecure-api-key.wrong"]
        with client.websocket_connect("/v1/images/ws", subprotocols=offered) as socket:
            socket.send_json({"prompt": "a", "n": 99})
            assert socket.receive_json()["error"]["code"] == "invalid_api_key"
        offered = ["hypergen", "openai-insecure-api-key.k1"]
        with client.websocket_connect("/v1/images/ws", subprotocols=offered) as socket:
            assert socket.accepted_subprotocol == "hypergen"
            socket.send_json({"prompt": "a", "n": 99})
            error = socket.receive_json()
            assert error["type"] == "error" and error["error"]["param"] == "n"


def test_an_idle_server_estimates_no_wait_and_binary_frames_get_an_error_event(make_app, engine):
    from starlette.testclient import TestClient

    app = make_app(EngineClient(engine))
    app.state.serving.dispatcher.recent_call_s = 5.0  # as if calls took 5 s: position 0 must still wait 0
    with TestClient(app) as client:
        with client.websocket_connect("/v1/images/ws") as socket:
            socket.send_json({"prompt": "a", "num_inference_steps": 1})
            queued = socket.receive_json()
        with client.websocket_connect("/v1/images/ws") as socket:
            socket.send_bytes(b"\x00\x01binary")
            error = socket.receive_json()
    assert queued["type"] == "queued" and queued["position"] == 0 and queued["estimated_wait_s"] == 0
    assert error["type"] == "error" and error["error"]["code"] == "invalid_json"


def test_streams_and_sockets_waiting_in_the_queue_time_out(make_app, engine):
    from starlette.testclient import TestClient

    app = make_app(EngineClient(engine), max_batch_size=1, request_timeout=0.5)
    queue = app.state.serving.queue
    with TestClient(app) as client:
        release = occupy_the_only_slot(client, queue)
        stream = client.post("/v1/images/generations", json={"prompt": "a", "stream": True})
        with client.websocket_connect("/v1/images/ws") as socket:
            socket.send_json({"prompt": "a"})
            events = [socket.receive_json()]
            while events[-1]["type"] != "error":
                events.append(socket.receive_json())
        release.set()
    assert stream.status_code == 504 and stream.json()["error"]["code"] == "timeout"
    assert events[-1]["error"]["code"] == "timeout" and queue.depth == 0


def test_a_worker_that_dies_mid_stream_ends_it_with_an_error_event(make_app, engine):
    class DyingWorker(EngineClient):
        async def generate_stream(self, job, partial_images, progress=False):
            yield ProgressEvent(step=1, total_steps=2)
            raise ConnectionError("the worker process died")

    app = make_app(DyingWorker(engine))

    async def scenario():
        async with http(app) as client:
            response = await client.post("/v1/images/generations", json={"prompt": "a", "stream": True})
            return response, app.state.serving.queue.in_flight

    response, in_flight = run(scenario())
    assert response.status_code == 200 and "event: error" in response.text
    assert '"code":"generation_failed"' in response.text.replace(" ", "") and in_flight == 0


def test_a_body_that_is_not_utf8_is_an_openai_error_with_a_code(make_app, engine):
    app = make_app(EngineClient(engine))

    async def scenario():
        async with http(app) as client:
            return await client.post(
                "/v1/images/generations", content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"}
            )

    response = run(scenario())
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"

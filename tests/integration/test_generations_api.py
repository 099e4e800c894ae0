import asyncio
import base64
import io
import logging

import openai
import pytest
from PIL import Image

from hypergen.protocol import GenerationJob, GenerationResult, LoraReply, ModelLimits, WorkerStatus

from .conftest import EngineClient, failing_pipeline, http, openai_client, run

TINY = ModelLimits(id="tiny", native_width=64, native_height=64, default_steps=4)


class ScriptedWorker:
    """A worker whose generate() blocks until released; for exact queue tests."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def generate(self, jobs):
        self.calls += 1
        await self.release.wait()
        return [GenerationResult(request_id=job.request_id, images_b64=[base64.b64encode(b"x").decode()] * job.n) for job in jobs]

    async def status(self):
        return WorkerStatus(ready=True, models=[TINY])

    async def manage_loras(self, command):
        return LoraReply(adapters=[])


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({"prompt": "a", "n": 11}, "n", "1 to 10"),
        ({"prompt": "a", "size": "64"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "a", "size": "60x64"}, "size", "multiple of 8"),
        ({"prompt": "a", "size": "4096x4096"}, "size", "from 64 to 2048"),
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps", "1 to 150"),
        ({"prompt": "a", "guidance_scale": 0.5}, "guidance_scale", "1.0 to 20.0"),
        ({"prompt": "a", "lora_scale": -1}, "lora_scale", "0.0 to 2.0"),
        ({"prompt": "a", "response_format": "png"}, "response_format", "'url' or 'b64_json'"),
        ({"prompt": ""}, "prompt", "non-empty"),
        ({"n": 1}, "prompt", "Missing required parameter"),
        ({"prompt": ["a", "b"]}, "prompt", "non-empty string"),
        ({"prompt": "a", "n": "two"}, "n", "1 to 10"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(make_app, body, param, fragment):
    app = make_app(ScriptedWorker())

    async def scenario():
        async with http(app) as client:
            return await client.post("/v1/images/generations", json=body)

    response = run(scenario())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"null"])
def test_malformed_bodies_are_400_openai_errors(make_app, raw):
    app = make_app(ScriptedWorker())

    async def scenario():
        async with http(app) as client:
            return await client.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})

    response = run(scenario())
    assert response.status_code == 400 and "error" in response.json()


def test_the_official_client_raises_typed_errors(make_app):
    app = make_app(ScriptedWorker())

    async def scenario():
        client = openai_client(app)
        with pytest.raises(openai.BadRequestError) as bad:
            await client.images.generate(prompt="a", n=12)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.images.generate(prompt="a", model="dall-e-9")
        return bad.value, missing.value

    bad, missing = run(scenario())
    assert bad.body["param"] == "n"
    assert missing.body["code"] == "model_not_found" and "tiny" in missing.body["message"]


def test_unknown_openai_fields_are_accepted_and_unknown_routes_are_404(make_app):
    worker = ScriptedWorker()
    worker.release.set()
    app = make_app(worker)

    async def scenario():
        async with http(app) as client:
            ok = await client.post(
                "/v1/images/generations",
                json={"prompt": "a", "quality": "high", "style": "natural", "moderation": "low", "user": "u", "brand_new": 1},
            )
            missing = await client.get("/v2/whatever")
            return ok, missing

    ok, missing = run(scenario())
    assert ok.status_code == 200, ok.text
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_every_response_carries_a_request_id_and_echoes_the_clients(make_app):
    app = make_app(ScriptedWorker())

    async def scenario():
        async with http(app) as client:
            mine = await client.get("/v1/models", headers={"X-Request-ID": "trace-123"})
            generated = await client.post("/v1/images/generations", json={"n": 0})
            return mine, generated

    mine, generated = run(scenario())
    assert mine.headers["x-request-id"] == "trace-123"
    assert generated.headers["x-request-id"].startswith("req_") and generated.status_code == 400


def test_bodies_over_the_limit_are_413(make_app):
    app = make_app(ScriptedWorker(), max_body_bytes=1000)

    async def scenario():
        async with http(app) as client:
            declared = await client.post("/v1/images/generations", json={"prompt": "a" * 5000})

            async def chunks():
                for _ in range(10):
                    yield b"x" * 500

            chunked = await client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
            return declared, chunked

    declared, chunked = run(scenario())
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    assert chunked.status_code == 413


def test_api_keys_are_enforced_except_on_health(make_app):
    worker = ScriptedWorker()
    worker.release.set()
    app = make_app(worker, api_keys=["k1", "k2"])

    async def scenario():
        with pytest.raises(openai.AuthenticationError):
            await openai_client(app, api_key="wrong").images.generate(prompt="a")
        async with http(app) as client:
            missing = await client.get("/v1/models")
            health = await client.get("/health")
        good = await openai_client(app, api_key="k2").models.list()
        return missing, health, good

    missing, health, good = run(scenario())
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert health.status_code == 200
    assert [model.id for model in good.data] == ["tiny"]


def test_a_full_queue_answers_503_at_once_with_retry_after(make_app):
    worker = ScriptedWorker()
    app = make_app(worker, max_queue=2, max_batch_size=1)

    async def scenario():
        async with http(app) as client:
            admitted = [asyncio.create_task(client.post("/v1/images/generations", json={"prompt": str(i)})) for i in range(3)]
            await asyncio.sleep(0.2)
            health = (await client.get("/health")).json()
            refused = await asyncio.wait_for(client.post("/v1/images/generations", json={"prompt": "late"}), 5)
            worker.release.set()
            return health, refused, await asyncio.gather(*admitted)

    health, refused, admitted = run(scenario())
    assert health["queue_depth"] == 2 and health["in_flight"] == 1 and health["max_queue_size"] == 2
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
    assert [response.status_code for response in admitted] == [200, 200, 200]


def test_health_is_503_until_the_worker_is_ready(make_app):
    class Loading(ScriptedWorker):
        async def status(self):
            return WorkerStatus(ready=False, detail="loading the model")

    app = make_app(Loading())

    async def scenario():
        async with http(app) as client:
            return await client.get("/health"), await client.post("/v1/images/generations", json={"prompt": "a"})

    health, generation = run(scenario())
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert generation.status_code == 503 and generation.json()["error"]["code"] == "not_ready"


def test_a_failing_generation_is_500_for_that_request_only(make_app, engine, caplog):
    app = make_app(EngineClient(engine))

    async def scenario():
        async with http(app) as client:
            bad = client.post("/v1/images/generations", json={"prompt": "explode", "num_inference_steps": 2})
            good = client.post("/v1/images/generations", json={"prompt": "fine", "num_inference_steps": 2})
            return await asyncio.gather(bad, good)

    with (
        failing_pipeline(engine, "explode", RuntimeError("CUDA out of memory (simulated)")),
        caplog.at_level(logging.INFO, logger="hypergen"),
    ):
        bad, good = run(scenario())
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "generation_failed" and "CUDA" not in error["message"] and "Traceback" not in error["message"]
    request_id = bad.headers["x-request-id"]
    assert request_id in error["message"]
    assert good.status_code == 200 and len(good.json()["data"]) == 1
    timing = good.headers["server-timing"]
    assert "queue;dur=" in timing and "generation;dur=" in timing and 'batch;desc="1"' in timing
    logged = caplog.text
    assert request_id in logged and "RuntimeError: CUDA out of memory" in logged and "Traceback" in logged


def test_url_responses_serve_the_same_png_until_expiry(make_app, engine):
    app = make_app(EngineClient(engine), url_ttl=60, public_url="https://images.example.test/base/")

    async def scenario():
        async with http(app) as client:
            body = {"prompt": "a", "num_inference_steps": 2, "seed": 5}
            as_b64 = (await client.post("/v1/images/generations", json={**body, "response_format": "b64_json"})).json()
            as_url = (await client.post("/v1/images/generations", json={**body, "response_format": "url"})).json()
            url = as_url["data"][0]["url"]
            assert url.startswith("https://images.example.test/base/v1/images/files/img_")
            path = url.split("/base", 1)[1]
            fetched = await client.get(path)
            serving = app.state.serving
            serving.store.ttl_seconds = 0.0  # everything stored is now expired
            expired = await client.get(path)
            return as_b64, fetched, expired

    as_b64, fetched, expired = run(scenario())
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == base64.b64decode(as_b64["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    assert expired.status_code == 404 and expired.json()["error"]["code"] == "not_found"


def test_health_waits_for_the_batcher_warm_up_and_real_requests_are_not_counted(make_app):
    worker = ScriptedWorker()
    worker.release.set()
    app = make_app(worker, warmed_up=False)

    async def scenario():
        async with http(app) as client:
            first = await client.get("/health")
            app.state.serving.readiness.start_polling()
            for _ in range(100):
                await asyncio.sleep(0.02)
                if app.state.serving.worker.loads[0].ready:
                    break
            return first, await client.get("/health")

    first, after = run(scenario())
    assert first.status_code == 503 and first.json()["detail"].startswith("warming up the batcher")
    assert after.status_code == 200 and after.json()["status"] == "ok"
    assert worker.calls == 12


def test_rate_limits_are_per_key_with_openai_headers(make_app):
    worker = ScriptedWorker()
    worker.release.set()
    app = make_app(worker, api_keys=["k1", "k2"], rate_limit="2/minute,3 images/minute")

    async def scenario():
        first = await openai_client(app, "k1").images.with_raw_response.generate(prompt="a")
        await openai_client(app, "k1").images.generate(prompt="a")
        with pytest.raises(openai.RateLimitError) as limited:
            await openai_client(app, "k1").images.generate(prompt="a")
        with pytest.raises(openai.RateLimitError) as budget:
            await openai_client(app, "k2").images.generate(prompt="a", n=4)
        other = await openai_client(app, "k2").images.generate(prompt="a", n=3)
        return first, limited.value, budget.value, other

    first, limited, budget, other = run(scenario())
    assert first.headers["x-ratelimit-remaining-requests"] == "1" and first.headers["x-ratelimit-limit-requests"] == "2"
    assert limited.body["code"] == "rate_limit_exceeded" and limited.body["type"] == "requests"
    assert int(limited.response.headers["retry-after"]) >= 1 and limited.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert budget.body["type"] == "images"
    assert len(other.data) == 3


def test_output_format_and_compression_follow_openai(make_app, engine):
    client = openai_client(make_app(EngineClient(engine)))

    async def generate(**fields):
        response = await client.images.generate(
            prompt="a", size="64x64", response_format="b64_json", extra_body={"seed": 2, "num_inference_steps": 2}, **fields
        )
        return response, base64.b64decode(response.data[0].b64_json)

    async def scenario():
        return [
            await generate(output_format=fmt, output_compression=quality)
            for fmt, quality in (("jpeg", 95), ("jpeg", 10), ("webp", 80), ("png", 100))
        ]

    (jpeg, best), (_, worst), (webp, webp_bytes), (png_response, png_bytes) = run(scenario())
    assert Image.open(io.BytesIO(best)).format == "JPEG" and jpeg.output_format == "jpeg"
    assert len(worst) < len(best)  # output_compression is the quality of lossy formats
    assert Image.open(io.BytesIO(webp_bytes)).format == "WEBP" and webp.output_format == "webp"
    assert Image.open(io.BytesIO(png_bytes)).format == "PNG"


def test_a_timed_out_request_is_504_and_its_pipeline_call_is_interrupted(make_app, engine, caplog):
    app = make_app(EngineClient(engine), request_timeout=0.5)

    async def scenario():
        async with http(app) as client:
            slow = await client.post("/v1/images/generations", json={"prompt": "slow", "num_inference_steps": 150})
            await asyncio.sleep(0.5)  # the worker notices at its next step
            app.state.serving.settings.request_timeout = 60
            follow = await client.post("/v1/images/generations", json={"prompt": "next", "num_inference_steps": 2})
            return slow, follow

    with caplog.at_level(logging.INFO, logger="hypergen"):
        slow, follow = run(scenario())
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
    assert follow.status_code == 200
    assert "interrupting a pipeline call" in caplog.text


def test_a_cancelled_request_id_does_not_poison_later_requests_that_send_it(make_app, engine):
    app = make_app(EngineClient(engine), request_timeout=0.5)
    headers = {"X-Request-ID": "my-id"}

    async def scenario():
        async with http(app) as client:
            slow = await client.post("/v1/images/generations", headers=headers, json={"prompt": "slow", "num_inference_steps": 150})
            await asyncio.sleep(0.5)
            app.state.serving.settings.request_timeout = 60
            again = await client.post("/v1/images/generations", headers=headers, json={"prompt": "again", "num_inference_steps": 2})
            return slow, again

    slow, again = run(scenario())
    assert slow.status_code == 504
    assert again.status_code == 200 and again.headers["x-request-id"] == "my-id" and len(again.json()["data"]) == 1


def test_sizes_beyond_the_models_limit_are_400_naming_the_largest_and_hints_are_accepted(make_app, engine):
    app = make_app(EngineClient(engine))

    async def scenario():
        async with http(app) as client:
            big = await client.post("/v1/images/generations", json={"prompt": "a", "size": "1024x1024"})
            odd = await client.post("/v1/images/generations", json={"prompt": "a", "size": "1000x3"})
            hint = odd.json()["error"]["message"].split("try '")[1].split("'")[0]
            hinted = await client.post("/v1/images/generations", json={"prompt": "a", "size": hint, "num_inference_steps": 1})
            return big, odd, hinted

    big, odd, hinted = run(scenario())
    assert big.status_code == 400 and big.json()["error"]["param"] == "size"
    assert "the largest is '128x128'" in big.json()["error"]["message"]
    assert odd.status_code == 400 and hinted.status_code == 200


def test_websocket_and_lora_routes_charge_the_same_budgets_as_http(make_app):
    from starlette.testclient import TestClient

    worker = ScriptedWorker()
    worker.release.set()
    app = make_app(worker, api_keys=["k1", "k2"], rate_limit="2/minute,4 images/minute")
    with TestClient(app) as client:
        k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
        assert client.post("/v1/images/generations", headers=k1, json={"prompt": "a"}).status_code == 200
        assert client.get("/v1/loras", headers=k1).status_code != 429  # the second request of k1
        with client.websocket_connect("/v1/images/ws", headers=k1) as socket:
            socket.send_json({"prompt": "a"})
            refused = socket.receive_json()
        assert refused["type"] == "error" and refused["error"]["code"] == "rate_limit_exceeded"
        assert client.get("/v1/loras", headers=k1).status_code == 429
        with client.websocket_connect("/v1/images/ws", headers=k2) as socket:
            socket.send_json({"prompt": "a", "n": 5})  # over the image budget on its own
            assert socket.receive_json()["error"]["type"] == "images"


def test_metrics_are_served_by_the_app_and_may_need_a_key(make_app):
    worker = ScriptedWorker()
    worker.release.set()
    open_app = make_app(worker)
    keyed_app = make_app(worker, api_keys=["k1"], metrics_auth=True)

    async def scenario():
        async with http(open_app) as client:
            await client.get("/v1/images/files/img_0123456789abcdef")
            public = await client.get("/metrics")
        async with http(keyed_app) as client:
            anonymous = await client.get("/metrics")
            keyed = await client.get("/metrics", headers={"Authorization": "Bearer k1"})
        return public, anonymous, keyed

    public, anonymous, keyed = run(scenario())
    assert public.status_code == 200 and "hypergen_requests_total" in public.text
    assert "img_0123456789abcdef" not in public.text  # labelled by route template, never the raw path
    assert anonymous.status_code == 401 and keyed.status_code == 200


def test_sizes_whose_one_step_outlasts_the_timeout_are_refused_by_the_measured_cost(make_app, engine):
    engine.run_batch([GenerationJob.warm_up(engine.status().models[0], 0)])  # as the pool's warm-up does
    measured = engine.status().models[0].native_step_s
    assert measured and measured > 0

    class SlowModel(ScriptedWorker):
        async def status(self):  # one native step takes 1 s; the request timeout is 3 s
            return WorkerStatus(ready=True, models=[TINY.model_copy(update={"native_step_s": 1.0, "max_side": 256})])

    worker = SlowModel()
    worker.release.set()
    app = make_app(worker, request_timeout=3)

    async def scenario():
        async with http(app) as client:
            big = await client.post("/v1/images/generations", json={"prompt": "a", "size": "256x256"})
            hint = big.json()["error"]["message"].split("fits is '")[1].split("'")[0]
            fits = await client.post("/v1/images/generations", json={"prompt": "a", "size": hint})
            return big, fits

    big, fits = run(scenario())
    assert big.status_code == 400 and big.json()["error"]["param"] == "size"
    assert "the largest square size that fits is '88x88'" in big.json()["error"]["message"]
    assert fits.status_code == 200

"""The video API in process: tiny random-weight Wan and LTX-Video pipelines behind the real app,
driven by the official client (`client.videos.*`) through an ASGI transport.

Each test runs one event loop (`run`) that starts the video runners, as the server does."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import openai
import pytest
from PIL import Image

from hypergen.api.pool import WorkerPool
from hypergen.api.serving import ImageServing
from hypergen.api.video_jobs import new_video_id
from hypergen.api.video_store import VideoDirectoryInUse, VideoStore
from hypergen.api.videos import VideoServing
from hypergen.clips import read_mp4
from hypergen.config import Settings

from .conftest import EngineClient, http, openai_client, run, start_engine, until_ready

STEPS = 2


def video_engine(tiny_sd_dir, video_dir, home):
    engine = start_engine(Settings(model=str(tiny_sd_dir), video_model=str(video_dir), home=home, loras=""), tiny_sd_dir)
    deadline = time.monotonic() + 120
    while engine.status().video is None:
        assert time.monotonic() < deadline and not engine.video.error, engine.status().video_detail
        time.sleep(0.05)
    return engine


@pytest.fixture(scope="session")
def wan_engine(tiny_sd_dir, tiny_wan_dir, tmp_path_factory):
    return video_engine(tiny_sd_dir, tiny_wan_dir, tmp_path_factory.mktemp("wan-home"))


@pytest.fixture(scope="session")
def animatediff_engine(tiny_sd_dir, tiny_animatediff_dir, tmp_path_factory):
    return video_engine(tiny_sd_dir, tiny_animatediff_dir, tmp_path_factory.mktemp("animatediff-home"))


@pytest.fixture(scope="session")
def ltx_engine(tiny_sd_dir, tiny_ltx_dir, tmp_path_factory):
    return video_engine(tiny_sd_dir, tiny_ltx_dir, tmp_path_factory.mktemp("ltx-home"))


@pytest.fixture
def video_app(tmp_path):
    """video_app(engine, **settings) → an app whose `start()` coroutine starts the video runners."""
    from hypergen.api.app import create_app
    from hypergen.api.auth import ApiKeyAuth

    def build(engine, home=None, **overrides):
        settings = Settings(
            **{
                "home": home or tmp_path,
                "model": str(engine.settings.model),
                "video_model": engine.settings.video_model,
                "loras": "",
                **overrides,
            }
        )
        app = create_app(10_000_000)
        app.state.auth = ApiKeyAuth(settings.api_key_list)
        pool = WorkerPool([EngineClient(engine)], ["hypergen-worker"], warm_up_calls=0)
        app.state.serving = ImageServing(settings, pool)
        app.state.videos = VideoServing(settings, pool, app.state.serving.readiness)
        return app

    return build


async def started(app):
    await until_ready(app.state.serving)
    app.state.videos.start()
    return app


def clip_of(content: bytes):
    info, frames = read_mp4(content)
    return info, frames


@pytest.mark.parametrize("family", ["wan", "ltx", "animatediff"])
def test_create_and_poll_then_download_an_mp4_of_the_asked_frames_and_size(family, request, video_app, validate_openai):
    engine = request.getfixturevalue(f"{family}_engine")
    app = video_app(engine)

    async def scenario():
        await started(app)
        client = openai_client(app)
        extra = {"num_frames": 9, "num_inference_steps": STEPS, "seed": 3}
        video = await client.videos.create_and_poll(prompt="a red circle moving right", size="64x32", extra_body=extra, poll_interval_ms=50)
        assert video.status == "completed", video.error
        assert (video.size, video.progress, video.model) == ("64x32", 100, engine.settings.served_video_model_name)
        raw = (await http(app).get(f"/v1/videos/{video.id}")).json()
        validate_openai("VideoResource", as_sora(raw))
        content = await client.videos.download_content(video.id)
        info, _ = clip_of(content.content)
        assert (info.frames, info.width, info.height) == (9, 64, 32)
        assert info.codec == "h264"
        thumbnail = Image.open(io.BytesIO((await client.videos.download_content(video.id, variant="thumbnail")).content))
        sheet = Image.open(io.BytesIO((await client.videos.download_content(video.id, variant="spritesheet")).content))
        assert (thumbnail.format, thumbnail.size) == ("WEBP", (64, 32))
        assert sheet.format == "JPEG" and sheet.size == (64 * 8, 32 * 2)
        return video

    video = run(scenario())
    assert video.seconds == {"wan": "0.562", "ltx": "0.36", "animatediff": "1.125"}[family]  # 9 frames at 16, 25 and 8 fps


def test_seconds_map_to_the_models_frame_rule_and_bad_values_name_their_field(wan_engine, video_app):
    app = video_app(wan_engine)

    async def scenario():
        await started(app)
        client = http(app)
        # 0.5 s at 16 fps = 8 frames: Wan makes 4k + 1, so 9.
        ok = await client.post("/v1/videos", json={"prompt": "a circle", "seconds": "0.5", "num_inference_steps": 1})
        assert ok.status_code == 200 and ok.json()["seconds"] == "0.562", ok.text
        cases = [
            ({"seconds": "5"}, "seconds", "up to 17 frames"),
            ({"seconds": "soon"}, "seconds", "positive number"),
            ({"size": "1000x1000"}, "size", "64x64"),
            ({"size": "40x40"}, "size", "multiples of 16"),
            ({"num_frames": 8}, "num_frames", "try 9"),
            ({"width": 64}, "height", "both"),
            ({"model": "sora-2"}, "model", engine_name(wan_engine)),
            ({"guidance_scale": 0}, "guidance_scale", "1.0 to 20.0"),
        ]
        for extra, param, hint in cases:
            response = await client.post("/v1/videos", json={"prompt": "a circle", **extra})
            error = response.json()["error"]
            assert response.status_code in (400, 404) and error["param"] == param and hint in error["message"], (extra, error)
        for unknown in ("video_nope", "video_" + "0" * 32, "..%2F..%2Fvideos.sqlite3"):
            missing = await client.get(f"/v1/videos/{unknown}/content")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", unknown

    run(scenario())


def engine_name(engine) -> str:
    return engine.settings.served_video_model_name


def as_sora(video: dict) -> dict:
    """OpenAI's schema lists only Sora's sizes and lengths: the one documented exception."""
    return {**video, "size": "720x1280", "seconds": "4"}


def test_delete_removes_the_record_and_files_and_list_pages(wan_engine, video_app, validate_openai):
    app = video_app(wan_engine)

    async def scenario():
        await started(app)
        client = openai_client(app)
        made = [
            await client.videos.create_and_poll(prompt=f"shape {i}", extra_body={"num_inference_steps": 1}, poll_interval_ms=50)
            for i in range(3)
        ]
        page = await client.videos.list(limit=2, order="asc")
        assert [v.id for v in page.data] == [made[0].id, made[1].id] and page.has_more
        after = await client.videos.list(limit=2, order="asc", after=made[1].id)
        assert [v.id for v in after.data] == [made[2].id] and not after.has_more
        listed = (await http(app).get("/v1/videos", params={"limit": 2})).json()
        validate_openai("VideoListResource", {**listed, "data": [as_sora(video) for video in listed["data"]]})
        raw_delete = await http(app).delete(f"/v1/videos/{made[0].id}")
        validate_openai("DeletedVideoResource", raw_delete.json())
        assert raw_delete.json() == {"id": made[0].id, "object": "video.deleted", "deleted": True}
        with pytest.raises(openai.NotFoundError):
            await client.videos.retrieve(made[0].id)
        with pytest.raises(openai.NotFoundError):
            await client.videos.download_content(made[0].id)
        assert not (app.state.videos.store.files_dir / made[0].id).exists()

    run(scenario())


def test_a_restarted_server_lists_completed_videos_and_fails_interrupted_ones(wan_engine, video_app, tmp_path):
    first = video_app(wan_engine, home=tmp_path)

    async def make_one():
        await started(first)
        return await openai_client(first).videos.create_and_poll(prompt="kept", extra_body={"num_inference_steps": 1}, poll_interval_ms=50)

    kept = run(make_one())
    store = first.state.videos.store
    interrupted = kept.model_copy(update={"id": new_video_id(), "status": "in_progress", "progress": 40})
    store.add(interrupted, store.job(kept.id), owner="")
    with pytest.raises(VideoDirectoryInUse):  # one server per video directory while it runs
        VideoStore(tmp_path / "videos" / "videos.sqlite3", tmp_path / "videos")
    store.close()  # the first server exits
    second = video_app(wan_engine, home=tmp_path)

    async def after_restart():
        await started(second)
        client = openai_client(second)
        listed = [video.id for video in (await client.videos.list()).data]
        assert kept.id in listed
        info, _ = clip_of((await client.videos.download_content(kept.id)).content)
        assert info.frames == 9
        failed = await client.videos.retrieve(interrupted.id)
        assert failed.status == "failed" and failed.error.code == "interrupted"

    run(after_restart())


def test_image_to_video_uses_the_reference_and_models_without_it_say_so(ltx_engine, wan_engine, video_app, tmp_path):
    reference = io.BytesIO()
    Image.new("RGB", (50, 40), (220, 30, 30)).save(reference, format="PNG")

    async def scenario(app, expect_ok):
        await started(app)
        client = openai_client(app)
        upload = ("first.png", reference.getvalue(), "image/png")
        if not expect_ok:
            with pytest.raises(openai.BadRequestError) as refused:
                await client.videos.create(prompt="move", input_reference=upload)
            assert refused.value.body["param"] == "input_reference"
            return
        video = await client.videos.create_and_poll(
            prompt="move", input_reference=upload, extra_body={"num_inference_steps": 1}, poll_interval_ms=50
        )
        assert video.status == "completed" and video.size == "32x32"
        data_url = "data:image/png;base64," + base64.b64encode(reference.getvalue()).decode()
        as_json = await http(app).post(
            "/v1/videos", json={"prompt": "move", "input_reference": {"image_url": data_url}, "num_inference_steps": 1}
        )
        assert as_json.status_code == 200, as_json.text
        fetched = await http(app).post(
            "/v1/videos", json={"prompt": "move", "input_reference": {"image_url": "http://169.254.169.254/x.png"}}
        )
        assert fetched.status_code == 400 and "fetches no URLs" in fetched.json()["error"]["message"]

    run(scenario(video_app(ltx_engine), expect_ok=True))
    run(scenario(video_app(wan_engine, home=tmp_path / "wan"), expect_ok=False))


def test_remix_reruns_the_job_with_the_new_prompt_and_the_same_seed(wan_engine, video_app):
    app = video_app(wan_engine)

    async def scenario():
        await started(app)
        client = openai_client(app)
        source = await client.videos.create_and_poll(
            prompt="a red circle", extra_body={"num_inference_steps": 1, "seed": 11}, poll_interval_ms=50
        )
        remix = await client.videos.remix(source.id, prompt="a blue square")
        assert remix.remixed_from_video_id == source.id and remix.prompt == "a blue square"
        done = await client.videos.poll(remix.id, poll_interval_ms=50)
        assert done.status == "completed"
        store = app.state.videos.store
        assert store.job(remix.id).seed == store.job(source.id).seed == 11

    run(scenario())


def test_keys_see_only_their_own_videos_and_frames_count_against_the_image_budget(wan_engine, video_app):
    app = video_app(wan_engine, api_keys="key-a,key-b", rate_limit="100/minute,12 images/minute")

    async def scenario():
        await started(app)
        a, b = openai_client(app, "key-a"), openai_client(app, "key-b")
        video = await a.videos.create(prompt="mine", extra_body={"num_inference_steps": 1})  # 9 frames of 12
        with pytest.raises(openai.NotFoundError):
            await b.videos.retrieve(video.id)
        with pytest.raises(openai.NotFoundError):
            await b.videos.delete(video.id)
        assert (await b.videos.list()).data == []
        with pytest.raises(openai.RateLimitError):
            await a.videos.create(prompt="again", extra_body={"num_inference_steps": 1})
        assert (await a.videos.retrieve(video.id)).id == video.id
        with pytest.raises(openai.AuthenticationError):
            await openai_client(app, "wrong").videos.list()

    run(scenario())


def test_a_full_video_queue_is_a_503_and_delete_cancels_a_rendering_job(wan_engine, video_app):
    app = video_app(wan_engine, max_video_queue=1)

    async def scenario():
        await started(app)
        client = http(app)
        slow = await client.post("/v1/videos", json={"prompt": "long", "num_inference_steps": 150, "num_frames": 17, "size": "64x64"})
        assert slow.status_code == 200
        refused = await client.post("/v1/videos", json={"prompt": "another"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"]
        video_id = slow.json()["id"]
        while (await client.get(f"/v1/videos/{video_id}")).json()["progress"] < 2:
            await asyncio.sleep(0.02)
        assert (await client.delete(f"/v1/videos/{video_id}")).status_code == 200
        for _ in range(200):  # the worker drops it at its next step
            if wan_engine.video.current is None:
                break
            await asyncio.sleep(0.02)
        assert wan_engine.video.current is None
        assert (await client.post("/v1/videos", json={"prompt": "room again", "num_inference_steps": 1})).status_code == 200

    run(scenario())


def test_an_image_request_during_a_long_video_waits_at_most_one_video_step(wan_engine, video_app, monkeypatch):
    """Images first: while an image call runs in the worker, the video advances at most the one
    step it was in when the call began."""
    app = video_app(wan_engine)
    seen: list[tuple[int, int]] = []
    run_batch = wan_engine.run_batch

    def observed(jobs, tickets=None):
        before = wan_engine.video.current.step if wan_engine.video.current else -1
        results = run_batch(jobs, tickets)
        seen.append((before, wan_engine.video.current.step if wan_engine.video.current else -1))
        return results

    monkeypatch.setattr(wan_engine, "run_batch", observed)

    async def scenario():
        await started(app)
        client = http(app)
        long = await client.post("/v1/videos", json={"prompt": "long", "num_inference_steps": 150, "num_frames": 17, "size": "64x64"})
        video_id = long.json()["id"]
        while wan_engine.video.current is None or wan_engine.video.current.step < 2:
            await asyncio.sleep(0.02)
        image = await client.post("/v1/images/generations", json={"prompt": "a square", "size": "64x64", "num_inference_steps": 20})
        assert image.status_code == 200 and len(image.json()["data"]) == 1
        assert (await client.get(f"/v1/videos/{video_id}")).json()["status"] == "in_progress"
        await client.delete(f"/v1/videos/{video_id}")

    run(scenario())
    ((before, after),) = seen
    assert before >= 2 and after - before <= 1, f"the video ran {after - before} steps during the image call"


def test_sync_route_returns_the_mp4_and_the_websocket_shows_progress(wan_engine, video_app):
    app = video_app(wan_engine)

    async def scenario():
        await started(app)
        response = await http(app).post("/v1/videos/sync", json={"prompt": "now", "num_inference_steps": 2})
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        assert clip_of(response.content)[0].frames == 9
        assert response.headers["x-video-id"].startswith("video_")

    run(scenario())

    from starlette.testclient import TestClient

    with TestClient(app) as client:
        client.portal.call(started, app)
        with client.websocket_connect("/v1/videos/ws") as socket:
            socket.send_text(json.dumps({"prompt": "watch", "num_inference_steps": 3}))
            states = []
            while True:
                message = socket.receive_json()
                states.append(message["video"]["status"])
                if states[-1] in ("completed", "failed"):
                    break
        assert states[0] == "queued" and "in_progress" in states and states[-1] == "completed"
        with client.websocket_connect("/v1/videos/ws") as socket:
            socket.send_text(json.dumps({"prompt": "watch", "seconds": "99"}))
            error = socket.receive_json()
            assert error["type"] == "error" and error["error"]["param"] == "seconds"

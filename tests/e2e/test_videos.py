"""Video jobs through `bentoml serve` and the official client: a tiny Wan pipeline renders,
the MP4 reads back, a restarted server still has the video, and a job whose worker is killed
ends `failed`."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest
from openai import OpenAI

from hypergen.clips import read_mp4

from .test_faults import worker_process

pytestmark = pytest.mark.e2e


def video_ready(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.json().get("video", {}).get("ready") is True


def test_videos_render_survive_a_restart_and_fail_when_their_worker_dies(start_server, tiny_sd_dir, tiny_wan_dir, tmp_path):
    env = {"HYPERGEN_MODEL": str(tiny_sd_dir), "HYPERGEN_VIDEO_MODEL": str(tiny_wan_dir), "HYPERGEN_VIDEO_DIR": str(tmp_path / "videos")}
    server = start_server(env)
    server.wait_until(video_ready)
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="anything", max_retries=0)

    video = client.videos.create_and_poll(
        prompt="a red circle", size="64x32", extra_body={"num_frames": 13, "num_inference_steps": 2}, poll_interval_ms=100
    )
    assert video.status == "completed" and (video.size, video.seconds) == ("64x32", "0.812")
    info, _ = read_mp4(client.videos.download_content(video.id).content)
    assert (info.frames, info.width, info.height, info.fps) == (13, 64, 32, 16.0)
    for bad, param in (({"seconds": "12"}, "seconds"), ({"size": "1280x720"}, "size")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.videos.create(prompt="too much", **bad)
        assert refused.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_" + "f" * 32)
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert 'hypergen_video_jobs_total{status="completed"} 1.0' in metrics and "hypergen_video_frames_total 13.0" in metrics

    # A job in progress when its worker is killed ends failed; the worker comes back.
    long = client.videos.create(prompt="long", size="64x64", extra_body={"num_frames": 17, "num_inference_steps": 150})
    deadline = time.monotonic() + 60
    while client.videos.retrieve(long.id).progress < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(worker_process(server).pid, signal.SIGKILL)
    failed = client.videos.poll(long.id, poll_interval_ms=100)
    assert failed.status == "failed" and failed.error.code == "worker_failed"
    server.stop()

    again = start_server(env)
    again.wait_until(video_ready)
    client = OpenAI(base_url=f"{again.base_url}/v1", api_key="anything", max_retries=0)
    listed = {item.id: item.status for item in client.videos.list()}
    assert listed == {video.id: "completed", long.id: "failed"}
    info, _ = read_mp4(client.videos.download_content(video.id).content)
    assert info.frames == 13
    client.videos.delete(video.id)
    assert httpx.get(f"{again.base_url}/v1/videos/{video.id}").status_code == 404

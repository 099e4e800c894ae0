"""Video pieces without a server: MP4 files, frame rules, request mapping, the job store and the
demo video model's judge."""

from __future__ import annotations

import io
import random
import time

import pytest
from PIL import Image
from pydantic import ValidationError

from hypergen.api.video_jobs import build_video_job, resolve_frames
from hypergen.api.video_store import VideoStore
from hypergen.clips import encode_mp4, read_mp4, spritesheet_jpeg, thumbnail_webp
from hypergen.errors import OpenAIError
from hypergen.protocol import VideoLimits
from hypergen.video_protocol import VideoCreateRequest, VideoJob, VideoJobError, VideoResource
from training.motion import DIRECTIONS, MovingScene, draw_clip, held_out_clips, judge_clip

WAN = VideoLimits(id="wan", native_width=32, native_height=32, max_side=64, fps=16, default_frames=9, max_frames=17, frame_step=4,
                  frame_offset=1, size_multiple=16, modes=["text-to-video"])  # fmt: skip


def frames(count: int, size=(48, 32)) -> list[Image.Image]:
    return [Image.new("RGB", size, (10 * index, 200 - 10 * index, 90)) for index in range(count)]


def test_an_mp4_reads_back_with_its_frames_size_rate_and_h264():
    info, decoded = read_mp4(encode_mp4(frames(12), fps=8))
    assert (info.frames, info.width, info.height, info.fps, info.codec) == (12, 48, 32, 8.0, "h264")
    assert abs(decoded[5].getpixel((10, 10))[0] - 50) <= 6  # colours survive the encoder


def test_odd_sides_are_padded_to_even_for_yuv420():
    info, _ = read_mp4(encode_mp4(frames(3, size=(33, 17)), fps=4))
    assert (info.width, info.height) == (34, 18)


def test_thumbnail_is_the_first_frame_and_the_spritesheet_tiles_every_frame():
    clip = frames(10)
    thumbnail = Image.open(io.BytesIO(thumbnail_webp(clip)))
    sheet = Image.open(io.BytesIO(spritesheet_jpeg(clip)))
    assert thumbnail.format == "WEBP" and thumbnail.size == (48, 32)
    assert sheet.format == "JPEG" and sheet.size == (48 * 8, 32 * 2)


def test_frame_rules_and_their_messages():
    assert [WAN.valid_frames(count) for count in (1, 5, 8, 9, 17, 21)] == [True, True, False, True, True, False]
    assert (WAN.nearest_frames(8), WAN.nearest_frames(64), WAN.nearest_frames(0.2)) == (9, 17, 1)
    assert WAN.allowed_frames() == "1 + a multiple of 4 frames, up to 17"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({}, 9), ({"seconds": "0.5"}, 9), ({"seconds": "1"}, 17), ({"num_frames": 13}, 13), ({"seconds": "0.1"}, 1)],
)
def test_seconds_and_num_frames_become_a_frame_count_the_model_makes(fields, expected):
    assert resolve_frames(VideoCreateRequest(prompt="p", **fields), WAN, WAN.fps) == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"seconds": "2"}, "seconds"), ({"num_frames": 10}, "num_frames"), ({"size": "48x48"}, "size"), ({"height": 32}, "width")],
)
def test_what_a_model_cannot_make_is_a_400_naming_the_field(fields, param):
    with pytest.raises(OpenAIError) as error:
        build_video_job(VideoCreateRequest(prompt="p", **fields), WAN, "req")
    assert error.value.status_code == 400 and error.value.param == param


@pytest.mark.parametrize("seconds", ["0", "-1", "abc", "1e3", True])
def test_seconds_must_be_a_positive_number(seconds):
    with pytest.raises(ValidationError):
        VideoCreateRequest(prompt="p", seconds=seconds)


def test_a_reference_image_needs_an_image_to_video_model():
    with pytest.raises(OpenAIError) as error:
        build_video_job(VideoCreateRequest(prompt="p"), WAN, "req", reference=Image.new("RGB", (32, 32)))
    assert error.value.param == "input_reference"


def record(store: VideoStore, video_id: str, owner: str = "", status: str = "queued", expires_at: int | None = None) -> VideoResource:
    resource = VideoResource(
        id=video_id, model="wan", status=status, created_at=int(time.time()), size="32x32", seconds="1", expires_at=expires_at
    )
    job = VideoJob(
        request_id="r", model="wan", prompt="p", width=32, height=32, num_frames=9, fps=16, num_inference_steps=1, guidance_scale=5, seed=1
    )
    store.add(resource, job, owner)
    return resource


def test_the_store_pages_by_owner_recovers_after_a_restart_and_expires(tmp_path):
    store = VideoStore(tmp_path / "db.sqlite3", tmp_path / "files")
    for index in range(3):
        record(store, f"video_{index}")
    record(store, "video_theirs", owner="key:b")
    record(store, "video_rendering", status="in_progress")
    page, more = store.page("", limit=2, order="asc", after=None)
    assert [video.id for video in page] == ["video_0", "video_1"] and more
    assert store.get("video_theirs", "") is None and store.get("video_theirs", "key:b") is not None
    store.close()

    store = VideoStore(tmp_path / "db.sqlite3", tmp_path / "files")  # the next server
    queued = store.recover(VideoJobError(code="interrupted", message="stopped"))
    assert queued == ["video_0", "video_1", "video_2", "video_theirs"]
    assert store.get("video_rendering", "").error.code == "interrupted"

    done = record(store, "video_done", status="completed", expires_at=int(time.time()) + 60)
    store.write_files(done.id, {"video": b"mp4", "thumbnail": b"webp", "spritesheet": b"jpg"})
    assert store.file(done.id, "video")[1] == "video/mp4"
    assert store.expire(now=time.time() + 61) == 1
    assert store.get(done.id, "") is None and not (tmp_path / "files" / done.id).exists()


def test_the_judge_reads_drawn_clips_directions_and_colours():
    pairs = held_out_clips(24)
    assert {moving.direction for moving, _ in pairs} == set(DIRECTIONS)
    for moving, seed in pairs:
        assert all(judge_clip(draw_clip(moving, random.Random(seed))).score(moving).values()), moving


def test_the_judge_calls_a_still_clip_no_direction():
    moving = MovingScene(held_out_clips(1)[0][0].scene, "left")
    still = [draw_clip(moving, random.Random(1))[0]] * 8
    assert judge_clip(still).direction is None

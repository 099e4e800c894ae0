"""Video files: frames to an MP4 (H.264 through PyAV's bundled FFmpeg, no system ffmpeg), the
`thumbnail` and `spritesheet` variants OpenAI's video content endpoint serves, and reading an
MP4 back (what a client checks). Pure functions of their inputs; torch-free, so both the worker
(which encodes) and the API and tests (which read) may use them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

# H.264 via libx264 where PyAV's FFmpeg has it (its wheels do), else MPEG-4 part 2.
PREFERRED_CODECS = ("libx264", "h264", "mpeg4")
# Constant quality: visually lossless for flat synthetic pictures, small files for real ones.
X264_CRF = "18"
SPRITESHEET_COLUMNS = 8
SPRITE_MAX_SIDE = 256  # spritesheet tiles are scaled down to this
VIDEO_MEDIA_TYPES = {"video": "video/mp4", "thumbnail": "image/webp", "spritesheet": "image/jpeg"}


def to_pictures(frames: np.ndarray | Sequence[Image.Image]) -> list[Image.Image]:
    """RGB pictures from PIL images or an array (F, H, W, 3) of floats in [0, 1] or uint8."""
    if isinstance(frames, np.ndarray):
        array = frames if frames.dtype == np.uint8 else (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
        return [Image.fromarray(frame).convert("RGB") for frame in array]
    return [frame.convert("RGB") for frame in frames]


def _codec_name() -> str:
    import av

    available = av.codecs_available
    return next(name for name in PREFERRED_CODECS if name in available)


def encode_mp4(frames: Sequence[Image.Image], fps: int) -> bytes:
    """An MP4 of `frames` at `fps` (sides are even: yuv420p needs it; odd ones are padded)."""
    import av

    width, height = frames[0].size
    even = (width + width % 2, height + height % 2)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        codec = _codec_name()
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = even[0], even[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": X264_CRF, "preset": "medium"}
        for frame in frames:
            if frame.size != even:
                padded = Image.new("RGB", even)
                padded.paste(frame)
                frame = padded
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def thumbnail_webp(frames: Sequence[Image.Image]) -> bytes:
    """The first frame as WebP (what OpenAI's `thumbnail` variant is)."""
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", quality=90)
    return buffer.getvalue()


def spritesheet_jpeg(frames: Sequence[Image.Image], columns: int = SPRITESHEET_COLUMNS) -> bytes:
    """Every frame, left to right and top to bottom, `columns` to a row, as one JPEG."""
    width, height = frames[0].size
    scale = min(1.0, SPRITE_MAX_SIDE / max(width, height))
    tile = (max(1, round(width * scale)), max(1, round(height * scale)))
    columns = min(columns, len(frames))
    rows = math.ceil(len(frames) / columns)
    sheet = Image.new("RGB", (tile[0] * columns, tile[1] * rows))
    for index, frame in enumerate(frames):
        sheet.paste(frame.resize(tile), ((index % columns) * tile[0], (index // columns) * tile[1]))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@dataclass(frozen=True)
class ClipInfo:
    frames: int
    width: int
    height: int
    fps: float
    codec: str


def read_mp4(data: bytes) -> tuple[ClipInfo, list[Image.Image]]:
    """Decode an MP4: what it is and its frames."""
    import av

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        pictures = [frame.to_image() for frame in container.decode(stream)]
        rate = stream.average_rate or stream.base_rate or 0
        info = ClipInfo(len(pictures), stream.codec_context.width, stream.codec_context.height, float(rate), stream.codec_context.name)
    return info, pictures

"""Images on the wire, base64-encoded (pure: PIL in, bytes out, and back). Both processes use
it: the worker encodes what it draws, the API hands uploads to the worker as PNG."""

from __future__ import annotations

import base64
import io

from PIL import Image

from .protocol import OutputFormat

MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# zlib level 1: for generated images a few % larger than level 6 and several times faster;
# encoding sits on every request's critical path.
PNG_COMPRESS_LEVEL = 1


def encode_image(image: Image.Image, output_format: OutputFormat = "png", compression: int = 100) -> bytes:
    """Encode one image. `compression` follows OpenAI's `output_compression` (0–100, jpeg/webp
    quality; 100 = best quality); PNG is lossless and ignores it."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=max(1, min(compression, 100)))
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=max(0, min(compression, 100)), method=0)
    else:
        raise ValueError(f"unsupported output_format '{output_format}'; allowed: png, jpeg, webp")
    return buffer.getvalue()


def encode_image_b64(image: Image.Image, output_format: OutputFormat = "png", compression: int = 100) -> str:
    return base64.b64encode(encode_image(image, output_format, compression)).decode("ascii")


def decode_image_b64(data: str) -> Image.Image:
    """An image the other process encoded (fully loaded)."""
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image

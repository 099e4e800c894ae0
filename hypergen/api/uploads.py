"""Uploaded images for edits and variations: read from the multipart form, checked, decoded and
fitted (bytes in, PIL out).

- Formats: PNG, JPEG, WebP. Anything else is a 400 naming the field.
- Bombs: the pixel count is read from the header and checked before any pixel is decoded.
- EXIF orientation is applied; an image with alpha is composited onto white.
- Masks follow OpenAI's convention: fully transparent pixels mark where to edit, so a mask must
  have an alpha channel and the image's size. For diffusers, "edit here" becomes white.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from ..errors import OpenAIError, invalid_value

ACCEPTED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
DEFAULT_MAX_PIXELS = 4096 * 4096
MAX_FORM_FILES = 20
MAX_FORM_FIELDS = 100


@dataclass
class FittedUpload:
    """The init image (RGB) and optional mask (L, white = repaint), both at the target size."""

    image: Image.Image
    mask: Image.Image | None


def open_upload(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one uploaded file, refusing non-images, other formats and oversized pixel counts."""
    if not data:
        raise invalid_value(field, f"'{field}' is empty; upload a PNG, JPEG or WebP image.")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise invalid_value(field, f"'{field}' has more pixels than the limit of {max_pixels} pixels.") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise invalid_value(field, f"'{field}' is not an image; upload a PNG, JPEG or WebP image.") from None
    if image.format not in ACCEPTED_FORMATS:
        raise invalid_value(field, f"'{field}' is a {image.format} image; upload a PNG, JPEG or WebP image.")
    width, height = image.size
    if width * height > max_pixels:
        raise invalid_value(
            field,
            f"'{field}' is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels.",
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise invalid_value(field, f"'{field}' could not be decoded ({type(error).__name__}).") from None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent areas become white (as on a page), not whatever colour hides under alpha."""
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def mask_from_alpha(mask: Image.Image) -> Image.Image:
    """OpenAI mask (transparent = edit) → diffusers mask (L, 255 = repaint)."""
    if not has_alpha(mask):
        raise invalid_value(
            "mask",
            "'mask' has no alpha channel; send a PNG whose fully transparent pixels mark where to edit.",
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return ImageOps.invert(alpha)


def default_size(width: int, height: int, max_side: int, min_side: int, multiple: int = 8) -> tuple[int, int]:
    """The input's size, scaled down to fit `max_side` (aspect kept), rounded to multiples of
    `multiple` (8, or the model's coarser grid) within the model's limits."""
    step = max(8, multiple)
    low, high = -(-min_side // step) * step, max_side // step * step
    scale = min(1.0, max_side / max(width, height))
    return tuple(max(low, min(high, int(round(side * scale / step)) * step)) for side in (width, height))  # type: ignore[return-value]


def fit_upload(image: Image.Image, mask: Image.Image | None, size: tuple[int, int]) -> FittedUpload:
    """Resize and centre-crop the image (and mask, identically) to cover `size` exactly."""
    if mask is not None and mask.size != image.size:
        raise invalid_value(
            "mask",
            f"'mask' is {mask.size[0]}x{mask.size[1]} but 'image' is {image.size[0]}x{image.size[1]}; they must match.",
        )
    fitted_image = ImageOps.fit(to_rgb(image), size, method=Image.Resampling.LANCZOS)
    fitted_mask = None
    if mask is not None:
        fitted_mask = ImageOps.fit(mask_from_alpha(mask), size, method=Image.Resampling.NEAREST)
    return FittedUpload(fitted_image, fitted_mask)


async def read_multipart(request: Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """Form fields and uploaded files (`image[]` is read as `image`) of a multipart request."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise OpenAIError(400, "Send this request as multipart/form-data with the image as a file.", code="invalid_content_type")
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except Exception as error:  # malformed multipart, too many parts
        raise OpenAIError(400, f"The multipart body could not be read: {error}.", code="invalid_multipart") from None
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    for key, value in form.multi_items():
        name = key[:-2] if key.endswith("[]") else key
        if isinstance(value, UploadFile):
            files.setdefault(name, []).append(await value.read())
        else:
            fields[name] = value
    return fields, files


def single_file(files: dict[str, list[bytes]], field: str, required: bool = True) -> bytes | None:
    """The one file sent as `field` (or `field[]`): a missing required file or several are a 400."""
    sent = files.get(field, [])
    if not sent:
        if required:
            raise OpenAIError(400, f"Missing required parameter: '{field}' (a file).", param=field, code="missing_required_parameter")
        return None
    if len(sent) > 1:
        raise OpenAIError(400, f"Send exactly one '{field}'; got {len(sent)}.", param=field, code="invalid_value")
    return sent[0]

"""Edits and variations with the official client against `bentoml serve` (embedded default model)."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.e2e


def png_file(image: Image.Image, name: str = "image.png") -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return name, buffer.getvalue(), "image/png"


def scene() -> Image.Image:
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    image.paste((220, 30, 30), (8, 16, 28, 48))
    return image


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"), dtype=np.int16)


def test_edit_without_mask_keeps_layout_at_low_strength_and_is_reproducible(client):
    source = np.asarray(scene(), dtype=np.int16)

    def edit(strength):
        response = client.images.edit(
            image=png_file(scene()), prompt="a yellow star", size="64x64", response_format="b64_json",
            extra_body={"strength": strength, "num_inference_steps": 10, "seed": 21},
        )  # fmt: skip
        return pixels(response.data[0])

    gentle, again, full = edit(0.1), edit(0.1), edit(1.0)
    assert np.array_equal(gentle, again)
    assert np.abs(gentle - source).mean() < 25 < np.abs(full - source).mean()


def test_inpainting_leaves_pixels_outside_the_mask_untouched(client):
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 64))
    response = client.images.edit(
        image=png_file(scene()), mask=png_file(mask, "mask.png"), prompt="a moon", response_format="b64_json",
        extra_body={"num_inference_steps": 6, "seed": 2},
    )  # fmt: skip
    difference = np.abs(pixels(response.data[0]) - np.asarray(scene(), dtype=np.int16))
    assert difference[:, :32].max() == 0 and difference[:, 32:].mean() > 20


def test_variations_and_upload_errors(client):
    response = client.images.create_variation(
        image=png_file(scene()), n=3, size="64x64", response_format="b64_json", extra_body={"num_inference_steps": 4}
    )
    assert [pixels(item).shape for item in response.data] == [(64, 64, 3)] * 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.create_variation(image=("x.png", b"GIF89a not really", "image/png"))
    assert caught.value.body["param"] == "image"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=png_file(scene()), mask=png_file(Image.new("RGBA", (32, 32)), "m.png"), prompt="x")
    assert caught.value.body["param"] == "mask"

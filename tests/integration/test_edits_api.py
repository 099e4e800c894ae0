"""Edits (image-to-image, inpainting) and variations through the in-process app and a real engine."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from .conftest import EngineClient, http, openai_client, run, start_engine


def png(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def scene(size=(64, 64)) -> Image.Image:
    """A blue field with a red square on the left."""
    image = Image.new("RGB", size, (30, 60, 200))
    image.paste((220, 30, 30), (8, 16, 28, 48))
    return image


def right_half_mask(size=(64, 64)) -> Image.Image:
    """OpenAI mask: opaque on the left (keep), fully transparent on the right (edit)."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (size[0] // 2, 0, size[0], size[1]))
    return mask


def decode(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"), dtype=np.int16)


@pytest.fixture
def client(make_app, engine):
    return openai_client(make_app(EngineClient(engine)))


def test_edit_without_mask_keeps_the_layout_at_low_strength(client):
    source = np.asarray(scene(), dtype=np.int16)

    def edit(strength):
        response = run(
            client.images.edit(
                image=("scene.png", png(scene()), "image/png"),
                prompt="a green circle",
                response_format="b64_json",
                extra_body={"strength": strength, "num_inference_steps": 10, "seed": 3},
            )  # fmt: skip
        )
        return decode(response.data[0])

    # The tiny model's UNet is random: at strength 0.1 (one of ten steps) what comes back is the
    # autoencoder's round trip of the scene (~15/255 off); at 1.0 the scene is gone.
    gentle, full = edit(0.1), edit(1.0)
    assert gentle.shape == (64, 64, 3)
    gentle_diff, full_diff = np.abs(gentle - source).mean(), np.abs(full - source).mean()
    assert 0 < gentle_diff < 25, gentle_diff  # changed, but the red square on blue is still there
    assert full_diff > gentle_diff + 40, (gentle_diff, full_diff)


def test_edit_with_mask_changes_only_the_transparent_area(client):
    source = np.asarray(scene(), dtype=np.int16)
    response = run(
        client.images.edit(
            image=("scene.png", png(scene()), "image/png"),
            mask=("mask.png", png(right_half_mask()), "image/png"),
            prompt="stars",
            n=2,
            response_format="b64_json",
            extra_body={"num_inference_steps": 6, "seed": 1},
        )  # fmt: skip
    )
    assert len(response.data) == 2
    for item in response.data:
        result = decode(item)
        kept, edited = np.abs(result - source)[:, :32], np.abs(result - source)[:, 32:]
        assert kept.mean() == 0  # outside the mask: exactly the pixels sent
        assert edited.mean() > 20


def test_variations_return_n_images_of_the_requested_size_and_respect_seeds(client):
    def vary(seed, n=2, size="64x64"):
        return run(
            client.images.create_variation(
                image=("scene.png", png(scene((96, 80))), "image/png"),
                n=n,
                size=size,
                response_format="b64_json",
                extra_body={"seed": seed, "num_inference_steps": 5},
            )  # fmt: skip
        )

    first, again = vary(5), vary(5)
    assert [decode(item).shape for item in first.data] == [(64, 64, 3), (64, 64, 3)]
    assert all(np.array_equal(decode(a), decode(b)) for a, b in zip(first.data, again.data))
    assert np.abs(decode(first.data[0]) - decode(first.data[1])).mean() > 1
    kept_size = run(
        client.images.create_variation(
            image=("s.png", png(scene((96, 80))), "image/png"), response_format="b64_json", extra_body={"num_inference_steps": 2}
        )
    )
    assert decode(kept_size.data[0]).shape == (80, 96, 3)  # no size: the input's, rounded to 8


def huge_png() -> bytes:
    """A 20000×20000 PNG of a few hundred KB: refused from its header, never decoded."""
    return png(Image.new("1", (20000, 20000)))


@pytest.mark.parametrize(
    "files, param, fragment",
    [
        ({"image": ("x.png", b"not an image", "image/png")}, "image", "not an image"),
        ({"image": ("x.gif", png(scene(), "GIF"), "image/gif")}, "image", "GIF"),
        ({"image": ("x.png", huge_png(), "image/png")}, "image", "pixels"),
        ({"image": ("x.png", png(scene()), "image/png"), "mask": ("m.jpg", png(scene(), "JPEG"), "image/jpeg")}, "mask", "alpha"),
        (
            {"image": ("x.png", png(scene()), "image/png"), "mask": ("m.png", png(right_half_mask((32, 32))), "image/png")},
            "mask",
            "must match",
        ),
        ({"n": (None, "1")}, "image", "Missing required parameter"),
    ],
)
def test_bad_uploads_are_400_naming_the_field(make_app, engine, files, param, fragment):
    app = make_app(EngineClient(engine))

    async def scenario():
        async with http(app) as client:
            return await client.post("/v1/images/edits", data={"prompt": "x"}, files=files)

    response = run(scenario())
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]


def test_oversized_uploads_are_413_and_json_bodies_are_refused(make_app, engine):
    app = make_app(EngineClient(engine), max_body_bytes=50_000)

    async def scenario():
        async with http(app) as client:
            noise = Image.frombytes("RGB", (200, 200), np.random.default_rng(0).integers(0, 255, 120000, dtype=np.uint8).tobytes())
            big = await client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("n.png", png(noise), "image/png")})
            as_json = await client.post("/v1/images/edits", json={"prompt": "x"})
            return big, as_json

    big, as_json = run(scenario())
    assert big.status_code == 413
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]


def test_edit_parameters_are_validated_like_generations(client):
    async def attempt(**extra):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.edit(image=("s.png", png(scene()), "image/png"), prompt="x", extra_body=extra)
        return caught.value.body["param"]

    assert run(attempt(strength=1.5)) == "strength"
    assert run(attempt(n=11)) == "n"
    assert run(attempt(strength=0.01, num_inference_steps=10)) == "strength"  # no denoising step left
    assert run(attempt(size="100x100")) == "size"


def test_edit_pipelines_share_the_loaded_weights(engine):
    modes = engine.models.default.modes
    assert set(modes) == {"text-to-image", "image-to-image", "inpainting"}
    base = modes["text-to-image"]
    for derived in (modes["image-to-image"], modes["inpainting"]):
        for name in ("unet", "vae", "text_encoder"):
            assert getattr(derived, name) is getattr(base, name)
    assert engine.status().models[0].modes == ["text-to-image", "image-to-image", "inpainting"]


def test_a_dedicated_inpainting_checkpoint_is_used_for_masks(tiny_sd_dir, tmp_path):
    from hypergen.config import Settings
    from hypergen.protocol import GenerationJob, LoraChoice
    from hypergen.testing import save_tiny_pipeline

    inpainting_dir = save_tiny_pipeline(tmp_path / "tiny-inpainting", kind="sd-inpainting", seed=3)
    engine = start_engine(Settings(model=str(tiny_sd_dir), home=tmp_path, inpaint_model=str(inpainting_dir)), tiny_sd_dir)
    inpainting = engine.models.default.modes["inpainting"]
    assert inpainting.unet.config.in_channels == 9 and inpainting.unet is not engine.models.default.pipe.unet
    from hypergen.api.uploads import mask_from_alpha
    from hypergen.codec import encode_image_b64 as to_png_b64

    job = GenerationJob(
        request_id="i", model="m", prompt="moon", width=64, height=64, num_inference_steps=4, guidance_scale=7.5,
        seeds=[1], mode="inpainting", strength=1.0, image_b64=to_png_b64(scene()),
        mask_b64=to_png_b64(mask_from_alpha(right_half_mask())), admitted_at=0.0,
    )  # fmt: skip
    result = engine.run_batch([job])[0]
    assert result.error is None
    output = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.images_b64[0]))).convert("RGB"), dtype=np.int16)
    difference = np.abs(output - np.asarray(scene(), dtype=np.int16))
    assert difference[:, :32].max() == 0 and difference[:, 32:].mean() > 20
    with_lora = engine.run_batch([job.model_copy(update={"loras": [LoraChoice(path="any")]})])[0]
    assert with_lora.error.status == 400 and with_lora.error.param == "lora_path"


@pytest.mark.parametrize("route, field", [("/v1/images/edits", "image"), ("/v1/images/edits", "mask"), ("/v1/images/variations", "image")])
def test_several_files_for_one_field_are_400(make_app, engine, route, field):
    app = make_app(EngineClient(engine))
    upload = ("x.png", png(scene()), "image/png")
    files = [("image[]", upload)] + ([("image[]", upload)] if field == "image" else [("mask", upload), ("mask", upload)])

    async def scenario():
        async with http(app) as client:
            return await client.post(route, data={"prompt": "x"}, files=files)

    response = run(scenario())
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field and "exactly one" in response.json()["error"]["message"]

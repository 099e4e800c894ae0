"""Instruction-edit models on /v1/images/edits: a model made to edit an image as its prompt
instructs ("make the sky purple") is called with the upload as its reference image, not run as
image-to-image.

FLUX.1 Kontext is a tiny random-weight `FluxKontextPipeline` (the tiny FLUX.1-dev's components,
`hypergen.testing.families`), saved with `save_pretrained` and loaded through the normal path.
Qwen-Image-Edit has no tiny version here: its pipeline needs a `Qwen2VLProcessor`, which
transformers 5 cannot build without torchvision (a CPU build of it is not installable here);
what the API does for a model that only edits is checked with a scripted worker reporting its modes.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time

import numpy as np
import openai
import pytest
from PIL import Image, ImageOps

from hypergen.codec import encode_image_b64
from hypergen.config import Settings
from hypergen.protocol import GenerationJob, GenerationResult, LoraReply, ModelLimits, WorkerStatus
from hypergen.testing.families import save_tiny_family

from .conftest import EngineClient, http, openai_client, run, start_engine

KONTEXT = "flux-kontext"
STEPS = 6


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    return save_tiny_family(KONTEXT, tmp_path_factory.mktemp("instruction-edit") / KONTEXT, seed=1)


@pytest.fixture(scope="module")
def engine(kontext_dir, tmp_path_factory):
    settings = Settings(models=f"{KONTEXT}={kontext_dir}", loras="", home=tmp_path_factory.mktemp("instruction-edit-home"))
    return start_engine(settings, kontext_dir)


@pytest.fixture
def client(make_app, engine):
    return openai_client(make_app(EngineClient(engine), model_name=KONTEXT))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene(size=(96, 64)) -> Image.Image:
    """A blue field with a red square on the left."""
    picture = Image.new("RGB", size, (30, 60, 200))
    picture.paste((220, 30, 30), (8, 16, 28, 48))
    return picture


def right_half_mask(size=(96, 64)) -> Image.Image:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (size[0] // 2, 0, size[0], size[1]))
    return mask


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def differ(a, b) -> float:
    return float(np.abs(a - b).mean())


def edit(client, source, prompt="make the square green", seed=3, n=1, mask=None, **extra):
    files = {"mask": ("mask.png", png(mask), "image/png")} if mask is not None else {}
    response = run(
        client.images.edit(
            model=KONTEXT, image=("scene.png", png(source), "image/png"), prompt=prompt, n=n, response_format="b64_json",
            extra_body={"num_inference_steps": STEPS, "seed": seed, **extra}, **files,
        )
    )  # fmt: skip
    return [pixels(item.b64_json) for item in response.data]


def edit_job(request_id, source, seeds, prompt="make the square green"):
    return GenerationJob(
        request_id=request_id, model=KONTEXT, prompt=prompt, width=source.width, height=source.height, num_inference_steps=STEPS,
        guidance_scale=2.5, seeds=list(seeds), mode="instruction-edit", image_b64=encode_image_b64(source), admitted_at=time.time(),
    )  # fmt: skip


# --- FLUX.1 Kontext ---------------------------------------------------------------------------------


def test_kontext_lists_its_modes_and_shares_its_weights(engine, client):
    """/v1/models says what works: text-to-image, the instruction edit, inpainting (its masked
    variant, `FluxKontextInpaintPipeline`, on the same tensors); no strength-based image-to-image."""
    card = run(client.models.retrieve(KONTEXT))
    assert card.modes == ["text-to-image", "instruction-edit", "inpainting"]
    modes = engine.models.get(KONTEXT)[0].modes
    assert type(modes["instruction-edit"]).__name__ == "FluxKontextPipeline" and modes["instruction-edit"] is modes["text-to-image"]
    assert type(modes["inpainting"]).__name__ == "FluxKontextInpaintPipeline"
    assert modes["inpainting"].transformer is modes["instruction-edit"].transformer


def test_an_edit_is_kontexts_own_call_with_the_upload_as_its_reference(engine, client):
    """The served image is what `FluxKontextPipeline` makes of the upload and the instruction, at
    the upload's size (not Kontext's default 1024² area); another upload gives another image."""
    import torch

    served = edit(client, scene())[0]
    assert served.shape == (64, 96, 3)
    pipe = engine.models.get(KONTEXT)[0].pipe
    own = pipe(
        prompt=["make the square green"], image=[scene()], width=96, height=64, max_area=96 * 64, _auto_resize=False,
        num_inference_steps=STEPS, guidance_scale=2.5, generator=[torch.Generator().manual_seed(3)],
    ).images[0]  # fmt: skip
    assert differ(served, np.asarray(own, dtype=np.int16)) <= 1.0
    inverted = edit(client, ImageOps.invert(scene()))[0]
    assert differ(served, inverted) > 0.5  # the same seed and instruction: the reference made the difference


def test_the_size_asked_for_is_the_size_returned(client):
    (result,) = edit(client, scene(), size="64x64")
    assert result.shape == (64, 64, 3)


def test_batched_instruction_edits_equal_each_edit_alone(engine):
    """n = 2 with per-image seeds and another request with another upload, in one call: each image
    is what it is alone, and each follows its own reference (no mixing within the call)."""
    jobs = [edit_job("two", scene(), (3, 4)), edit_job("inverted", ImageOps.invert(scene()), (3,))]
    results = engine.run_batch(jobs)
    assert [result.error for result in results] == [None, None]
    assert [result.batch_images for result in results] == [3, 3]
    together = [[pixels(image) for image in result.images_b64] for result in results]
    for single, batched in zip(jobs, together):
        (alone,) = engine.run_batch([single])
        for x, y in zip(batched, alone.images_b64):
            assert differ(x, pixels(y)) <= 1.0, single.request_id
    assert differ(together[0][0], together[0][1]) > 1  # seeds 3 and 4
    assert differ(together[0][0], together[1][0]) > 0.5  # seed 3 on each upload


def test_a_streamed_instruction_edit_sends_partials_then_the_plain_edits_image(client):
    """Previews decode only the latents being denoised (the reference's are not among them)."""
    extra = {"num_inference_steps": STEPS, "seed": 3}
    image = ("scene.png", png(scene()), "image/png")

    async def scenario():
        stream = await client.images.edit(
            model=KONTEXT, image=image, prompt="make the square green", stream=True, partial_images=2, extra_body=extra
        )
        return [event async for event in stream]

    events = run(scenario())
    assert [event.type for event in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    for event in events[:2]:
        assert Image.open(io.BytesIO(base64.b64decode(event.b64_json))).size == (96, 64)
    assert differ(pixels(events[-1].b64_json), edit(client, scene())[0]) == 0


def test_strength_does_not_apply_to_an_instruction_edit(client):
    with pytest.raises(openai.BadRequestError) as refused:
        edit(client, scene(), strength=0.5)
    assert refused.value.body["param"] == "strength" and "edits by instruction" in refused.value.body["message"]


def test_a_masked_edit_is_kontext_inpainting(client):
    """With a mask: `FluxKontextInpaintPipeline` repaints the transparent half; outside the mask
    the pixels sent come back."""
    source = np.asarray(scene(), dtype=np.int16)
    for result in edit(client, scene(), mask=right_half_mask(), n=2):
        assert np.abs(result - source)[:, :48].mean() == 0
        assert np.abs(result - source)[:, 48:].mean() > 10


def test_kontext_draws_from_a_prompt_alone(client):
    response = run(
        client.images.generate(
            model=KONTEXT, prompt="a red circle", size="64x64", response_format="b64_json", extra_body={"num_inference_steps": 2}
        )
    )
    assert pixels(response.data[0].b64_json).shape == (64, 64, 3)


def test_variations_are_refused_on_an_instruction_edit_model(client):
    """A variation is image-to-image from an empty prompt; Kontext has no strength to vary by."""
    with pytest.raises(openai.BadRequestError) as refused:
        run(client.images.create_variation(model=KONTEXT, image=("scene.png", png(scene()), "image/png")))
    assert refused.value.body["param"] == "image" and "cannot do image-to-image" in refused.value.body["message"]


# --- a model that only edits (Qwen-Image-Edit's modes) -------------------------------------------


EDIT_ONLY = ModelLimits(id="edit-only", native_width=64, native_height=64, default_steps=4, modes=["instruction-edit"])


class EditOnlyWorker:
    """Reports Qwen-Image-Edit's modes and records the jobs it is sent."""

    def __init__(self) -> None:
        self.jobs: list[GenerationJob] = []

    async def generate(self, jobs):
        self.jobs.extend(jobs)
        image = encode_image_b64(Image.new("RGB", (jobs[0].width, jobs[0].height)))
        return [GenerationResult(request_id=job.request_id, images_b64=[image] * job.n) for job in jobs]

    async def status(self):
        return WorkerStatus(ready=True, models=[EDIT_ONLY])

    async def manage_loras(self, command):
        return LoraReply(adapters=[])


def test_a_model_that_only_edits_refuses_generations_and_edits_by_instruction(make_app):
    """Qwen-Image-Edit's modes: a generation is a 400 naming `model`, a masked edit one naming
    `mask` (its inpaint pipeline ignores the size asked); an edit is its instruction edit, with no
    strength; the pool's warm-up, which draws from a prompt, makes no call to it."""
    worker = EditOnlyWorker()
    app = make_app(worker, warmed_up=False)
    client = openai_client(app)
    image = ("scene.png", png(scene((64, 64))), "image/png")
    mask = ("mask.png", png(right_half_mask((64, 64))), "image/png")

    async def scenario():
        app.state.serving.readiness.start_polling()
        for _ in range(100):
            if app.state.serving.worker.loads[0].ready:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(openai.BadRequestError) as generation:
            await client.images.generate(prompt="a red circle", size="64x64")
        with pytest.raises(openai.BadRequestError) as masked:
            await client.images.edit(image=image, mask=mask, prompt="a green circle")
        await client.images.edit(image=image, prompt="make the square green", response_format="b64_json")
        return generation.value.body, masked.value.body

    generation, masked = run(scenario())
    assert generation["param"] == "model" and "/v1/images/edits" in generation["message"]
    assert masked["param"] == "mask" and "cannot do inpainting" in masked["message"]
    assert [(job.mode, job.strength, job.is_warm_up) for job in worker.jobs] == [("instruction-edit", None, False)]


def test_a_streamed_generation_on_a_model_that_only_edits_is_refused(make_app):
    app = make_app(EditOnlyWorker())

    async def scenario():
        async with http(app) as client:
            return await client.post("/v1/images/generations", json={"prompt": "a red circle", "stream": True})

    response = run(scenario())
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"

"""Several models in one server (HYPERGEN_MODELS): listed, picked by `model`, never mixed in a call."""

import base64
import io
import time

import numpy as np
import openai
import pytest
from PIL import Image

from hypergen.config import Settings
from hypergen.protocol import GenerationJob

from .conftest import EngineClient, openai_client, run, start_engine


@pytest.fixture(scope="module")
def two_models(tiny_sd_dir, tiny_sdxl_dir, tmp_path_factory):
    settings = Settings(models=f"sd={tiny_sd_dir},xl={tiny_sdxl_dir}", home=tmp_path_factory.mktemp("two-models"))
    return settings, start_engine(settings, tiny_sd_dir)


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_models_are_listed_and_picked_by_the_model_field(two_models, make_app):
    settings, engine = two_models
    app = make_app(EngineClient(engine), models=settings.models, model_name=None)
    client = openai_client(app)

    async def scenario():
        listed = await client.models.list()
        images = {}
        for model in ("sd", "xl"):
            response = await client.images.generate(
                model=model, prompt="a", size="64x64", response_format="b64_json", extra_body={"seed": 1, "num_inference_steps": 2}
            )
            images[model] = pixels(response.data[0].b64_json)
        default = await client.images.generate(
            prompt="a", size="64x64", response_format="b64_json", extra_body={"seed": 1, "num_inference_steps": 2}
        )
        with pytest.raises(openai.NotFoundError):
            await client.images.generate(model="nope", prompt="a")
        return listed, images, pixels(default.data[0].b64_json)

    listed, images, default = run(scenario())
    assert [model.id for model in listed.data] == ["sd", "xl"]
    assert np.abs(images["sd"] - images["xl"]).mean() > 1
    assert np.array_equal(default, images["sd"])


def test_a_batch_never_mixes_models(two_models):
    _, engine = two_models
    jobs = [
        GenerationJob(
            request_id=str(index),
            model=model,
            prompt="a",
            width=64,
            height=64,
            num_inference_steps=2,
            guidance_scale=7.5,
            seeds=[3],
            admitted_at=time.time(),
        )  # fmt: skip
        for index, model in enumerate(["sd", "xl", "sd"])
    ]
    together = engine.run_batch(jobs)
    alone = [engine.run_batch([job])[0] for job in jobs]
    assert [result.batch_images for result in together] == [2, 1, 2]
    for batched, single in zip(together, alone):
        assert np.abs(pixels(batched.images_b64[0]) - pixels(single.images_b64[0])).mean() <= 1.0

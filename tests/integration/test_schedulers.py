"""Schedulers per request: names that fit the model, a 400 for those that do not, no shared state."""

import asyncio
import base64
import io
import time

import numpy as np
import openai
import pytest
from PIL import Image

from hypergen.protocol import GenerationJob

from .conftest import EngineClient, http, openai_client, run


@pytest.fixture
def app(make_app, engine):
    return make_app(EngineClient(engine), model_name="tiny-sd")


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def job(request_id, scheduler=None, seed=5):
    return GenerationJob(
        request_id=request_id, model="tiny-sd", prompt="a shape", width=64, height=64, num_inference_steps=4,
        guidance_scale=7.5, seeds=[seed], scheduler=scheduler, admitted_at=time.time(),
    )  # fmt: skip


def test_models_list_the_schedulers_that_fit_and_a_misfit_is_400_naming_them(app):
    async def scenario():
        async with http(app) as client:
            listed = await client.get("/v1/models")
            misfit = await client.post("/v1/images/generations", json={"prompt": "a", "scheduler": "flow_euler"})
            unknown = await client.post("/v1/images/generations", json={"prompt": "a", "scheduler": "k_euler_turbo"})
            return listed, misfit, unknown

    listed, misfit, unknown = run(scenario())
    card = listed.json()["data"][0]
    assert {"euler", "euler_a", "dpm++_2m", "dpm++_2m_karras", "ddim", "unipc", "lcm"} <= set(card["schedulers"])
    assert "flow_euler" not in card["schedulers"]  # a flow-matching sampler on a DDPM-family UNet
    assert card["native_size"] == "64x64" and "text-to-image" in card["modes"]
    for response in (misfit, unknown):
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "scheduler"
        assert "dpm++_2m_karras" in error["message"] and "euler_a" in error["message"]


def test_each_scheduler_changes_the_image_and_never_leaks_into_other_calls(engine):
    own = engine.run_batch([job("own")])[0]
    names = ["euler_a", "dpm++_2m_karras", "ddim", "unipc", "lcm", "heun"]
    alone = {name: engine.run_batch([job(name, name)])[0] for name in names}
    together = engine.run_batch([job(name, name) for name in names] + [job("own-again")])
    for name, result in zip([*names, None], together):
        assert result.error is None and result.batch_images == 1  # different schedulers never share a call
        reference = alone[name] if name else own
        assert np.array_equal(pixels(result.images_b64[0]), pixels(reference.images_b64[0])), name
    for name in names:
        assert np.abs(pixels(alone[name].images_b64[0]) - pixels(own.images_b64[0])).mean() > 0.5, name
    assert np.array_equal(pixels(engine.run_batch([job("own-last")])[0].images_b64[0]), pixels(own.images_b64[0]))


def test_concurrent_requests_with_different_schedulers_each_get_their_solo_image(app):
    client = openai_client(app)
    names = ["euler", "euler_a", "dpm++_2m", "ddim", "euler_a", "dpm++_2m"]

    def request(name, seed):
        return client.images.generate(prompt="a shape", extra_body={"scheduler": name, "seed": seed, "num_inference_steps": 4})

    async def scenario():
        together = await asyncio.gather(*[request(name, 10 + index) for index, name in enumerate(names)])
        alone = [await request(name, 10 + index) for index, name in enumerate(names)]
        return together, alone

    together, alone = run(scenario())
    for name, concurrent, solo in zip(names, together, alone):  # batched with the others of its scheduler
        assert np.abs(pixels(concurrent.data[0].b64_json) - pixels(solo.data[0].b64_json)).mean() <= 1.0, name
    with pytest.raises(openai.BadRequestError):
        run(request("flow_euler", 1))

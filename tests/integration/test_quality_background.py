"""OpenAI's quality and background fields: a step budget per model, and transparency honoured or refused."""

import base64
import io
import json

import numpy as np
from PIL import Image

from hypergen.engine.pipelines import quality_budget, read_model_defaults

from .conftest import EngineClient, http, run


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_quality_is_a_step_budget_and_explicit_steps_win(make_app, engine):
    app = make_app(EngineClient(engine), model_name="tiny-sd")
    budget = engine.models.limits()[0].quality_steps
    assert budget == {"low": 2, "medium": 4, "high": 6}  # 40 / 100 / 150 % of the tiny model's 4 steps

    async def scenario():
        async with http(app) as client:

            async def generate(**fields):
                response = await client.post("/v1/images/generations", json={"prompt": "a shape", "seed": 3, **fields})
                assert response.status_code == 200, response.text
                return response.json()

            return {
                "low": await generate(quality="low"),
                "hd": await generate(quality="hd"),
                "auto": await generate(quality="auto"),
                "steps-2": await generate(num_inference_steps=2),
                "steps-6": await generate(num_inference_steps=6),
                "steps-4": await generate(num_inference_steps=4),
                "both": await generate(quality="low", num_inference_steps=6),
            }

    bodies = run(scenario())
    image = {name: pixels(body["data"][0]["b64_json"]) for name, body in bodies.items()}
    assert np.array_equal(image["low"], image["steps-2"]) and bodies["low"]["quality"] == "low"
    assert np.array_equal(image["hd"], image["steps-6"]) and bodies["hd"]["quality"] == "high"
    assert np.array_equal(image["auto"], image["steps-4"]) and bodies["auto"]["quality"] == "medium"
    assert np.array_equal(image["both"], image["steps-6"]) and bodies["both"].get("quality") is None
    assert not np.array_equal(image["low"], image["hd"])
    assert all(body["background"] == "opaque" for body in bodies.values())


def test_a_model_may_set_its_quality_budget_in_hypergen_json(tmp_path):
    (tmp_path / "hypergen.json").write_text(json.dumps({"quality_steps": {"low": 3, "high": 40}}))
    assert quality_budget(20, read_model_defaults(str(tmp_path))["quality_steps"]) == {"low": 3, "medium": 20, "high": 40}


def test_a_transparent_background_is_refused_never_faked(make_app, engine):
    app = make_app(EngineClient(engine), model_name="tiny-sd")

    async def scenario():
        async with http(app) as client:
            transparent = await client.post("/v1/images/generations", json={"prompt": "a", "background": "transparent"})
            opaque = await client.post("/v1/images/generations", json={"prompt": "a", "background": "opaque", "num_inference_steps": 2})
            return transparent, opaque

    transparent, opaque = run(scenario())
    error = transparent.json()["error"]
    assert transparent.status_code == 400 and error["param"] == "background" and "opaque" in error["message"]
    assert opaque.status_code == 200 and opaque.json()["background"] == "opaque"

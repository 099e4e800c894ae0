"""The shipped demo model in an engine: a LoRA made for its UNet loads and changes the picture,
and inpainting on it repaints only the masked half (the judge reads the new colour there)."""

from __future__ import annotations

import asyncio
import base64
import io
import random

import numpy as np
import pytest
from PIL import Image

from hypergen.config import Settings
from hypergen.engine.pipelines import DEMO_MODEL_DIR
from hypergen.protocol import GenerationJob, LoraChoice
from hypergen.testing import save_random_lora
from tests.integration.conftest import start_engine
from training.shapes import COLOURS, Scene, draw, nearest_colours


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("demo-loras")
    save_random_lora(DEMO_MODEL_DIR, adapters / "wild", seed=3, magnitude=0.5)
    settings = Settings(home=tmp_path_factory.mktemp("home"), lora_dirs=str(adapters))
    return start_engine(settings, DEMO_MODEL_DIR)


def run(engine, **fields) -> np.ndarray:
    job = GenerationJob(request_id=fields.pop("request_id", "r"), model="hypergen-tiny-sd", width=64, height=64,
                        num_inference_steps=10, guidance_scale=5.0, seeds=[4], admitted_at=0.0, **fields)  # fmt: skip
    result = asyncio.run(engine.generate([job]))[0]
    assert result.error is None, result.error
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.images_b64[0]))).convert("RGB"), dtype=np.int16)


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_lora_for_the_demo_model_loads_and_changes_the_picture(demo):
    prompt = "a red circle on a blue background"
    base = run(demo, prompt=prompt)
    styled = run(demo, prompt=prompt, loras=[LoraChoice(path="wild")])
    assert np.abs(styled - base).mean() > 2
    assert np.array_equal(run(demo, prompt=prompt, loras=[LoraChoice(path="wild", scale=0.0)]), base)


def test_inpainting_on_the_demo_model_repaints_only_the_masked_half(demo):
    original = draw(Scene("white", "square", "black"), random.Random(1))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half
    out = run(demo, prompt="a white square on a yellow background", mode="inpainting", image_b64=png_b64(original),
              mask_b64=png_b64(mask), strength=1.0)  # fmt: skip
    assert np.array_equal(out[:, :32], np.asarray(original, dtype=np.int16)[:, :32])  # kept exactly
    right_border = nearest_colours(out[:, 60:].astype(np.float32))
    assert np.mean(right_border == COLOURS.index("yellow")) > 0.5, "the masked background should turn yellow"

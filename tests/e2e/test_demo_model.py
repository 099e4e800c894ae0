"""The embedded demo model through `bentoml serve` and the official client: pictures are read
back with the same judges `bench.demo_quality` and `bench.demo_lora` use (training/shapes.py), so
these tests check that the prompt, negative prompt, guidance, an edit and the `outline` adapter
really reach the model."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from training.shapes import PALETTE, Scene, draw, judge, judge_fill

pytestmark = pytest.mark.e2e


def picture(client, prompt: str, seed: int, **extra) -> Image.Image:
    response = client.images.generate(prompt=prompt, size="64x64", response_format="b64_json", extra_body={"seed": seed, **extra})
    return Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB")


def test_the_first_request_draws_a_red_circle_on_a_blue_background(client):
    """The README's promise, at the model's recommended settings (no extras sent)."""
    verdict = judge(picture(client, "a red circle on a blue background", seed=1))
    assert (verdict.colour, verdict.shape, verdict.background) == ("red", "circle", "blue")


@pytest.mark.parametrize(
    "scene",
    [
        Scene("yellow", "square", "black"),
        Scene("white", "triangle", "purple"),
        Scene("green", "circle", "pink"),
        Scene("orange", "square", "cyan"),
    ],
    ids=lambda scene: scene.prompt.replace(" ", "-"),
)
def test_fixed_prompts_get_their_colours(client, scene):
    verdict = judge(picture(client, scene.prompt, seed=3))
    assert (verdict.colour, verdict.background) == (scene.colour, scene.background)


def test_words_outside_the_world_are_ignored(client):
    verdict = judge(picture(client, "a photo of a red circle on a blue background, dragon, 4k", seed=1))
    assert (verdict.colour, verdict.background) == ("red", "blue")


def shape_colours(client, prompt: str, **extra) -> list[str | None]:
    """The judged shape colour for seeds 0..15 (two requests of n=8, each one batched call)."""
    colours = []
    for first_seed in (0, 8):
        response = client.images.generate(
            prompt=prompt, n=8, size="64x64", response_format="b64_json", extra_body={"seed": first_seed, **extra}
        )
        for item in response.data:
            colours.append(judge(Image.open(io.BytesIO(base64.b64decode(item.b64_json)))).colour)
    return colours


UNSAID_COLOUR = "a square on a blue background"  # the shape's colour is left to the model


def test_a_negative_prompt_steers_away_from_what_it_names(client):
    plain = shape_colours(client, UNSAID_COLOUR)
    avoided = shape_colours(client, UNSAID_COLOUR, negative_prompt="a red square")
    assert plain.count("red") >= 2, plain  # left alone, some seeds draw red squares
    assert avoided.count("red") == 0, avoided


def mean_distance_from(colour: str, colours: list[str | None]) -> float:
    target = np.array(PALETTE[colour], dtype=np.float32)
    found = [np.linalg.norm(np.array(PALETTE[name], dtype=np.float32) - target) for name in colours if name]
    return float(np.mean(found))


def test_a_higher_guidance_scale_steers_harder(client):
    """Guidance scales how far the prompt pulls from the negative prompt: at 1.0 (no
    classifier-free guidance, the negative prompt has no say) the squares come in many colours;
    at the recommended scale they are pushed far from red (to its opposite, cyan)."""
    off = shape_colours(client, UNSAID_COLOUR, negative_prompt="a red square", guidance_scale=1.0)
    on = shape_colours(client, UNSAID_COLOUR, negative_prompt="a red square")
    assert mean_distance_from("red", on) > mean_distance_from("red", off) + 50, (off, on)


def test_an_edit_asking_for_another_colour_changes_the_colour(client):
    import random

    original = draw(Scene("red", "circle", "blue"), random.Random(5))
    assert judge(original).colour == "red"
    buffer = io.BytesIO()
    original.save(buffer, format="PNG")
    response = client.images.edit(
        image=("red-circle.png", buffer.getvalue(), "image/png"),
        prompt="a green circle on a blue background",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 0, "strength": 0.8},
    )
    edited = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB")
    verdict = judge(edited)
    assert (verdict.colour, verdict.background) == ("green", "blue")


# --- the `outline` adapter shipped with the demo model (training/demo_lora.py) --------------------

# A circle and a square: the adapter draws nearly every one hollow, while most triangles stay
# filled (bench/results/cpu-demo-lora.md). Each prompt is drawn with seeds 0..3 (8 of 8 seeds were
# outlines with the adapter and filled without it when these were picked) and judged by the
# majority, so one unlucky seed does not decide.
OUTLINE_PROMPTS = ["a red circle on a blue background", "a yellow square on a black background"]


def fills(client, prompt: str, **extra) -> list[str | None]:
    response = client.images.generate(prompt=prompt, n=4, size="64x64", response_format="b64_json", extra_body={"seed": 0, **extra})
    return [judge_fill(Image.open(io.BytesIO(base64.b64decode(item.b64_json)))).fill for item in response.data]


def test_the_outline_adapter_is_loaded_and_pinned_at_start(default_server):
    adapters = httpx.get(f"{default_server.base_url}/v1/loras", timeout=30).json()["data"]
    assert [(adapter["name"], adapter["pinned"]) for adapter in adapters] == [("outline", True)]
    assert adapters[0]["source"].endswith("demo-lora") and 0 < adapters[0]["size_bytes"] < 1_000_000


@pytest.mark.parametrize("prompt", OUTLINE_PROMPTS, ids=lambda prompt: prompt.replace(" ", "-"))
def test_the_outline_adapter_draws_the_same_prompt_hollow(client, prompt):
    hollow = fills(client, prompt, lora_path="outline")
    plain = fills(client, prompt)
    assert hollow.count("outline") >= 3, hollow
    assert plain.count("filled") >= 3, plain


def test_the_outline_adapter_at_scale_zero_is_the_base_model(client):
    prompt = OUTLINE_PROMPTS[0]
    base = np.asarray(picture(client, prompt, seed=2))
    assert np.array_equal(np.asarray(picture(client, prompt, seed=2, lora_path="outline", lora_scale=0.0)), base)
    assert not np.array_equal(np.asarray(picture(client, prompt, seed=2, lora_path="outline")), base)

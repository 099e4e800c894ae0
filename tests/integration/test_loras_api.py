"""LoRA adapters on a real tiny pipeline: start-up, per request, admin API, isolation, LRU."""

import base64
import io
import time

import numpy as np
import openai
import pytest
from PIL import Image

from hypergen.config import Settings
from hypergen.protocol import GenerationJob, LoraChoice
from hypergen.testing import save_random_lora

from .conftest import EngineClient, http, openai_client, run, start_engine


@pytest.fixture(scope="module")
def lora_dirs(tiny_sd_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    allowed = root / "allowed"
    for index, name in enumerate(["style", "ink", "chalk", "neon", "late"]):
        save_random_lora(tiny_sd_dir, allowed / name, seed=index + 10, magnitude=0.5)
    (allowed / "corrupt").mkdir()
    (allowed / "corrupt" / "pytorch_lora_weights.safetensors").write_bytes(b"definitely not safetensors")
    outside = save_random_lora(tiny_sd_dir, root / "outside", seed=99)
    return allowed, outside


@pytest.fixture(scope="module")
def lora_engine(tiny_sd_dir, lora_dirs, tmp_path_factory):
    allowed, _ = lora_dirs
    settings = Settings(
        home=tmp_path_factory.mktemp("lora-home"), loras=f"style={allowed / 'style'}:0.8",
        lora_dirs=str(allowed), max_loras=3,
    )  # fmt: skip
    return start_engine(settings, tiny_sd_dir)


@pytest.fixture
def app(make_app, lora_engine):
    return make_app(EngineClient(lora_engine))


def job(request_id, lora=None, scale=None, seed=1, prompt="a shape"):
    return GenerationJob(
        request_id=request_id, model="tiny-sd", prompt=prompt, width=64, height=64, num_inference_steps=3,
        guidance_scale=7.5, seeds=[seed], admitted_at=time.time(),
        loras=[LoraChoice.model_construct(path=lora, scale=scale)] if lora else [],  # unchecked: the worker must cope
    )  # fmt: skip


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def image_for(engine, **kwargs):
    result = engine.run_batch([job("r", **kwargs)])[0]
    assert result.error is None, result.error
    return pixels(result.images_b64[0])


def names(engine):
    return {adapter["name"] for adapter in engine.models.default_loras.list()}


def test_start_up_adapters_change_the_image_and_scale_zero_is_the_base(lora_engine):
    base = image_for(lora_engine)
    styled = image_for(lora_engine, lora="style")
    assert np.abs(styled - base).mean() > 2
    assert np.array_equal(image_for(lora_engine, lora="style", scale=0.0), base)
    assert np.array_equal(image_for(lora_engine), base)  # adapters are off again for base requests
    pinned = next(a for a in lora_engine.models.default_loras.list() if a["name"] == "style")
    assert pinned["pinned"] and pinned["scale"] == 0.8 and pinned["size_bytes"] > 0


def test_one_batch_gives_each_request_its_own_adapter(lora_engine, lora_dirs):
    allowed, _ = lora_dirs
    jobs = [
        job("a", lora="style", seed=4),
        job("b", lora=str(allowed / "ink"), seed=4),
        job("c", seed=4),
        job("d", lora="style", scale=1.2, seed=4),
    ]
    together = lora_engine.run_batch(jobs)
    alone = [lora_engine.run_batch([single])[0] for single in jobs]
    images = [pixels(result.images_b64[0]) for result in together]
    for batched, single in zip(together, alone):
        assert batched.error is None
        assert np.abs(pixels(batched.images_b64[0]) - pixels(single.images_b64[0])).mean() <= 1.0
    assert min(np.abs(images[i] - images[j]).mean() for i in range(4) for j in range(i + 1, 4)) > 1


def test_bad_lora_paths_are_400_naming_lora_path_and_load_nothing(app, lora_engine, lora_dirs):
    _, outside = lora_dirs
    before = names(lora_engine)
    client = openai_client(app)
    for bad in ["../outside", str(outside), "style/../../outside", "missing-adapter", "corrupt", "/etc/passwd"]:
        with pytest.raises(openai.BadRequestError) as caught:
            run(client.images.generate(prompt="a", extra_body={"lora_path": bad, "num_inference_steps": 2}))
        assert caught.value.body["param"] == "lora_path", bad
    assert names(lora_engine) == before


def test_admin_api_loads_lists_and_unloads_without_a_restart(app, lora_engine):
    base = image_for(lora_engine, seed=7)

    async def scenario():
        async with http(app) as client:
            loaded = await client.post("/v1/loras", json={"name": "glow", "path": "neon", "scale": 1.0})
            listed = await client.get("/v1/loras")
            duplicate = await client.post("/v1/loras", json={"name": "glow", "path": "neon"})
            escape = await client.post("/v1/loras", json={"name": "x", "path": "../outside"})
            bad_name = await client.post("/v1/loras", json={"name": "no spaces", "path": "neon"})
            generated = await client.post(
                "/v1/images/generations", json={"prompt": "a shape", "lora_path": "glow", "seed": 7, "num_inference_steps": 3}
            )
            deleted = await client.delete("/v1/loras/glow")
            again = await client.delete("/v1/loras/glow")
            after = await client.post(
                "/v1/images/generations", json={"prompt": "a shape", "lora_path": "glow", "seed": 7, "num_inference_steps": 3}
            )
            return loaded, listed, duplicate, escape, bad_name, generated, deleted, again, after

    loaded, listed, duplicate, escape, bad_name, generated, deleted, again, after = run(scenario())
    assert loaded.status_code == 200 and loaded.json()["name"] == "glow" and loaded.json()["load_ms"] >= 0
    assert "glow" in {item["name"] for item in listed.json()["data"]}
    assert duplicate.status_code == 409
    assert escape.status_code == 400 and escape.json()["error"]["param"] == "path"
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"
    assert np.abs(pixels(generated.json()["data"][0]["b64_json"]) - base).mean() > 2
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert again.status_code == 404
    assert after.status_code == 400 and after.json()["error"]["param"] == "lora_path"  # not loaded, not a path either
    assert np.array_equal(image_for(lora_engine, seed=7), base)


def test_adapters_loaded_on_demand_are_evicted_least_recently_used_first(lora_engine, lora_dirs):
    allowed, _ = lora_dirs
    for name in ("ink", "chalk", "late"):  # max_loras=3 with the pinned "style"
        image_for(lora_engine, lora=name)
        time.sleep(0.01)
    loaded = names(lora_engine)
    assert "style" in loaded and len(loaded) == 3
    assert "late" in loaded and "ink" not in loaded  # path-loaded adapters are named relative to their dir


@pytest.mark.parametrize("poison", ["bad\x00name", "x" * 5000, "a/" * 2100])
def test_an_unreadable_lora_path_fails_its_own_job_alone(lora_engine, poison):
    """A NUL byte or an over-long path made the path check raise: the whole batch got 500."""
    results = lora_engine.run_batch([job("ok-1", seed=1), job("poison", lora=poison), job("ok-2", seed=2)])
    assert [result.error is None for result in results] == [True, False, True]
    assert results[1].error.status == 400 and results[1].error.param == "lora_path"
    assert [len(result.images_b64) for result in results] == [1, 0, 1]


def test_the_api_refuses_control_characters_and_over_long_lora_paths(app):
    async def scenario():
        async with http(app) as client:
            bodies = [{"prompt": "a", "lora_path": "bad\x00name"}, {"prompt": "a", "lora_path": "x" * 1025}]
            return [await client.post("/v1/images/generations", json=body) for body in bodies]

    for response in run(scenario()):
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_path"
        assert "1024 printable characters" in response.json()["error"]["message"]


def test_admin_paths_never_reach_outside_the_allowed_dirs_nor_show_server_paths(app, lora_engine, lora_dirs):
    allowed, _ = lora_dirs

    async def scenario():
        async with http(app) as client:
            tag = await client.post("/v1/loras", json={"name": "t", "path": "nosuch:model"})
            odd_tag = await client.post("/v1/loras", json={"name": "t", "path": "a:b"})
            # Exists relative to the worker's working directory (the repo root), outside the allowed dirs.
            relative = await client.post("/v1/loras", json={"name": "t", "path": "hypergen/assets"})
            pinned = await client.delete("/v1/loras/style")
            loaded = await client.post("/v1/loras", json={"name": "chalky", "path": str(allowed / "chalk")})
            listed = await client.get("/v1/loras")
            await client.delete("/v1/loras/chalky")
            return tag, odd_tag, relative, pinned, loaded, listed

    tag, odd_tag, relative, pinned, loaded, listed = run(scenario())
    assert tag.status_code == 404 and odd_tag.status_code == 404
    assert relative.status_code == 400 and relative.json()["error"]["param"] == "path"
    assert pinned.status_code == 409 and "pinned" in pinned.json()["error"]["message"]
    assert loaded.status_code == 200 and loaded.json()["source"] == "chalk"
    assert str(allowed) not in listed.text and "style" in names(lora_engine)


def test_different_adapters_and_scales_share_one_call_each_image_as_alone(lora_engine, lora_dirs):
    """Per-image routing: [style, ink, none, style×1.2, ink+chalk] in one pipeline call, with and
    without classifier-free guidance (which doubles the UNet's batch)."""
    allowed, _ = lora_dirs
    for guidance in (7.5, 1.0):
        jobs = [
            job("a", lora="style", seed=4),
            job("b", lora=str(allowed / "ink"), seed=5),
            job("c", seed=4),
            job("d", lora="style", scale=1.2, seed=4),
            job("e", seed=6).model_copy(update={"loras": [LoraChoice(path="ink", scale=0.7), LoraChoice(path="chalk", scale=0.5)]}),
        ]
        jobs = [single.model_copy(update={"guidance_scale": guidance}) for single in jobs]
        together = lora_engine.run_batch(jobs)
        assert [result.batch_images for result in together] == [5] * 5, "one call for all five"
        alone = [lora_engine.run_batch([single])[0] for single in jobs]
        assert [result.batch_images for result in alone] == [1] * 5
        for batched, single in zip(together, alone):
            assert batched.error is None and single.error is None
            # As close as peft's own batched path gets with one adapter for all (random tiny UNets
            # amplify float noise); tests/unit/test_loras.py checks the routed layers to 1e-5.
            assert np.abs(pixels(batched.images_b64[0]) - pixels(single.images_b64[0])).mean() <= 1.0, (guidance, batched.request_id)
        images = [pixels(result.images_b64[0]) for result in together]
        assert np.abs(images[0] - images[2]).mean() > 1 and np.abs(images[0] - images[3]).mean() > 0.5


def test_several_adapters_in_one_request_add_up_and_scale_zero_is_the_base(lora_engine):
    base = image_for(lora_engine, seed=9)
    both = [LoraChoice(path="style", scale=0.6), LoraChoice(path="ink", scale=0.6)]
    off = [LoraChoice(path="style", scale=0.0), LoraChoice(path="ink", scale=0.0)]
    combined = lora_engine.run_batch([job("two", seed=9).model_copy(update={"loras": both})])[0]
    zero = lora_engine.run_batch([job("zero", seed=9).model_copy(update={"loras": off})])[0]
    style = image_for(lora_engine, lora="style", scale=0.6, seed=9)
    assert np.abs(pixels(combined.images_b64[0]) - style).mean() > 1  # ink changed it too
    assert np.abs(pixels(combined.images_b64[0]) - base).mean() > 1
    assert np.array_equal(pixels(zero.images_b64[0]), base)


def test_an_adapter_that_cannot_be_routed_gets_calls_of_its_own(tiny_sd_dir, tmp_path):
    """DoRA is a peft variant the per-image router does not handle: its job is grouped apart,
    and every image is still the image it would be alone."""
    allowed = tmp_path / "allowed"
    save_random_lora(tiny_sd_dir, allowed / "dora", seed=21, magnitude=0.5, use_dora=True)
    save_random_lora(tiny_sd_dir, allowed / "plain", seed=22, magnitude=0.5)
    engine = start_engine(Settings(home=tmp_path / "home", loras="", lora_dirs=str(allowed)), tiny_sd_dir)
    jobs = [job("dora", lora="dora", seed=3), job("plain", lora="plain", seed=3), job("none", seed=3)]
    together = engine.run_batch(jobs)
    assert [result.batch_images for result in together] == [1, 2, 2]
    assert not engine.models.default_loras.resolve("dora").routable
    alone = [engine.run_batch([single])[0] for single in jobs]
    for batched, single in zip(together, alone):
        assert np.abs(pixels(batched.images_b64[0]) - pixels(single.images_b64[0])).mean() <= 1.0
    assert np.abs(pixels(together[0].images_b64[0]) - pixels(together[2].images_b64[0])).mean() > 1


def test_the_loras_field_through_the_official_client(app, lora_engine):
    client = openai_client(app)
    listed = [{"path": "style", "scale": 0.6}, {"path": "ink", "scale": 0.6}]
    response = run(client.images.generate(prompt="a shape", extra_body={"loras": listed, "seed": 9, "num_inference_steps": 3}))
    two = lora_engine.run_batch(
        [job("two", seed=9).model_copy(update={"loras": [LoraChoice(path="style", scale=0.6), LoraChoice(path="ink", scale=0.6)]})]
    )[0]
    assert np.array_equal(pixels(response.data[0].b64_json), pixels(two.images_b64[0]))
    bad = [
        {"loras": listed, "lora_path": "style"},
        {"loras": [{"path": "style"}, {"path": "style"}]},
        {"loras": [{"path": f"a{index}"} for index in range(5)]},
        {"loras": [{"path": "style", "scale": 3}]},
        {"loras": [{"path": "missing-adapter"}]},
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            run(client.images.generate(prompt="a", extra_body={**extra, "num_inference_steps": 2}))
        assert caught.value.body["param"].startswith("loras"), extra


def test_an_edit_takes_the_loras_list_as_a_json_form_field(app):
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source, format="PNG")

    async def scenario():
        async with http(app) as client:
            files = {"image": ("i.png", source.getvalue(), "image/png")}
            form = {"prompt": "a shape", "seed": "3", "num_inference_steps": "4", "response_format": "b64_json"}
            base = await client.post("/v1/images/edits", data=form, files=files)
            styled = await client.post("/v1/images/edits", data={**form, "loras": '[{"path": "style", "scale": 1.5}]'}, files=files)
            broken = await client.post("/v1/images/edits", data={**form, "loras": "[{"}, files=files)
            return base, styled, broken

    base, styled, broken = run(scenario())
    assert base.status_code == 200 and styled.status_code == 200, styled.text
    assert np.abs(pixels(styled.json()["data"][0]["b64_json"]) - pixels(base.json()["data"][0]["b64_json"])).mean() > 1
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "loras"

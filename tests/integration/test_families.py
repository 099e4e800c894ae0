"""The model-family matrix: every feature on a tiny random-weight pipeline of each family (SD 1.5,
SDXL, SD 3.5, FLUX.1, Qwen-Image, Z-Image, Sana, PixArt-Σ), served together by one engine.

Each family is built from configs (`hypergen.testing.families`), saved with `save_pretrained`
and loaded through HyperGen's normal loading path. The README's family table names these tests.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import openai
import pytest
from PIL import Image, ImageOps

from hypergen.config import Settings
from hypergen.protocol import GenerationJob, LoraChoice
from hypergen.testing import save_random_lora
from hypergen.testing.families import FAMILIES, save_tiny_family

from .conftest import EngineClient, openai_client, run, start_engine

# Families whose autoencoder is the trained pixel VAE: their edits keep what they are given.
PIXEL_VAE_FAMILIES = {"sd", "sdxl", "sd3", "flux", "z-image"}
# diffusers has image-to-image and inpainting pipelines (AutoPipelineFor*) for these families.
EDITING_FAMILIES = {"sd", "sdxl", "sd3", "flux", "qwen-image", "z-image"}
# diffusers has a LoRA loader for these pipelines (PixArt-Σ's has none).
LORA_FAMILIES = {"sd", "sdxl", "sd3", "flux", "qwen-image", "z-image", "sana"}
SIZE = (64, 64)
# Random adapter weights: large enough to show, small enough that the tiny random UNets do not
# amplify float noise (at 0.5 SDXL's own batched call is 6.7/255 off its single call).
LORA_MAGNITUDE = {"sd": 0.2, "sdxl": 0.2}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {kind: save_tiny_family(kind, root / kind, seed=index + 1) for index, kind in enumerate((*FAMILIES, "flux-schnell"))}


@pytest.fixture(scope="module")
def lora_root(family_dirs, tmp_path_factory):
    """Per family: adapters `a` and `b` on the denoiser's attention projections."""
    root = tmp_path_factory.mktemp("family-loras")
    for index, (kind, model_dir) in enumerate(family_dirs.items()):
        for offset, name in enumerate(("a", "b")):
            save_random_lora(model_dir, root / kind / name, seed=10 * index + offset, magnitude=LORA_MAGNITUDE.get(kind, 0.5))
    return root


@pytest.fixture(scope="module")
def engine(family_dirs, lora_root, tmp_path_factory):
    """All eight families (and FLUX.1-schnell's layout) in one engine, under a memory budget that keeps only the model in use
    on the device (every switch between families offloads one and brings the other back)."""
    settings = Settings(
        models=",".join(f"{kind}={path}" for kind, path in family_dirs.items()), loras="", lora_dirs=str(lora_root),
        memory_budget_mb=0.01, home=tmp_path_factory.mktemp("families-home"),
    )  # fmt: skip
    return start_engine(settings, family_dirs["sd"])


@pytest.fixture
def client(make_app, engine):
    return openai_client(make_app(EngineClient(engine)))


def job(kind, request_id="r", prompt="a red circle", seeds=(1,), negative=None, guidance=None, steps=4, loras=()):
    return GenerationJob(
        request_id=request_id, model=kind, prompt=prompt, negative_prompt=negative, width=SIZE[0], height=SIZE[1],
        num_inference_steps=steps, guidance_scale=4.0 if guidance is None else guidance, seeds=list(seeds), admitted_at=time.time(),
        loras=[LoraChoice(path=path, scale=scale) for path, scale in loras],
    )  # fmt: skip


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def images_of(engine, *jobs):
    results = engine.run_batch(list(jobs))
    for result in results:
        assert result.error is None, result.error
    return [[pixels(image) for image in result.images_b64] for result in results], results


def image(engine, kind, **kwargs):
    return images_of(engine, job(kind, **kwargs))[0][0][0]


def differ(a, b):
    return float(np.abs(a - b).mean())


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def scene() -> Image.Image:
    """A blue field with a red square on the left."""
    picture = Image.new("RGB", SIZE, (30, 60, 200))
    picture.paste((220, 30, 30), (8, 16, 28, 48))
    return picture


def right_half_mask() -> Image.Image:
    mask = Image.new("RGBA", SIZE, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (SIZE[0] // 2, 0, SIZE[0], SIZE[1]))
    return mask


def decode(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB"), dtype=np.int16)


# --- text-to-image, negative prompts, guidance ------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_batched_images_equal_each_image_alone(engine, kind):
    """n > 1 with per-image seeds, prompts of different lengths, per-image negative prompts: one
    call per compatible group, each image what it is alone."""
    jobs = [
        job(kind, "two", "a red circle", seeds=(3, 4)),
        job(kind, "long", "a large blue square on a white background", seeds=(9,)),
        job(kind, "neg-1", "stars", seeds=(5,), negative="green"),
        job(kind, "neg-2", "a cat", seeds=(6,), negative="a dark and blurry picture"),
    ]
    together, results = images_of(engine, *jobs)
    assert [result.batch_images for result in results] == [3, 3, 2, 2]
    for single, batched in zip(jobs, together):
        alone = images_of(engine, single)[0][0]
        assert len(alone) == len(batched)
        for x, y in zip(batched, alone):
            assert x.shape == (*SIZE[::-1], 3)
            assert differ(x, y) <= 1.0, (kind, single.request_id, differ(x, y))
    assert differ(together[0][0], together[0][1]) > 1  # seeds 3 and 4 differ


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_negative_prompt_changes_the_image(engine, kind):
    plain = image(engine, kind, seeds=(7,), guidance=5.0)
    negative = image(engine, kind, seeds=(7,), guidance=5.0, negative="green")
    other_negative = image(engine, kind, seeds=(7,), guidance=5.0, negative="a dark and blurry picture")
    assert differ(plain, negative) > 0.5 and differ(negative, other_negative) > 0.5, kind


@pytest.mark.parametrize("kind", FAMILIES)
def test_guidance_scale_changes_the_image_and_one_means_off(engine, kind):
    """1.0 is no guidance for every family (the negative prompt is then ignored), as in SD."""
    off = image(engine, kind, seeds=(8,), guidance=1.0)
    assert differ(off, image(engine, kind, seeds=(8,), guidance=6.0)) > 0.5, kind
    assert differ(off, image(engine, kind, seeds=(8,), guidance=1.0, negative="green")) <= 1.0, kind


def test_the_flux_schnell_layout_ignores_guidance_and_takes_a_negative_prompt_as_true_cfg(engine):
    """FLUX.1-schnell has no guidance input and no classifier-free guidance of its own: the
    scale alone changes nothing (true CFG is not turned on behind the client's back, doubling
    the work), a negative prompt turns it on."""
    base = image(engine, "flux-schnell", seeds=(3,), guidance=1.0)
    assert np.array_equal(image(engine, "flux-schnell", seeds=(3,), guidance=5.0), base)
    assert differ(image(engine, "flux-schnell", seeds=(3,), guidance=5.0, negative="green"), base) > 0.5


# --- LoRA ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_lora_changes_the_image_and_scale_zero_is_the_base(engine, client, kind):
    if kind not in LORA_FAMILIES:
        with pytest.raises(openai.BadRequestError) as refused:
            run(client.images.generate(model=kind, prompt="x", size="64x64", extra_body={"lora_path": f"{kind}/a"}))
        assert refused.value.body["param"] == "lora_path" and "cannot take LoRA adapters" in refused.value.body["message"]
        return
    base = image(engine, kind, seeds=(2,))
    styled = image(engine, kind, seeds=(2,), loras=[(f"{kind}/a", 1.0)])
    assert differ(base, styled) > 1, kind
    assert np.array_equal(image(engine, kind, seeds=(2,), loras=[(f"{kind}/a", 0.0)]), base)
    assert np.array_equal(image(engine, kind, seeds=(2,)), base)  # off again afterwards


@pytest.mark.parametrize("kind", sorted(LORA_FAMILIES, key=FAMILIES.index))
def test_different_adapters_share_one_call_each_image_as_alone(engine, kind):
    """Per-image LoRA routing on each family's denoiser, with guidance (two copies of the batch)."""
    jobs = [
        job(kind, "a", seeds=(4,), loras=[(f"{kind}/a", 1.0)]),
        job(kind, "b", seeds=(4,), loras=[(f"{kind}/b", 0.8)]),
        job(kind, "none", seeds=(4,)),
    ]
    together, results = images_of(engine, *jobs)
    assert [result.batch_images for result in results] == [3, 3, 3], "one call for all three"
    for single, batched in zip(jobs, together):
        assert differ(batched[0], images_of(engine, single)[0][0][0]) <= 1.0, (kind, single.request_id)
    assert differ(together[0][0], together[2][0]) > 1


def test_a_lora_on_layers_that_see_all_images_as_one_sequence_gets_calls_of_its_own(engine, family_dirs, lora_root):
    """Z-Image embeds the patches of every image of a call as one flattened sequence: an adapter
    on its patch embedder cannot be routed per image, and falls back to calls of its own."""
    save_random_lora(
        family_dirs["z-image"], lora_root / "z-image" / "embedder", seed=5, magnitude=0.5, target_modules=["all_x_embedder.2-1"]
    )
    jobs = [job("z-image", "embedder", seeds=(4,), loras=[("z-image/embedder", 1.0)]), job("z-image", "none", seeds=(4,))]
    together, _ = images_of(engine, *jobs)
    assert not engine.models.get("z-image")[1].resolve("z-image/embedder").routable
    again, results = images_of(engine, *jobs)
    assert [result.batch_images for result in results] == [1, 1]
    for single, batched, repeated in zip(jobs, together, again):
        alone = images_of(engine, single)[0][0][0]
        assert differ(batched[0], alone) <= 1.0 and differ(repeated[0], alone) <= 1.0
    assert differ(together[0][0], together[1][0]) > 1


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_a_lora_file_as_published_loads_through_lora_path(engine, family_dirs, lora_root, kind):
    """One `.safetensors` file with diffusers' key names (`unet.…` / `transformer.…lora_A.weight`)
    and no metadata, as adapters for SDXL and FLUX.1 are published."""
    folder = save_random_lora(
        family_dirs[kind], lora_root / kind / "published", seed=3, magnitude=LORA_MAGNITUDE.get(kind, 0.5), with_metadata=False
    )
    path = f"{kind}/published/pytorch_lora_weights.safetensors"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    base = image(engine, kind, seeds=(2,))
    assert differ(image(engine, kind, seeds=(2,), loras=[(path, 1.0)]), base) > 1
    assert np.array_equal(image(engine, kind, seeds=(2,), loras=[(path, 0.0)]), base)


# --- edits --------------------------------------------------------------------------------------------


def edit(client, kind, source, mask=None, strength=None, seed=3, n=1):
    extra = {"num_inference_steps": 10, "seed": seed, **({"strength": strength} if strength else {})}
    files = {"mask": ("mask.png", png(mask), "image/png")} if mask is not None else {}
    response = run(
        client.images.edit(
            model=kind, image=("scene.png", png(source), "image/png"), prompt="a green circle", n=n,
            response_format="b64_json", extra_body=extra, **files,
        )
    )  # fmt: skip
    return [decode(item) for item in response.data]


@pytest.mark.parametrize("kind", FAMILIES)
def test_image_to_image_on_edits(client, kind):
    if kind not in EDITING_FAMILIES:
        with pytest.raises(openai.BadRequestError) as refused:
            edit(client, kind, scene())
        assert refused.value.body["param"] == "image" and "cannot do image-to-image" in refused.value.body["message"]
        return
    source = np.asarray(scene(), dtype=np.int16)
    gentle, full = edit(client, kind, scene(), strength=0.1)[0], edit(client, kind, scene(), strength=1.0)[0]
    assert gentle.shape == (*SIZE[::-1], 3)
    if kind in PIXEL_VAE_FAMILIES:
        assert differ(gentle, source) < 25 < differ(full, source), kind  # the scene survives a gentle edit only
    inverted = edit(client, kind, ImageOps.invert(scene()), strength=0.5)[0]
    assert differ(inverted, edit(client, kind, scene(), strength=0.5)[0]) > 1, kind  # the result follows its input


@pytest.mark.parametrize("kind", FAMILIES)
def test_inpainting_on_edits(client, kind):
    if kind not in EDITING_FAMILIES:
        with pytest.raises(openai.BadRequestError) as refused:
            edit(client, kind, scene(), mask=right_half_mask())
        assert refused.value.body["param"] == "mask" and "cannot do inpainting" in refused.value.body["message"]
        return
    source = np.asarray(scene(), dtype=np.int16)
    for result in edit(client, kind, scene(), mask=right_half_mask(), n=2):
        kept, edited = np.abs(result - source)[:, : SIZE[0] // 2], np.abs(result - source)[:, SIZE[0] // 2 :]
        assert kept.mean() == 0, kind  # outside the mask: exactly the pixels sent
        assert edited.mean() > 10, kind


# --- streaming ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_streamed_partial_images_then_the_same_final_image(client, kind):
    extra = {"seed": 5, "num_inference_steps": 4}

    async def scenario():
        stream = await client.images.generate(model=kind, prompt="a star", size="64x64", stream=True, partial_images=2, extra_body=extra)
        events = [event async for event in stream]
        plain = await client.images.generate(model=kind, prompt="a star", size="64x64", response_format="b64_json", extra_body=extra)
        return events, plain

    events, plain = run(scenario())
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert events[-1].b64_json == plain.data[0].b64_json
    for event in events[:2]:
        assert Image.open(io.BytesIO(base64.b64decode(event.b64_json))).size == SIZE


@pytest.mark.parametrize("kind", FAMILIES)
def test_preview_decoding_matches_the_pipelines_own_decoding(engine, kind, monkeypatch):
    """The final latents, decoded as previews are (packed latents unpacked, the VAE's own scaling,
    shift or per-channel statistics) but at full resolution, look like the pipeline's own final
    image: block by block (8×8 pixels), as close as the resampling of Sana's and PixArt's
    resolution bins allows, and far closer than another seed's image."""
    import torch

    from hypergen.engine import previews
    from hypergen.engine.guidance import guidance_arguments

    monkeypatch.setattr(previews, "PREVIEW_LATENT_SCALE", 1.0)
    pipe = engine.models.get(kind)[0].pipe

    def generate(output_type, seed=1):
        arguments = {
            "prompt": ["a red circle"],
            "num_inference_steps": 3,
            "width": SIZE[0],
            "height": SIZE[1],
        }  # Z-Image rewrites prompt lists
        arguments.update(guidance_arguments(pipe, 4.0, None, 1))
        return pipe(**arguments, generator=[torch.Generator().manual_seed(seed)], output_type=output_type).images

    def blocks(picture):
        return picture.reshape(8, SIZE[1] // 8, 8, SIZE[0] // 8, 3).mean(axis=(1, 3))

    with torch.no_grad():
        preview = np.asarray(previews.decode_latents(pipe, generate("latent"), SIZE)[0], dtype=np.int16)
    final, other = (np.asarray(generate("pil", seed)[0], dtype=np.int16) for seed in (1, 2))
    assert preview.shape == final.shape
    assert differ(blocks(preview), blocks(final)) < 0.25 * differ(blocks(final), blocks(other)), kind


# --- memory offload -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_an_offloaded_model_comes_back_with_the_same_weights(engine, kind):
    first = image(engine, kind, seeds=(11,))
    other = "sdxl" if kind == "sd" else "sd"
    image(engine, other, seeds=(1,))
    memory = engine.status().memory
    assert kind in memory["offloaded"] and other not in memory["offloaded"]
    assert np.array_equal(image(engine, kind, seeds=(11,)), first)
    assert engine.status().memory["models"][kind]["reloads"] >= 1


# --- sizes ---------------------------------------------------------------------------------------------


def test_sides_are_multiples_of_what_each_family_takes_at_full_scale(engine):
    """With an 8× autoencoder (as the real models have) FLUX.1, SD 3.5 and Z-Image pack or
    patch latents 2×2 and take sides in multiples of 16 (SD 3.5 refuses 1000 × 1000 outright):
    the model's limits say so, and the API answers such a size with a 400 naming the nearest
    that fits (tests/unit/test_protocol.py). Sana and PixArt-Σ
    draw at their resolution bins and take any multiple of 8; the tiny models' 2× autoencoder, 8."""
    from diffusers import AutoencoderKL

    from hypergen.engine.pipelines import size_multiple

    eight_times = AutoencoderKL(
        block_out_channels=[8] * 4, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=16, norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    full_scale = {
        kind: type(pipe)(**{**pipe.components, "vae": eight_times})
        for kind in ("sd3", "flux", "z-image")
        for pipe in [engine.models.get(kind)[0].pipe]
    }
    assert {kind: size_multiple(pipe) for kind, pipe in full_scale.items()} == {"sd3": 16, "flux": 16, "z-image": 16}
    with pytest.raises(ValueError, match="divisible by 16"):
        full_scale["sd3"](prompt="x", width=1000, height=1000, num_inference_steps=1)
    served = {limits.id: limits.size_multiple for limits in engine.status().models}
    assert served["sd"] == served["sana"] == served["pixart-sigma"] == served["flux"] == 8


# --- a family that cannot work ------------------------------------------------------------------------


def test_a_pipeline_that_cannot_draw_from_a_prompt_is_a_clear_start_up_error(tmp_path):
    """An unconditional pipeline (DDPM) loads in diffusers but takes no prompt: the worker says so
    at start-up (in /health's detail) instead of failing every request with a 500."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from hypergen.engine.engine import DiffusionEngine

    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    engine = DiffusionEngine(Settings(loras="", home=tmp_path / "home"), model_path=str(tmp_path / "ddpm"))
    deadline = time.monotonic() + 60
    while not engine.models.error:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status = engine.status()
    assert not status.ready and "model failed to load" in status.detail
    assert "(DDPMPipeline) cannot be served: its pipeline takes no prompt, width, height" in status.detail

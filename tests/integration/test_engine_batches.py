"""The engine's batch policy, on a real tiny pipeline: grouping, per-image seeds, failure isolation."""

import base64
import io
import time

import numpy as np
from PIL import Image

from hypergen.protocol import GenerationJob

from .conftest import failing_pipeline


def job(request_id, prompt="a shape", seeds=(1,), size=(64, 64), negative=None, steps=3):
    return GenerationJob(
        request_id=request_id, model="tiny-sd", prompt=prompt, negative_prompt=negative, width=size[0], height=size[1],
        num_inference_steps=steps, guidance_scale=7.5, seeds=list(seeds), admitted_at=time.time(),
    )  # fmt: skip


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_a_batch_gives_each_image_what_its_request_gets_alone(engine):
    jobs = [
        job("a", "a red circle", seeds=(3, 4)),
        job("b", "a blue square", seeds=(9,), negative="green"),
        job("c", "a triangle", seeds=(5,), size=(128, 64)),
        job("d", "stars", seeds=(7,)),
    ]
    together = engine.run_batch(jobs)
    alone = [engine.run_batch([single])[0] for single in jobs]
    for batched, single in zip(together, alone):
        assert batched.error is None and len(batched.images_b64) == len(single.images_b64)
        for x, y in zip(batched.images_b64, single.images_b64):
            assert np.abs(pixels(x) - pixels(y)).mean() <= 1.0
    assert together[0].batch_images == 3  # a (2 images) and d shared one call
    assert pixels(together[2].images_b64[0]).shape == (64, 128, 3)


def test_one_failing_request_does_not_fail_the_others_in_its_call(engine):
    with failing_pipeline(engine, "poison", ValueError("this prompt breaks the pipeline")):
        results = engine.run_batch([job("ok-1", seeds=(1,)), job("bad", "poison"), job("ok-2", seeds=(2, 3))])
    assert [result.error is None for result in results] == [True, False, True]
    assert "this prompt breaks the pipeline" in results[1].error.message
    assert [len(result.images_b64) for result in results] == [1, 0, 2]


def test_jobs_are_keyed_by_server_ids_not_the_clients_request_id(engine):
    """A cancelled request's X-Request-ID used to poison every later request sending it."""
    first, second = job("same-id", seeds=(1,)), job("same-id", seeds=(2,))
    engine.cancel(first.job_id)
    dropped, served = engine.run_batch([first, second])
    assert not dropped.images_b64 and len(served.images_b64) == 1 and served.error is None


def test_an_interrupted_call_delivers_no_images_and_health_shows_it_while_busy(engine):
    import asyncio

    slow = job("slow", steps=150)

    async def scenario():
        task = asyncio.ensure_future(engine.generate([slow]))
        while not engine.status().busy:
            await asyncio.sleep(0.01)
        busy = engine.status().busy[0]
        engine.cancel(slow.job_id)
        return busy, (await task)[0]

    busy, result = asyncio.run(scenario())
    assert busy["requests"] == ["slow"] and busy["steps"] == 150 and busy["size"] == "64x64"
    assert result.images_b64 == [] and result.error.status == 499 and "interrupted" in result.error.message
    assert engine.status().busy == []


def test_a_cancel_reaches_inside_a_single_step(engine):
    """A one-step call at 256² (seconds per step here; a 1024² step on the demo model ran for
    minutes) stops at the next UNet or VAE block once its request has gone, not after the step."""
    import asyncio

    long_step = job("one-long-step", steps=1, size=(256, 256))

    async def scenario():
        task = asyncio.ensure_future(engine.generate([long_step]))
        while not engine.status().busy:
            await asyncio.sleep(0.005)
        engine.cancel(long_step.job_id)
        return (await task)[0]

    result = asyncio.run(scenario())
    assert result.images_b64 == [] and result.error.status == 499
    assert "inside step 1 of 1" in result.error.message
    assert engine.run_batch([job("after", seeds=(2,))])[0].error is None  # the pipeline is fine afterwards


def test_a_compiled_denoiser_gets_no_per_call_hooks(engine):
    """Hooks added and removed on every call would make a torch.compile'd UNet recompile each time."""
    from hypergen.engine.previews import interrupt_inside_steps

    pipe = engine.models.default.pipe
    pipe.unet._compiled_call_impl = pipe.unet._call_impl  # what nn.Module.compile sets, without compiling
    try:
        with interrupt_inside_steps(pipe, lambda: False):
            assert not any(module._forward_pre_hooks for module in pipe.unet.modules())
            assert any(module._forward_pre_hooks for module in pipe.vae.modules())
    finally:
        pipe.unet._compiled_call_impl = None

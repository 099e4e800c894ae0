"""A tiny pipeline loaded with every speed lever on still draws the same picture.

`HYPERGEN_TORCH_COMPILE` is left out: inductor's first call of the tiny UNet took 97–200 s on
these 2 CPU cores. `python -m bench.gpu --tiny` runs the compile path (with the eager backend).
"""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from hypergen.config import PipelineLevers
from hypergen.engine.pipelines import call_context, denoiser_of, load_text_to_image

ALL_BUT_COMPILE = PipelineLevers(attention_backend="flash", channels_last=True, fuse_qkv=True, vae_tiling=True, vae_slicing=True)


def draw(loaded, side: int) -> np.ndarray:
    with call_context(loaded.levers):
        images = loaded.pipe(
            prompt=["a red circle", "a blue square"], width=side, height=side, num_inference_steps=3, guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(seed) for seed in (1, 2)],
        ).images  # fmt: skip
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


@pytest.fixture(scope="module", params=["sd", "sdxl", "flux"])
def model_dir(request, tmp_path_factory):
    from hypergen.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("levers") / request.param, kind=request.param, seed=3)


def test_every_lever_but_compile_keeps_the_picture(model_dir):
    plain = load_text_to_image("plain", str(model_dir))
    fast = load_text_to_image("fast", str(model_dir), levers=ALL_BUT_COMPILE)
    assert fast.levers == ALL_BUT_COMPILE and plain.levers == PipelineLevers()
    assert next(denoiser_of(fast.pipe).parameters()).data is not next(denoiser_of(plain.pipe).parameters()).data
    # Up to the VAE's tile size nothing is tiled: the same picture up to float rounding.
    tile = plain.pipe.vae.config.sample_size
    assert np.abs(draw(fast, tile) - draw(plain, tile)).max() <= 2.0
    # Above it the picture is decoded in blended tiles: same shape, not the same pixels.
    assert draw(fast, 2 * tile).shape == draw(plain, 2 * tile).shape == (2, 2 * tile, 2 * tile, 3)


def test_edit_pipelines_share_the_levered_weights(model_dir):
    fast = load_text_to_image("fast", str(model_dir), levers=ALL_BUT_COMPILE)
    for mode, pipe in fast.modes.items():
        assert denoiser_of(pipe) is denoiser_of(fast.pipe), mode


def test_the_attention_context_restores_the_kernel_choice():
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    with sdpa_kernel([SDPBackend.MATH]):
        before = [flag() for flag in flags]
        with call_context(PipelineLevers(attention_backend="flash")):
            assert [flag() for flag in flags] == [True, True]  # flash first, the rest as fallbacks
        assert [flag() for flag in flags] == before == [False, True]


def test_the_engine_loads_with_the_settings_levers_and_runs_calls_in_their_context(tiny_sd_dir, tmp_path, monkeypatch):
    import hypergen.engine.calls as calls
    from hypergen.config import Settings
    from hypergen.protocol import GenerationJob
    from tests.integration.conftest import start_engine

    entered = []
    monkeypatch.setattr(calls, "call_context", lambda levers: entered.append(levers) or call_context(levers))
    settings = Settings(home=tmp_path, loras="", attention_backend="math", vae_slicing=True, channels_last=True)
    engine = start_engine(settings, tiny_sd_dir)
    assert engine.models.default.levers == settings.levers
    job = GenerationJob(request_id="r", model="m", prompt="a", width=64, height=64, num_inference_steps=2,
                        guidance_scale=5.0, seeds=[1], admitted_at=0.0)  # fmt: skip
    assert engine.run_batch([job])[0].error is None
    assert entered and entered[-1].attention_backend == "math"

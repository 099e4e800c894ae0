"""The speed-lever settings (HYPERGEN_ATTENTION_BACKEND, _CHANNELS_LAST, _TORCH_COMPILE, _FUSE_QKV,
_VAE_TILING, _VAE_SLICING): parsed once, refused at start with the variable's name when wrong."""

import pytest
from pydantic import ValidationError

from hypergen.config import PipelineLevers, Settings, load_settings

LEVER_ENV = ("HYPERGEN_ATTENTION_BACKEND", "HYPERGEN_CHANNELS_LAST", "HYPERGEN_TORCH_COMPILE", "HYPERGEN_FUSE_QKV",
             "HYPERGEN_VAE_TILING", "HYPERGEN_VAE_SLICING")  # fmt: skip


@pytest.fixture(autouse=True)
def no_levers_in_the_environment(monkeypatch):
    for name in (*LEVER_ENV, "HYPERGEN_LORAS", "HYPERGEN_LORA_DIRS", "HYPERGEN_MODEL", "HYPERGEN_MODELS"):
        monkeypatch.delenv(name, raising=False)


def test_all_levers_are_off_by_default():
    assert Settings().levers == PipelineLevers()
    assert PipelineLevers().enabled() == []


def test_levers_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("HYPERGEN_ATTENTION_BACKEND", " Flash ")
    for name, value in (("CHANNELS_LAST", "true"), ("TORCH_COMPILE", "1"), ("VAE_TILING", "on"), ("VAE_SLICING", "yes")):
        monkeypatch.setenv(f"HYPERGEN_{name}", value)
    monkeypatch.setenv("HYPERGEN_FUSE_QKV", "off")
    levers = load_settings().levers
    assert levers == PipelineLevers("flash", channels_last=True, torch_compile=True, vae_tiling=True, vae_slicing=True)
    assert levers.enabled() == ["attention_backend=flash", "channels_last", "torch_compile", "vae_tiling", "vae_slicing"]


def test_bentoml_arguments_set_levers_too(monkeypatch):
    monkeypatch.setenv("HYPERGEN_VAE_TILING", "false")
    assert load_settings({"vae_tiling": "true", "attention_backend": "cudnn"}).levers.enabled() == ["attention_backend=cudnn", "vae_tiling"]


def test_an_unknown_attention_backend_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv("HYPERGEN_ATTENTION_BACKEND", "xformers")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    message = str(caught.value)
    assert "HYPERGEN_ATTENTION_BACKEND='xformers'" in message
    assert "default, flash, efficient, math, cudnn" in message


@pytest.mark.parametrize("name", ["CHANNELS_LAST", "TORCH_COMPILE", "FUSE_QKV", "VAE_TILING", "VAE_SLICING"])
def test_a_lever_flag_that_is_not_a_boolean_names_the_variable(monkeypatch, name):
    monkeypatch.setenv(f"HYPERGEN_{name}", "fast")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    assert f"HYPERGEN_{name}='fast' is not a boolean" in str(caught.value)
    assert "true, false, 1, 0, yes, no, on, off" in str(caught.value)


def test_fused_projections_refuse_lora_adapters():
    # The embedded model's adapter is loaded unless HYPERGEN_LORAS="" turns it off.
    for adapters in ({}, {"loras": "style=/loras/style"}, {"loras": "", "lora_dirs": "/loras"}):
        with pytest.raises(ValidationError, match="HYPERGEN_FUSE_QKV=true cannot serve LoRA adapters"):
            Settings(fuse_qkv=True, **adapters)
    assert Settings(fuse_qkv=True, loras="").levers.fuse_qkv
    assert Settings(fuse_qkv=True, model="/models/sd15").levers.fuse_qkv  # another model: no adapter by default


def test_the_preferred_attention_kernel_is_tried_first_and_the_rest_stay_as_fallbacks():
    from torch.nn.attention import SDPBackend

    from hypergen.engine.pipelines import sdpa_priority

    assert sdpa_priority("default") is None
    assert sdpa_priority("cudnn") == [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    assert sdpa_priority("math")[0] == SDPBackend.MATH and len(sdpa_priority("math")) == 4

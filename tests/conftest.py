"""Shared fixtures: tiny diffusers pipelines saved to disk and the OpenAI schema validator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "openai-images-openapi.json"

# Keep test processes off the network and off the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("HYPERGEN_RUN_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: set HYPERGEN_RUN_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def openai_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="session")
def validate_openai(openai_schema):
    """validate_openai("ImagesResponse", body) raises if the body does not match OpenAI's schema."""
    import jsonschema

    def validate(name: str, body: dict) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": openai_schema["components"]}
        jsonschema.validate(body, schema)

    return validate


@pytest.fixture(scope="session")
def hypergen_home(tmp_path_factory) -> Path:
    """One HYPERGEN_HOME for the session: the embedded default model is built once."""
    return tmp_path_factory.mktemp("hypergen-home")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    from hypergen.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", kind="sd", seed=1, num_inference_steps=4)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from hypergen.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", kind="sdxl", seed=2, num_inference_steps=4)


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    from hypergen.testing.videos import save_tiny_video_family

    return save_tiny_video_family("wan", tmp_path_factory.mktemp("videos") / "tiny-wan", max_frames=17, max_side=64)


@pytest.fixture(scope="session")
def tiny_ltx_dir(tmp_path_factory):
    from hypergen.testing.videos import save_tiny_video_family

    return save_tiny_video_family("ltx", tmp_path_factory.mktemp("videos") / "tiny-ltx", max_frames=17, max_side=64)


@pytest.fixture(scope="session")
def tiny_animatediff_dir(tmp_path_factory):
    from hypergen.testing.videos import save_tiny_video_family

    return save_tiny_video_family("animatediff", tmp_path_factory.mktemp("videos") / "tiny-animatediff", max_frames=16, max_side=64)

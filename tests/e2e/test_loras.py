"""LoRA adapters through `bentoml serve` and the official client (extras via `extra_body`)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading

import httpx
import numpy as np
import openai
import pytest
import yaml
from openai import OpenAI
from PIL import Image

from hypergen.testing import save_random_lora
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lora_dir(tiny_sd_dir, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed-loras")
    for index, name in enumerate(["style", "ink"]):
        save_random_lora(tiny_sd_dir, allowed / name, seed=index + 20, magnitude=0.5)
    return allowed


@pytest.fixture(scope="module")
def lora_server(start_server, tiny_sd_dir, lora_dir):
    server = start_server(
        {"HYPERGEN_MODEL": str(tiny_sd_dir), "HYPERGEN_LORAS": f"style={lora_dir / 'style'}", "HYPERGEN_LORA_DIRS": str(lora_dir)}
    )
    server.wait_ready()
    return server


def generate(client: OpenAI, seed: int = 3, **extra) -> np.ndarray:
    response = client.images.generate(
        prompt="a shape", size="64x64", response_format="b64_json", extra_body={"seed": seed, "num_inference_steps": 3, **extra}
    )
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB"), dtype=np.int16)


def test_adapters_by_name_and_by_path(lora_server, lora_dir):
    client = OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="x", max_retries=0)
    base = generate(client)
    styled = generate(client, lora_path="style")
    assert np.abs(styled - base).mean() > 2
    assert np.array_equal(generate(client, lora_path="style", lora_scale=0.0), base)
    inked = generate(client, lora_path="ink")  # a path inside HYPERGEN_LORA_DIRS, loaded on first use
    assert np.abs(inked - base).mean() > 2 and np.abs(inked - styled).mean() > 2
    assert np.array_equal(generate(client), base)
    for bad in ("../../etc", "/etc/passwd", "nope"):
        with pytest.raises(openai.BadRequestError) as caught:
            generate(client, lora_path=bad)
        assert caught.value.body["param"] == "lora_path"
    listed = httpx.get(f"{lora_server.base_url}/v1/loras").json()["data"]
    assert {"style", "ink"} <= {item["name"] for item in listed}  # relative to its allowed dir
    assert not any(str(lora_dir) in str(item) for item in listed)  # no server paths shown


def test_hot_load_and_unload_while_requests_stream(lora_server):
    client = OpenAI(base_url=f"{lora_server.base_url}/v1", api_key="x", max_retries=0)
    base = generate(client, seed=8)
    outcomes: list[bool] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set() and len(outcomes) < 60:
            outcomes.append(bool(np.array_equal(generate(client, seed=8), base)))

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        for _ in range(3):
            loaded = httpx.post(f"{lora_server.base_url}/v1/loras", json={"name": "hot", "path": "ink", "scale": 1.0}, timeout=60)
            assert loaded.status_code == 200, loaded.text
            assert np.abs(generate(client, seed=8, lora_path="hot") - base).mean() > 2
            assert httpx.delete(f"{lora_server.base_url}/v1/loras/hot", timeout=60).status_code == 200
    finally:
        stop.set()
        worker.join()
    assert outcomes and all(outcomes), f"{outcomes.count(False)} of {len(outcomes)} base images changed"
    with pytest.raises(openai.BadRequestError):
        generate(client, lora_path="hot")


def test_a_built_bento_carries_its_adapters(start_server, tiny_sd_dir, lora_dir, bentoml_home, tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "HYPERGEN_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    build = subprocess.run(  # the adapters were made for tiny_sd_dir's UNet
        [sys.executable, "-m", "hypergen.cli", "build", str(tiny_sd_dir), "--lora", f"style={lora_dir / 'style'}:0.7"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    bento_yaml = max((bentoml_home / "bentos" / "hypergen").glob("*/bento.yaml"), key=lambda path: path.stat().st_mtime)
    info = yaml.safe_load(bento_yaml.read_text())
    worker = next(service for service in info["services"] if service["name"] == "hypergen-worker")
    tags = [model["tag"] for model in worker["models"]]
    lora_tag = next(tag for tag in tags if tag.startswith("hypergen-lora-style:"))
    assert info["args"]["loras"] == f"style={lora_tag}:0.7"
    server = start_server({"HYPERGEN_HOME": str(tmp_path / "empty")}, target=f"hypergen:{bento_yaml.parent.name}")
    server.wait_ready()
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    assert np.abs(generate(client, lora_path="style") - generate(client)).mean() > 0.5
    listed = httpx.get(f"{server.base_url}/v1/loras").json()["data"]
    assert [(item["name"], item["source"], item["pinned"]) for item in listed] == [("style", lora_tag, True)]
    server.stop()

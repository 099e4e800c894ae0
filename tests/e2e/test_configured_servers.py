"""Servers started with settings: another architecture, API keys, a tight queue, a broken model,
and a built Bento that carries its model."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import threading

import httpx
import openai
import pytest
import yaml
from openai import OpenAI
from PIL import Image

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

KEYS = ("k1-secret-value", "k2-other-value")


@pytest.fixture(scope="module")
def sdxl_server(start_server, tiny_sdxl_dir):
    """A tiny SDXL-layout model (two text encoders), API keys, one request in flight, one waiting."""
    server = start_server(
        {
            "HYPERGEN_MODEL": str(tiny_sdxl_dir),
            "HYPERGEN_API_KEYS": ",".join(KEYS),
            "HYPERGEN_MAX_QUEUE": "1",
            "HYPERGEN_MAX_BATCH_SIZE": "1",
        }
    )
    server.wait_ready()
    return server


def test_another_architecture_is_served_from_a_local_directory(sdxl_server):
    client = OpenAI(base_url=f"{sdxl_server.base_url}/v1", api_key=KEYS[0], max_retries=0)
    assert [model.id for model in client.models.list().data] == ["tiny-sdxl"]
    response = client.images.generate(prompt="a cat", model="tiny-sdxl", n=2, size="64x64", response_format="b64_json")
    sizes = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size for item in response.data]
    assert sizes == [(64, 64), (64, 64)]
    assert "loaded from " + str(sdxl_server_model_dir(sdxl_server)) in sdxl_server.log()


def sdxl_server_model_dir(server) -> str:
    line = next(line for line in server.log().splitlines() if "model 'tiny-sdxl' loaded from" in line)
    return line.split("loaded from ")[1].split(" on ")[0]


def test_api_keys_are_required_and_never_logged(sdxl_server):
    client = OpenAI(base_url=f"{sdxl_server.base_url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="a", size="64x64")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    no_header = httpx.get(f"{sdxl_server.base_url}/v1/models")
    assert no_header.status_code == 401 and no_header.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{sdxl_server.base_url}/health").status_code == 200
    good = OpenAI(base_url=f"{sdxl_server.base_url}/v1", api_key=KEYS[1], max_retries=0)
    assert len(good.images.generate(prompt="a", size="64x64", extra_body={"num_inference_steps": 2}).data) == 1
    log = sdxl_server.log()
    assert all(key not in log for key in KEYS) and "wrong-key" not in log


def test_a_full_queue_is_refused_at_once_and_admitted_requests_finish(sdxl_server):
    """One request runs, one waits (HYPERGEN_MAX_QUEUE=1); the rest get 503 queue_full before
    the running one is done."""
    finished: list[tuple[int, dict, dict]] = []
    lock = threading.Lock()

    def send(index: int) -> None:
        response = httpx.post(
            f"{sdxl_server.base_url}/v1/images/generations",
            json={"prompt": f"p{index}", "size": "64x64", "num_inference_steps": 150, "response_format": "b64_json"},
            headers={"Authorization": f"Bearer {KEYS[0]}"},
            timeout=300,
        )
        with lock:
            finished.append((response.status_code, dict(response.headers), response.json()))

    threads = [threading.Thread(target=send, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = [code for code, _, _ in finished]
    assert sorted(codes) == [200, 200, 503, 503, 503, 503]
    assert codes.index(200) == 4, f"503s must come back before any admitted request finishes: {codes}"
    for code, headers, body in finished:
        if code == 503:
            assert body["error"]["code"] == "queue_full" and int(headers["retry-after"]) >= 1
            assert headers["x-request-id"]


def test_a_model_that_cannot_load_keeps_health_503_with_the_reason(start_server, tmp_path):
    server = start_server({"HYPERGEN_MODEL": str(tmp_path / "no-such-model")})
    health = server.wait_until(lambda response: "failed to load" in response.text)
    assert health.status_code == 503 and health.json()["status"] == "loading"
    attempt = httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "a"}, timeout=30)
    assert attempt.status_code == 503 and attempt.json()["error"]["code"] == "not_ready"
    assert "retry-after" in attempt.headers
    server.stop()


def test_a_built_bento_carries_the_model_and_serves_it(start_server, bentoml_home, tmp_path):
    env = {"BENTOML_HOME": str(bentoml_home), "HYPERGEN_HOME": str(tmp_path / "build-home"), "BENTOML_DO_NOT_TRACK": "true"}
    built = []
    for _ in range(2):  # the second build stores no new model versions
        build = subprocess.run(
            [sys.executable, "-m", "hypergen.cli", "build"], cwd=ROOT, env={**__import__("os").environ, **env},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert build.returncode == 0, build.stdout + build.stderr
        tag = re.search(r'Successfully built Bento\(tag="hypergen:(\w+)"\)', build.stdout).group(1)
        built.append(yaml.safe_load((bentoml_home / "bentos" / "hypergen" / tag / "bento.yaml").read_text()))
    first, info = built
    assert first["args"] == info["args"]
    for name in ("hypergen-tiny-sd", "hypergen-lora-outline"):
        assert len(list((bentoml_home / "models" / name).glob("*/model.yaml"))) == 1, name
    # The store carries the weights; the Bento's src does not carry them a second time.
    src = bentoml_home / "bentos" / "hypergen" / info["version"] / "src"
    assert (src / "hypergen" / "service.py").is_file() and not (src / "hypergen" / "assets").exists()
    worker = next(service for service in info["services"] if service["name"] == "hypergen-worker")
    model_tag = worker["models"][0]["tag"]
    assert model_tag.startswith("hypergen-tiny-sd:") and info["args"]["model"] == model_tag
    # The embedded model's `outline` adapter travels with it, as a BentoML model too.
    lora_tag = next(model["tag"] for model in worker["models"] if model["tag"].startswith("hypergen-lora-outline:"))
    assert info["args"]["loras"] == f"outline={lora_tag}:1.0"
    # A fresh HYPERGEN_HOME: the weights can only come from the BentoML model the Bento references.
    server = start_server({"HYPERGEN_HOME": str(tmp_path / "empty-home")}, target="hypergen:latest")
    server.wait_ready()
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    assert [model.id for model in client.models.list().data] == ["hypergen-tiny-sd"]
    assert len(client.images.generate(prompt="a", size="64x64", extra_body={"num_inference_steps": 2}).data) == 1
    listed = httpx.get(f"{server.base_url}/v1/loras").json()["data"]
    assert [(item["name"], item["source"], item["pinned"]) for item in listed] == [("outline", lora_tag, True)]
    assert not (tmp_path / "empty-home" / "models").exists()
    server.stop()


def test_several_models_in_one_server_within_a_memory_budget(start_server, tiny_sd_dir, tiny_sdxl_dir):
    """Two models; a budget smaller than either, so only the model in use stays on the device."""
    server = start_server({"HYPERGEN_MODELS": f"sd={tiny_sd_dir},xl={tiny_sdxl_dir}", "HYPERGEN_MEMORY_BUDGET_MB": "0.01"})
    health = server.wait_ready().json()
    assert health["models"] == ["sd", "xl"] and health["model"] == "sd"
    assert health["memory"]["budget_mb"] == 0.01 and health["memory"]["offloaded"] == ["xl"]
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    assert [model.id for model in client.models.list().data] == ["sd", "xl"]

    def pixels(model: str) -> bytes:
        response = client.images.generate(
            model=model, prompt="a", size="64x64", response_format="b64_json", extra_body={"num_inference_steps": 2, "seed": 5}
        )
        return Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).tobytes()

    first_xl = pixels("xl")
    # /health reflects the worker's status within a few seconds (the API caches it briefly)
    server.wait_until(lambda response: response.json()["memory"]["offloaded"] == ["sd"], timeout=20)
    assert pixels("sd") != first_xl  # same seed, another model: another image
    assert pixels("xl") == first_xl  # offloaded and brought back: the same weights
    health = server.wait_until(lambda response: response.json()["memory"]["models"]["xl"]["reloads"] == 2, timeout=20)
    assert health.json()["memory"]["models"]["xl"]["offloads"] == 2 and health.json()["memory"]["offloaded"] == ["sd"]
    moves = [line for line in httpx.get(f"{server.base_url}/metrics").text.splitlines() if line.startswith("hypergen_model_moves_total{")]
    assert any('model="xl"' in line and 'direction="reload"' in line and line.endswith(" 2.0") for line in moves), moves
    assert "offloaded to host memory" in server.log()
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="a")
    server.stop()

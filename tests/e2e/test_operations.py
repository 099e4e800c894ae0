"""Operations through `bentoml serve`: Prometheus metrics and rate limits with the official client."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def limited_server(start_server):
    server = start_server({"HYPERGEN_RATE_LIMIT": "1/second"})
    server.wait_ready()
    return server


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 if absent."""
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(selector) + r"\}" if labels else r"(?:\{\})?") + r" ([0-9.e+]+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def test_rate_limit_429_and_the_clients_retry_honours_retry_after(limited_server):
    strict = OpenAI(base_url=f"{limited_server.base_url}/v1", api_key="x", max_retries=0)
    body = dict(prompt="a", size="64x64", extra_body={"num_inference_steps": 1})
    raw = strict.images.with_raw_response.generate(**body)
    assert raw.headers["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(openai.RateLimitError) as caught:
        strict.images.generate(**body)
    assert caught.value.body["code"] == "rate_limit_exceeded" and caught.value.response.headers["retry-after"] == "1"
    patient = OpenAI(base_url=f"{limited_server.base_url}/v1", api_key="x", max_retries=3)
    assert len(patient.images.generate(**body).data) == 1  # retried after Retry-After


def test_metrics_are_exported_in_prometheus_text(limited_server):
    client = OpenAI(base_url=f"{limited_server.base_url}/v1", api_key="x", max_retries=3)
    client.images.generate(prompt="a", n=2, size="64x64", extra_body={"num_inference_steps": 1})
    text = httpx.get(f"{limited_server.base_url}/metrics", timeout=10).text
    assert metric(text, "hypergen_requests_total", route="/v1/images/generations", status="200") >= 1
    assert metric(text, "hypergen_requests_total", route="/v1/images/generations", status="429") >= 1
    assert metric(text, "hypergen_rejected_total", reason="rate_limited") >= 1
    assert metric(text, "hypergen_images_generated_total", mode="text-to-image") >= 2
    assert metric(text, "hypergen_batch_images_count") >= 1 and metric(text, "hypergen_queue_wait_seconds_count") >= 1
    assert "hypergen_queue_depth" in text and "hypergen_generation_seconds_bucket" in text


def test_two_servers_sharing_one_bentoml_home_keep_their_own_metrics(start_server, tmp_path):
    """BentoML keeps Prometheus' multiprocess files in BENTOML_HOME/prometheus_multiproc_dir and
    empties it when a server starts: a second server deleted the first one's files, after which
    the first one's /metrics showed the second one's counts."""
    home = tmp_path / "shared-bentoml-home"
    first = start_server({"BENTOML_HOME": str(home)})
    first.wait_ready()
    generate = dict(prompt="a", size="64x64", extra_body={"num_inference_steps": 1})
    OpenAI(base_url=f"{first.base_url}/v1", api_key="x", max_retries=0).images.generate(**generate)
    second = start_server({"BENTOML_HOME": str(home)})
    second.wait_ready()
    for _ in range(2):
        OpenAI(base_url=f"{second.base_url}/v1", api_key="x", max_retries=0).images.generate(**generate)
    for server, requests in ((first, 1), (second, 2)):
        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        assert metric(text, "hypergen_requests_total", route="/v1/images/generations", status="200") == requests, server.base_url
    directories = sorted((home / "prometheus").iterdir())
    assert len(directories) == 2 and all(any(directory.iterdir()) for directory in directories)
    first.stop()
    second.stop()
    assert not any((home / "prometheus").iterdir())  # each server removes its own directory on exit

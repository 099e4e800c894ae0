"""The GPU benchmark's harness runs end to end on the CPU with tiny pipelines (`--tiny`): every
section is measured and reported. Timings are not asserted; only a GPU run's numbers mean anything."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

LEVER_SETTINGS = {
    "HYPERGEN_ATTENTION_BACKEND=flash", "HYPERGEN_ATTENTION_BACKEND=efficient", "HYPERGEN_ATTENTION_BACKEND=math",
    "HYPERGEN_ATTENTION_BACKEND=cudnn", "HYPERGEN_CHANNELS_LAST=true", "HYPERGEN_FUSE_QKV=true",
}  # fmt: skip


def test_gpu_bench_tiny_run_reports_every_section(tmp_path):
    out = tmp_path / "gpu"
    # A budget far above the run's length, so a busy machine skips nothing.
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(out), "--budget-s", "3600"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["mode"] == "tiny (harness check)" and not result.get("skipped"), result.get("skipped")
    assert not [note for note in result.get("notes", []) if "failed" in note], result["notes"]

    assert set(result["flops"]) == {"sd15", "sdxl", "flux"}
    assert result["flops"]["sdxl"]["tflop_per_image_step"] > result["flops"]["sd15"]["tflop_per_image_step"] > 0
    for family in ("sd15", "sdxl", "flux"):
        model = result["models"][family]
        assert set(model["batches"]) == {"1", "2"}
        assert all(row["images_per_s"] > 0 and row["tflop_per_step"] > 0 for row in model["batches"].values())
        assert model["denoiser"]["tflops"] > 0
    assert 0 < result["encoding"]["png_share"] < 1

    server = result["server"]
    assert [level["concurrency"] for level in server["levels"]] == [1, 4, 8]
    assert all(level["server_over_bare"] > 0 for level in server["levels"])
    assert 0 < server["encoding_share"] < 1
    memory = server["memory"]
    assert memory["requests"] == 8 and memory["ready"]["server_rss_mb"] > 0 and memory["after"]["server_rss_mb"] > 0

    levers = result["levers"]
    assert {row["env"] for row in levers["rows"]} - {""} == LEVER_SETTINGS
    assert all("seconds_per_call" in row for row in levers["rows"]), levers["rows"]
    assert [row["setting"] for row in levers["vae"]] == ["off", "tiling", "slicing", "tiling + slicing"]
    assert levers["compile"]["first_call_s"] > 0

    report = (out / "results.md").read_text()
    assert report.startswith("# HyperGen GPU benchmark — CPU")
    for heading in ("## FLOPs per denoising step", "## Bare pipeline", "## Encoding at 1024x1024", "## Server", "## Levers on vs off"):
        assert heading in report
    assert "HYPERGEN_TORCH_COMPILE=true" in report and "before 8 requests" in report

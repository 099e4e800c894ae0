"""The benchmark harness runs end to end (a few seconds, tiny model); numbers are not asserted."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_bench_quick_run_writes_json_and_markdown(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--name", "smoke", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert result["bare"]["batch_1"]["images_per_s"] > 0
    assert [level["concurrency"] for level in result["server"]] == [1, 2]
    assert result["batching_gain"]["ratio"] > 0 and set(result["encoding"]) == {"png", "jpeg", "webp"}
    table = (tmp_path / "smoke.md").read_text()
    assert "batching gain" in table and "dispatch overhead" in table

"""`hypergen build` stores a model's weights in the BentoML store once, not once per build."""

import os
import subprocess
import sys

SCRIPT = """
import pathlib, sys
from hypergen.bento import store_once
weights = pathlib.Path(sys.argv[1]); (weights / "a.json").write_text("{}")
first, second = store_once("m", weights, {}, {}), store_once("m", weights, {}, {})
(weights / "a.json").write_text('{"changed": 1}')
third = store_once("m", weights, {}, {})
print(first == second, third != first)
"""


def test_the_same_weights_are_stored_once_and_changed_ones_anew(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    output = subprocess.run([sys.executable, "-c", SCRIPT, str(weights)], env=env, capture_output=True, text=True, check=True)
    assert output.stdout.split() == ["True", "True"]

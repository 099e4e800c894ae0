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


def test_a_bento_leaves_out_the_source_tree_copies_of_what_the_store_carries(tmp_path):
    from hypergen.bento import without_stored_copies

    root = tmp_path / "project"
    (root / "hypergen" / "assets" / "demo-model").mkdir(parents=True)
    (root / "hypergen" / "assets" / "lora.safetensors").write_bytes(b"x")
    elsewhere = tmp_path / "models" / "sd15"
    elsewhere.mkdir(parents=True)
    carried = [root / "hypergen" / "assets" / "demo-model", root / "hypergen" / "assets" / "lora.safetensors", elsewhere]
    bentofile = {"include": ["hypergen/**"], "exclude": ["tests/"]}
    built = without_stored_copies(bentofile, carried, root)
    # Only paths inside the build context can be in the Bento's src; a directory is excluded whole.
    assert built["exclude"] == ["tests/", "/hypergen/assets/demo-model/", "/hypergen/assets/lora.safetensors"]
    assert bentofile["exclude"] == ["tests/"] and without_stored_copies(built, carried, root) == built

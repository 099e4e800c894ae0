"""The two processes stay apart: the API never imports torch, diffusers or the engine; the
engine never imports FastAPI or the API. Checked in a fresh interpreter, by what it loaded."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import hypergen.api
import hypergen.engine


def modules_of(package) -> list[str]:
    return [f"{package.__name__}.{info.name}" for info in pkgutil.walk_packages(package.__path__)]


def loaded_after_importing(modules: list[str]) -> set[str]:
    script = f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint(json.dumps(sorted(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return set(json.loads(output))


def test_the_api_process_imports_no_torch_diffusers_or_engine():
    loaded = loaded_after_importing(modules_of(hypergen.api))
    assert not {name for name in loaded if name.split(".")[0] in ("torch", "diffusers", "transformers", "peft")}
    assert not {name for name in loaded if name.startswith("hypergen.engine")}


def test_the_engine_imports_no_fastapi_or_api():
    loaded = loaded_after_importing(modules_of(hypergen.engine))
    assert not {name for name in loaded if name.split(".")[0] in ("fastapi", "starlette")}
    assert not {name for name in loaded if name.startswith("hypergen.api") or name == "hypergen.errors"}

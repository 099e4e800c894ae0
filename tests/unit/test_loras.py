import os

import pytest

from hypergen.config import EMBEDDED_LORA_DIR, EMBEDDED_LORA_NAME, Settings, parse_lora_specs
from hypergen.engine.loras import LoraError, adapter_key, resolve_allowed_path


def test_lora_specs_parse_names_sources_and_scales():
    specs = parse_lora_specs("style=/loras/style:0.8, ink=org/ink-lora,bento=hypergen-lora-x:v1abc:1.5")
    assert [(s.name, s.source, s.scale) for s in specs] == [
        ("style", "/loras/style", 0.8),
        ("ink", "org/ink-lora", 1.0),
        ("bento", "hypergen-lora-x:v1abc", 1.5),
    ]


@pytest.mark.parametrize(
    "text, fragment", [("nosource", "NAME=PATH"), ("a b=/x", "may only use"), ("a=/x:3", "outside 0.0"), ("a=/x,a=/y", "twice")]
)
def test_bad_lora_specs_are_refused_at_start(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_lora_specs(text)
    with pytest.raises(ValueError):
        Settings(loras=text)


@pytest.fixture
def lora_tree(tmp_path):
    allowed = tmp_path / "loras"
    (allowed / "style").mkdir(parents=True)
    (allowed / "style" / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    (allowed / "single.safetensors").write_bytes(b"w")
    (allowed / "empty").mkdir()
    (allowed / "notes.txt").write_text("x")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    os.symlink(outside, allowed / "escape")
    return allowed, outside


def test_paths_inside_allowed_directories_resolve(lora_tree):
    allowed, _ = lora_tree
    assert resolve_allowed_path("style", [allowed]) == (allowed / "style").resolve()
    assert resolve_allowed_path(str(allowed / "single.safetensors"), [allowed]).name == "single.safetensors"
    assert resolve_allowed_path("style/../single.safetensors", [allowed]).name == "single.safetensors"


@pytest.mark.parametrize(
    "requested, fragment",
    [
        ("../secret", "outside"),
        ("style/../../secret", "outside"),
        ("escape", "outside"),  # a symlink that leads out
        ("/etc/passwd", "outside"),
        ("missing", "No LoRA weights"),
        ("empty", "No LoRA weights"),
        ("notes.txt", "No LoRA weights"),
    ],
)
def test_traversal_symlinks_and_missing_files_are_refused(lora_tree, requested, fragment):
    allowed, _ = lora_tree
    with pytest.raises(LoraError, match=fragment):
        resolve_allowed_path(requested, [allowed])


def test_paths_are_refused_when_no_directory_is_allowed(lora_tree):
    with pytest.raises(LoraError, match="HYPERGEN_LORA_DIRS is not set"):
        resolve_allowed_path("style", [])


def test_adapter_keys_are_module_safe():
    key = adapter_key("/some/path.with.dots/x")
    assert key.startswith("lora_") and "." not in key and "/" not in key


def test_the_embedded_demo_model_comes_with_its_outline_adapter_unless_configured_otherwise(tmp_path):
    assert [(spec.name, spec.source) for spec in Settings().lora_specs] == [(EMBEDDED_LORA_NAME, str(EMBEDDED_LORA_DIR))]
    assert (EMBEDDED_LORA_DIR / "pytorch_lora_weights.safetensors").is_file()  # shipped in the package
    assert Settings(loras="").lora_specs == []  # HYPERGEN_LORAS="" turns it off
    assert [spec.name for spec in Settings(loras=f"ink={tmp_path}").lora_specs] == ["ink"]
    assert Settings(model=str(tmp_path)).lora_specs == []  # made for the demo model's UNet only
    assert Settings(models=f"a={tmp_path}").lora_specs == []

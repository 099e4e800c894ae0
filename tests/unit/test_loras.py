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


def _lora_model(use_dora: bool = False):
    """Linear and Conv layers with two random peft adapters, 'a' and 'b'."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Flatten(2), torch.nn.Linear(16, 16))
    for name, rank in (("a", 2), ("b", 4)):
        config = LoraConfig(r=rank, lora_alpha=3, target_modules=["0", "2"], init_lora_weights=False, use_dora=use_dora and name == "b")
        inject_adapter_in_model(config, model, adapter_name=name)
    return model.eval()


def _layers(model):
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def test_routed_rows_equal_each_row_run_alone_with_its_own_adapters():
    """RowRouter on plain LoRA Linear and Conv layers: rows r and r + images belong to image r (as
    classifier-free guidance stacks them), each with its own adapters and scales."""
    import torch

    from hypergen.engine.loras import RowRouter, can_route

    model = _lora_model()
    per_image = [[("a", 1.0)], [("b", 0.5)], [], [("a", 1.3), ("b", 0.7)]]
    x = torch.randn(2 * len(per_image), 3, 4, 4)
    expected = []
    with torch.no_grad():
        for row in range(x.shape[0]):
            choices = per_image[row % len(per_image)]
            for layer in _layers(model):
                layer.enable_adapters(bool(choices))
                if choices:
                    layer.set_adapter([key for key, _ in choices])
                    for key, scale in choices:
                        layer.set_scale(key, scale)
            expected.append(model(x[row : row + 1]))
        router = RowRouter(per_image)
        for layer in _layers(model):
            layer.enable_adapters(False)
            assert can_route(layer, "a") and can_route(layer, "b")
        handles = [layer.register_forward_hook(router, with_kwargs=True) for layer in _layers(model)]
        routed = model(x)
        for handle in handles:
            handle.remove()
    assert torch.allclose(routed, torch.cat(expected), atol=1e-5)
    assert not torch.allclose(expected[0], expected[2], atol=1e-3)  # the adapters change the output


def test_dora_layers_cannot_be_routed_and_odd_row_counts_are_refused():
    import torch

    from hypergen.engine.loras import RoutingError, RowRouter, can_route

    layers = _layers(_lora_model(use_dora=True))
    assert all(can_route(layer, "a") and not can_route(layer, "b") for layer in layers)
    with pytest.raises(RoutingError):
        RowRouter([[("a", 1.0)], []]).plan(3, torch.device("cpu"))


def test_rows_that_are_tokens_of_several_images_are_refused():
    """Z-Image embeds the patches of every image as one flattened sequence: 2 images × 64 tokens
    are 128 rows, divisible by 2 but not rows of images."""
    import torch

    from hypergen.engine.loras import RoutingError, RowRouter

    router = RowRouter([[("a", 1.0)], []])
    assert router.plan(4, torch.device("cpu"))["a"][0].tolist() == [0, 2]  # guidance: two copies
    with pytest.raises(RoutingError):
        router.plan(128, torch.device("cpu"))


def test_a_pipeline_that_takes_no_adapters_refuses_every_load():
    from hypergen.engine.loras import LoraManager

    manager = LoraManager(pipe=None, allowed_dirs=[], max_loaded=4, refused="HYPERGEN_FUSE_QKV is on")
    with pytest.raises(LoraError, match="HYPERGEN_FUSE_QKV") as caught:
        manager.load("hub", "org/some-lora")
    assert caught.value.status == 409 and manager.list() == []

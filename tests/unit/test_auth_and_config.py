import pytest

from hypergen.api.auth import ApiKeyAuth
from hypergen.config import DEFAULT_MODEL_NAME, Settings, load_settings
from hypergen.errors import OpenAIError


def test_auth_off_without_keys():
    assert ApiKeyAuth([]).check(None) is None


@pytest.mark.parametrize(
    "header, code",
    [
        (None, "missing_api_key"),
        ("Bearer", "missing_api_key"),
        ("Basic k1", "missing_api_key"),
        ("Bearer nope", "invalid_api_key"),
        ("Bearer k1x", "invalid_api_key"),
    ],
)
def test_wrong_or_missing_keys_are_401_without_echoing_the_key(header, code):
    with pytest.raises(OpenAIError) as caught:
        ApiKeyAuth(["k1", "k2"]).check(header)
    assert caught.value.status_code == 401 and caught.value.code == code
    assert "nope" not in caught.value.message and "k1" not in caught.value.message


def test_any_configured_key_is_accepted():
    auth = ApiKeyAuth(["k1", "k2"])
    assert auth.check("Bearer k2") == "k2" and auth.check("bearer  k1 ") == "k1"


def test_settings_come_from_the_environment_and_arguments_override(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPERGEN_MAX_QUEUE", "7")
    monkeypatch.setenv("HYPERGEN_API_KEYS", " a, b ,")
    monkeypatch.setenv("HYPERGEN_MODEL", str(tmp_path))
    settings = load_settings({"max_queue": 9, "unrelated": 1})
    assert settings.max_queue == 9 and settings.api_key_list == ["a", "b"]
    assert settings.served_model_name == tmp_path.name


def test_served_model_name_is_derived_from_the_source(monkeypatch):
    monkeypatch.delenv("HYPERGEN_MODEL", raising=False)
    assert Settings().served_model_name == DEFAULT_MODEL_NAME
    assert Settings(model="stabilityai/sdxl-turbo").served_model_name == "stabilityai/sdxl-turbo"
    assert Settings(model="my-model:abc123").served_model_name == "my-model"
    assert Settings(model="x", model_name="pretty").served_model_name == "pretty"
    assert Settings(api_keys=" , ").api_key_list == []


def test_several_models_parse_with_the_first_as_default():
    settings = Settings(models="sd=/models/sd15, xl=stabilityai/sdxl-turbo")
    assert settings.served_model_name == "sd" and settings.model_names == ["sd", "xl"]
    assert settings.default_model_source == "/models/sd15"
    assert settings.extra_models == [("xl", "stabilityai/sdxl-turbo")]
    for bad in ("sd", "a=/x,a=/y", "=/x"):
        with pytest.raises(ValueError):
            Settings(models=bad)


def test_serve_flags_become_the_settings_every_service_reads(monkeypatch):
    from hypergen.cli import _serve_env, build_parser

    monkeypatch.delenv("HYPERGEN_WORKERS", raising=False)
    args = build_parser().parse_args(["serve", "--workers", "2", "--memory-budget-mb", "512", "--api-key", "a", "--api-key", "b"])
    env = _serve_env(args)
    assert (env["HYPERGEN_WORKERS"], env["HYPERGEN_MEMORY_BUDGET_MB"], env["HYPERGEN_API_KEYS"]) == ("2", "512.0", "a,b")
    for key in ("HYPERGEN_WORKERS", "HYPERGEN_MEMORY_BUDGET_MB"):
        monkeypatch.setenv(key, env[key])
    settings = load_settings()
    assert settings.workers == 2 and settings.memory_budget_mb == 512.0
    with pytest.raises(ValueError):
        Settings(workers=0)

"""The checked-in BentoCloud deployment config uses BentoML's field names and HyperGen's services."""

import typing
from pathlib import Path

import attrs
import yaml

from tests.conftest import ROOT


def unknown_keys(value, schema) -> list[str]:
    """Keys in `value` that the attrs class `schema` (BentoML's deployment schema) does not define."""
    hints = typing.get_type_hints(schema)  # the schema modules use string annotations
    problems = [key for key in value if key not in hints]
    for key, item in value.items():
        inner = hints.get(key)
        if typing.get_origin(inner) is dict:  # a mapping of names (services): checked by the caller
            continue
        for candidate in typing.get_args(inner) or (inner,):
            if attrs.has(candidate) and isinstance(item, dict):
                problems += [f"{key}.{problem}" for problem in unknown_keys(item, candidate)]
    return problems


def test_the_bentocloud_config_matches_bentomls_schema_and_our_services():
    from bentoml._internal.cloud.schemas.modelschemas import DeploymentServiceConfig
    from bentoml._internal.cloud.schemas.schemasv2 import DeploymentConfigSchema

    config = yaml.safe_load(Path(ROOT / "deploy" / "bentocloud.yaml").read_text())
    top_level = {key: value for key, value in config.items() if key not in ("name", "bento")}
    assert unknown_keys(top_level, DeploymentConfigSchema) == []
    assert set(config["services"]) == {"hypergen", "hypergen-worker"}
    for service in config["services"].values():
        assert unknown_keys(service, DeploymentServiceConfig) == []
        assert service["scaling"]["min_replicas"] <= service["scaling"]["max_replicas"]
    assert all(set(env) == {"name", "value"} and env["name"].startswith("HYPERGEN_") for env in config["envs"])

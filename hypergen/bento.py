"""BentoML glue: models in the BentoML store, and the worker's batching parameters."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from .config import DEFAULT_MODEL_NAME, Settings, is_bentoml_tag

logger = logging.getLogger("hypergen.bento")


def model_reference(settings: Settings) -> Any:
    """`bentoml.models.BentoModel(tag)` when the served model is a BentoML model tag, else None.

    Declared as a service class attribute, it makes `bentoml build` carry the weights in the
    Bento, so a containerized or BentoCloud deployment needs no Hub access.
    """
    import bentoml

    source = settings.default_model_source
    if source and is_bentoml_tag(source):
        return bentoml.models.BentoModel(source)
    return None


def extra_references(settings: Settings) -> list[Any]:
    """BentoModel references for the other models and the start-up adapters given as BentoML tags."""
    import bentoml

    sources = [source for _, source in settings.extra_models] + [spec.source for spec in settings.lora_specs]
    return [bentoml.models.BentoModel(source) for source in sources if is_bentoml_tag(source)]


def worker_batching(settings: Settings) -> dict[str, int]:
    """`@bentoml.api(batchable=True, ...)` arguments.

    BentoML needs `max_batch_size` > 1 (a setting of 1 is honoured by the worker, which splits
    calls by HYPERGEN_MAX_BATCH_SIZE images). Its dispatcher answers 503 to a request that waits
    past `max_latency_ms`, so that sits above the request timeout: admission control is ours.
    """
    return {
        "max_batch_size": max(2, settings.max_batch_size),
        "max_latency_ms": int(settings.request_timeout * 1000) + 60_000,
    }


def default_model_name(source: str | None) -> str:
    """A BentoML model name for a source: `stabilityai/sdxl-turbo` → `stabilityai--sdxl-turbo`."""
    if not source:
        return DEFAULT_MODEL_NAME
    name = Path(source.rstrip("/")).name if Path(source).is_dir() else source.replace("/", "--")
    return re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-.") or DEFAULT_MODEL_NAME


def import_model(source: str | None, name: str, settings: Settings) -> str:
    """Copy a diffusers model directory (or the embedded default, or a Hub snapshot) into the
    BentoML model store; returns the tag (`name:version`)."""
    import bentoml

    directory = resolve_model_directory(source, settings)
    metadata = {"source": source or "embedded-default", "format": "diffusers"}
    with bentoml.models.create(name, labels={"framework": "diffusers"}, metadata=metadata) as model:
        shutil.copytree(directory, model.path, dirs_exist_ok=True)
    logger.info("imported %s as BentoML model %s", directory, model.tag)
    return str(model.tag)


def import_lora(spec: Any) -> str:
    """Copy a start-up adapter (a local file or directory) into the BentoML store; returns its tag."""
    import bentoml

    source = Path(spec.source)
    if not source.exists():
        raise SystemExit(f"hypergen: LoRA '{spec.name}': {spec.source} does not exist (only local adapters can be built in)")
    metadata = {"source": spec.source, "format": "diffusers-lora", "scale": spec.scale}
    with bentoml.models.create(f"hypergen-lora-{spec.name}", labels={"kind": "lora"}, metadata=metadata) as model:
        if source.is_dir():
            shutil.copytree(source, model.path, dirs_exist_ok=True)
        else:
            shutil.copy2(source, Path(model.path) / source.name)
    logger.info("imported LoRA %s as BentoML model %s", spec.source, model.tag)
    return str(model.tag)


def resolve_model_directory(source: str | None, settings: Settings) -> Path:
    """A local directory holding the model's diffusers files."""
    if not source:
        from .pipelines import embedded_default_path

        return embedded_default_path(settings.home)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    # A Hub id: needs network access to the Hub, which these build machines do not have.
    return Path(snapshot_download(source))

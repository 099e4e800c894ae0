"""BentoML glue: models in the BentoML store, and the worker's batching parameters."""

from __future__ import annotations

import hashlib
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
    """BentoModel references for the other models, the video model and the start-up adapters
    given as BentoML tags."""
    import bentoml

    sources = [source for _, source in settings.extra_models] + [spec.source for spec in settings.lora_specs]
    sources += [settings.video_model_source] if settings.video_model_source else []
    return [bentoml.models.BentoModel(source) for source in sources if is_bentoml_tag(source)]


def traffic(settings: Settings, service: str) -> dict[str, Any]:
    """`traffic=` for the API service ("api") or a worker service ("worker").

    `timeout` and `max_concurrency` sit well above HyperGen's own bounds (BentoML would answer
    429/503 past them; admission control is ours). `concurrency` does nothing locally: it is
    the per-replica target BentoCloud's autoscaler scales on. A worker takes one batch at a
    time; the API holds a batch per worker in flight and queues the rest, so its target is two
    batches per worker: past that its queue grows, BentoCloud adds an API replica, whose extra
    batch in flight pushes the workers past their target in turn.
    """
    concurrency = settings.max_batch_size if service == "worker" else 2 * settings.max_batch_size * settings.workers
    return {"timeout": settings.request_timeout + 60, "max_concurrency": 100_000, "concurrency": concurrency}


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


def worker_copies(first: Any, settings: Settings) -> list[Any]:
    """Every diffusion worker service: `first`, then one copy per further GPU (HYPERGEN_WORKERS).

    Each copy is its own BentoML service (`hypergen-worker-2`, ...), so BentoML gives it its own
    process, socket and GPU (`resources: gpu: 1` each), and the API can pick a worker per request
    by load (`hypergen.balancing`); one service with several processes would share a socket,
    where the kernel hands out connections regardless of load.
    """
    import bentoml

    services = [first]
    for number in range(2, settings.workers + 1):
        inner = type(f"{first.inner.__name__}{number}", (first.inner,), {"__module__": first.inner.__module__})
        copy = bentoml.service(name=f"{first.name}-{number}", **first.config)(inner)
        copy.models.extend(model for model in first.models if model not in copy.models)  # e.g. extra_references
        services.append(copy)
    return services


def depend_on_each(services: list[Any]) -> Any:
    """A class decorator (applied before `@bentoml.service`) declaring one `bentoml.depends`
    attribute per worker service: `worker`, `worker_2`, ..."""
    import bentoml

    def declare(cls: type) -> type:
        for attribute, service in zip(worker_attributes(len(services)), services):
            setattr(cls, attribute, bentoml.depends(service))
        return cls

    return declare


def worker_attributes(count: int) -> list[str]:
    return ["worker", *(f"worker_{number}" for number in range(2, count + 1))]


def default_model_name(source: str | None) -> str:
    """A BentoML model name for a source: `stabilityai/sdxl-turbo` → `stabilityai--sdxl-turbo`."""
    if not source:
        return DEFAULT_MODEL_NAME
    name = Path(source.rstrip("/")).name if Path(source).is_dir() else source.replace("/", "--")
    return re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-.") or DEFAULT_MODEL_NAME


def import_model(source: str | None, name: str, settings: Settings) -> str:
    """Copy a diffusers model directory (or the embedded default, or a Hub snapshot) into the
    BentoML model store; returns the tag (`name:version`)."""
    directory = resolve_model_directory(source, settings)
    metadata = {"source": source or "embedded-default", "format": "diffusers"}
    return store_once(name, directory, {"framework": "diffusers"}, metadata)


def import_lora(spec: Any) -> str:
    """Copy a start-up adapter (a local file or directory) into the BentoML store; returns its tag."""
    source = Path(spec.source)
    if not source.exists():
        raise SystemExit(f"hypergen: LoRA '{spec.name}': {spec.source} does not exist (only local adapters can be built in)")
    metadata = {"source": spec.source, "format": "diffusers-lora", "scale": spec.scale}
    return store_once(f"hypergen-lora-{spec.name}", source, {"kind": "lora"}, metadata)


def content_digest(source: Path) -> str:
    """sha256 over a file's or a directory's files (relative paths and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(source.rglob("*")) if source.is_dir() else [source]:
        if path.is_file():
            digest.update(str(path.relative_to(source) if source.is_dir() else path.name).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def store_once(name: str, source: Path, labels: dict[str, str], metadata: dict[str, Any]) -> str:
    """The tag of `source` copied into the BentoML model store as `name`: an existing version
    with the same content is reused, so building again does not store the weights again."""
    import bentoml

    digest = content_digest(source)
    try:
        versions = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        versions = []
    for existing in versions:
        if existing.info.metadata.get("content_sha256") == digest:
            logger.info("%s is already in the BentoML store as %s", source, existing.tag)
            return str(existing.tag)
    with bentoml.models.create(name, labels=labels, metadata={**metadata, "content_sha256": digest}) as model:
        if source.is_dir():
            shutil.copytree(source, model.path, dirs_exist_ok=True)
        else:
            shutil.copy2(source, Path(model.path) / source.name)
    logger.info("imported %s as BentoML model %s", source, model.tag)
    return str(model.tag)


def without_stored_copies(bentofile: dict[str, Any], carried: list[Path], build_context: Path) -> dict[str, Any]:
    """`bentofile` with every carried source that lies inside the build context excluded from
    the Bento's `src`: a model or adapter the Bento references in the BentoML store (e.g. the
    embedded demo model, `hypergen/assets/demo-model`) would otherwise travel twice, once as a
    store model and once as package files, into every image made from it."""
    root = build_context.resolve()
    exclude = list(bentofile.get("exclude", []))
    for path in (path.resolve() for path in carried):
        if path.is_relative_to(root):
            entry = "/" + path.relative_to(root).as_posix() + ("/" if path.is_dir() else "")
            exclude += [entry] if entry not in exclude else []
    return {**bentofile, "exclude": exclude}


def resolve_model_directory(source: str | None, settings: Settings) -> Path:
    """A local directory holding the model's diffusers files."""
    if not source:
        from .engine.pipelines import embedded_default_path

        return embedded_default_path()
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    # A Hub id: needs network access to the Hub, which these build machines do not have.
    return Path(snapshot_download(source))

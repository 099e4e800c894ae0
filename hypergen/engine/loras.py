"""LoRA adapters: the only code that loads, activates and unloads them (in the worker process).

- Adapters are loaded into the shared text-to-image pipeline with diffusers'
  `load_lora_weights(..., adapter_name=...)`; the image-to-image and inpainting pipelines share
  its modules, so an adapter applies to every mode.
- Every operation runs on the worker's single pipeline thread, between pipeline calls: a call
  never sees a half-loaded adapter, and `activate` sets exactly one call's adapter (or none).
- Paths sent by clients must resolve (symlinks followed) inside `HYPERGEN_LORA_DIRS`.
- At most `max_loaded` adapters stay loaded; loading one more evicts the least recently used
  adapter that was loaded on demand. Start-up adapters are pinned.
- A call whose images use different adapters (or scales) runs them all at once: the adapters are
  switched off in peft and a hook on each LoRA layer adds, row by row, the delta of that row's
  own adapters (`RowRouter`). Only plain LoRA layers (Linear, Conv) can be routed; an adapter
  with DoRA or another peft variant, or on an embedding, gets calls of its own.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import is_bentoml_tag
from ..metrics import metrics

logger = logging.getLogger("hypergen.loras")

WEIGHT_SUFFIXES = (".safetensors", ".bin")


class LoraError(Exception):
    """A client-visible adapter problem (400 naming `lora_path`, or 404 for an unknown name)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class LoadedAdapter:
    name: str
    adapter_name: str  # the key inside the pipeline's modules
    source: str
    scale: float
    pinned: bool
    loaded_at: float
    size_bytes: int
    load_seconds: float
    last_used: float
    layers: list[Any] = field(default_factory=list, repr=False)  # the peft LoRA layers that hold it
    routable: bool = True  # every layer is plain LoRA: images of one call can each have their own

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "scale": self.scale,
            "pinned": self.pinned,
            "loaded_at": int(self.loaded_at),
            "size_bytes": self.size_bytes,
            "load_ms": round(self.load_seconds * 1000, 1),
        }


def resolve_allowed_path(requested: str, allowed_dirs: Iterable[Path]) -> Path:
    """The real path of an adapter inside an allowed directory, or LoraError.

    Relative paths are looked up in each allowed directory in turn. `..` segments and symlinks
    are resolved first, so neither can lead out of the allowed directories.
    """
    roots = [Path(os.path.realpath(directory)) for directory in allowed_dirs]
    if not roots:
        raise LoraError("Loading adapters by path is disabled on this server (HYPERGEN_LORA_DIRS is not set).")
    try:
        return _find_weights(requested, roots)
    except (OSError, ValueError):  # NUL bytes, names longer than the OS allows, unreadable entries
        raise LoraError("The adapter path is not a readable path.") from None


def _find_weights(requested: str, roots: list[Path]) -> Path:
    candidates = [Path(requested)] if os.path.isabs(requested) else [root / requested for root in roots]
    outside = True
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if not any(real == root or root in real.parents for root in roots):
            continue
        outside = False
        if real.is_file() and real.suffix in WEIGHT_SUFFIXES:
            return real
        if real.is_dir() and any(path.suffix in WEIGHT_SUFFIXES for path in real.iterdir()):
            return real
    if outside:
        raise LoraError(f"'{requested}' is outside the directories adapters may be loaded from.")
    raise LoraError(f"No LoRA weights ({', '.join(WEIGHT_SUFFIXES)}) found at '{requested}'.")


def shown_path(real: Path, allowed_dirs: Iterable[Path]) -> str:
    """How clients see an adapter path: relative to its allowed directory, never absolute."""
    for directory in allowed_dirs:
        root = Path(os.path.realpath(directory))
        if real == root or root in real.parents:
            return real.relative_to(root).as_posix() or "."
    return real.name


def weights_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.iterdir() if item.suffix in WEIGHT_SUFFIXES)


def adapter_key(name: str) -> str:
    """A module-safe adapter name (peft keys cannot hold dots or slashes)."""
    return "lora_" + hashlib.sha1(name.encode()).hexdigest()[:16]


class LoraManager:
    """Adapters of one pipeline: load, look up, activate for a call, unload, evict (LRU)."""

    def __init__(self, pipe: Any, allowed_dirs: list[Path], max_loaded: int, refused: str | None = None) -> None:
        self.pipe = pipe
        self.refused = refused  # why this pipeline takes no adapters at all (None: it takes them)
        self.allowed_dirs = allowed_dirs
        self.max_loaded = max_loaded
        self._adapters: dict[str, LoadedAdapter] = {}
        self._active: tuple[str, float] | None = None
        self._lora_enabled: bool | None = None  # None: unknown (after a load or unload)

    def list(self) -> list[dict[str, Any]]:
        return [adapter.describe() for adapter in self._adapters.values()]

    def load(
        self, name: str, source: str, scale: float = 1.0, pinned: bool = False, protect: Iterable[str] = (), shown: str | None = None
    ) -> LoadedAdapter:
        """Load `source` (a directory or file, a BentoML model tag, or a Hub id) as `name`;
        `shown` is the source as clients see it (server paths relative to their allowed dir)."""
        shown = shown or source
        if self.refused:
            raise LoraError(f"This server loads no LoRA adapters: {self.refused}.", status=409)
        if name in self._adapters:
            raise LoraError(f"An adapter named '{name}' is already loaded; unload it first.", status=409)
        if not hasattr(self.pipe, "load_lora_weights"):
            raise LoraError(f"This model ({type(self.pipe).__name__}) cannot take LoRA adapters: diffusers has no LoRA loader for it.")
        location = self._locate(source)
        self._make_room(protect)
        key = adapter_key(name)
        started = time.perf_counter()
        try:
            self.pipe.load_lora_weights(location, adapter_name=key)
        except Exception as error:
            self._forget_partial(key)
            metrics().lora_loads.labels(outcome="failed").inc()
            logger.warning("loading LoRA '%s' from %s failed: %s", name, source, error)
            raise LoraError(f"Could not load LoRA weights from '{shown}': {type(error).__name__}.") from None
        seconds = time.perf_counter() - started
        self._state_changed()  # diffusers leaves the new adapter active
        size = weights_size(Path(location)) if os.path.exists(location) else 0
        now = time.time()
        layers = lora_layers(self.pipe, key)
        routable = all(can_route(layer, key) for layer in layers)
        adapter = LoadedAdapter(name, key, shown, scale, pinned, now, size, seconds, now, layers, routable)
        if not routable:
            logger.info("LoRA '%s' has layers that cannot be routed per image (DoRA or another variant): its calls are its own", name)
        self._adapters[name] = adapter
        metrics().lora_loads.labels(outcome="loaded").inc()
        metrics().loras_loaded.set(len(self._adapters))
        logger.info("LoRA '%s' loaded from %s in %.1f ms (%d bytes)%s", name, source, seconds * 1000, size, " [pinned]" if pinned else "")
        return adapter

    def unload(self, name: str, evicting: bool = False) -> None:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise LoraError(f"No adapter named '{name}' is loaded.", status=404)
        if adapter.pinned and not evicting:
            raise LoraError(f"The adapter '{name}' was loaded at start (HYPERGEN_LORAS) and is pinned.", status=409)
        del self._adapters[name]
        started = time.perf_counter()
        self.pipe.delete_adapters(adapter.adapter_name)
        self._state_changed()
        metrics().loras_loaded.set(len(self._adapters))
        logger.info("LoRA '%s' unloaded in %.1f ms", name, (time.perf_counter() - started) * 1000)

    def resolve(self, lora_path: str, protect: Iterable[str] = ()) -> LoadedAdapter:
        """A loaded adapter by name, or the adapter at an allowed path (loaded on first use)."""
        adapter = self._adapters.get(lora_path)
        if adapter is None:
            real = resolve_allowed_path(lora_path, self.allowed_dirs)
            name = shown_path(real, self.allowed_dirs)
            adapter = self._adapters.get(name) or self.load(name, str(real), protect=protect, shown=name)
        adapter.last_used = time.time()
        return adapter

    def activate(self, choices: Sequence[Choice]) -> None:
        """Make the next pipeline call use exactly these adapters at their scales (none: no adapter)."""
        if not choices:
            if self._lora_enabled is not False and self._adapters:
                self.pipe.disable_lora()
            self._lora_enabled, self._active = False, None
            return
        wanted = tuple(weights(choices))
        if self._lora_enabled is not True:
            self.pipe.enable_lora()
            self._lora_enabled = True
        if self._active != wanted:
            self.pipe.set_adapters([key for key, _ in wanted], adapter_weights=[scale for _, scale in wanted])
            self._active = wanted

    @contextmanager
    def routed(self, per_image: Sequence[Sequence[Choice]]) -> Iterator[None]:
        """Run one call in which image i uses the adapters `per_image[i]` (each routable)."""
        self.activate([])
        router = RowRouter([weights(choices) for choices in per_image])
        layers = {id(layer): layer for choices in per_image for adapter, _ in choices for layer in adapter.layers}
        handles = [layer.register_forward_hook(router, with_kwargs=True) for layer in layers.values()]
        try:
            yield
        except RoutingError as error:
            # This model feeds some LoRA layer rows that are not whole images (Z-Image embeds all
            # images' patches as one sequence): its adapters get calls of their own from now on.
            for choices in per_image:
                for adapter, _ in choices:
                    if adapter.routable:
                        adapter.routable = False
                        logger.info("LoRA '%s' cannot be routed per image on this model (%s): its calls are its own", adapter.name, error)
            raise
        finally:
            for handle in handles:
                handle.remove()

    # --- internals ------------------------------------------------------------------------------

    def _locate(self, source: str) -> str:
        if is_bentoml_tag(source):
            import bentoml

            try:
                return bentoml.models.get(source).path
            except Exception:  # bentoml.exceptions.NotFound, or a tag BentoML cannot parse
                raise LoraError(f"No BentoML model '{source}' is in this server's model store.", status=404) from None
        return source

    def _make_room(self, protect: Iterable[str]) -> None:
        protected = set(protect)
        while len(self._adapters) >= self.max_loaded:
            candidates = [a for a in self._adapters.values() if not a.pinned and a.name not in protected]
            if not candidates:
                return  # every loaded adapter is pinned or in use by this batch: go over the limit
            victim = min(candidates, key=lambda adapter: adapter.last_used)
            logger.info("evicting LoRA '%s' (least recently used)", victim.name)
            self.unload(victim.name, evicting=True)

    def _state_changed(self) -> None:
        """After a load or unload the pipeline's adapter state is diffusers' choice (a new adapter
        may be active, or all may still be disabled): set it anew before the next call."""
        self._lora_enabled, self._active = None, None

    def _forget_partial(self, key: str) -> None:
        try:
            self.pipe.delete_adapters(key)
        except Exception:  # nothing was registered under that key
            pass


# --- per-image adapters in one call ------------------------------------------------------------

Choice = tuple[LoadedAdapter, "float | None"]  # an adapter and the request's scale (None: its own)


def weights(choices: Iterable[Choice]) -> list[tuple[str, float]]:
    """(key in the pipeline, scale) of each chosen adapter."""
    return [(adapter.adapter_name, adapter.scale if scale is None else scale) for adapter, scale in choices]


def lora_layers(pipe: Any, key: str) -> list[Any]:
    """The peft LoRA layers of the pipeline's models (UNet or transformer, text encoders) holding `key`."""
    import torch
    from peft.tuners.lora import LoraLayer

    found: dict[int, Any] = {}
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for module in component.modules():
                if isinstance(module, LoraLayer) and (key in module.lora_A or key in module.lora_embedding_A):
                    found[id(module)] = module
    return list(found.values())


def can_route(layer: Any, key: str) -> bool:
    """Plain LoRA on a Linear or Conv layer: output += B(A(dropout(x))) * scaling, row by row."""
    return key in layer.lora_A and key not in layer.lora_variant and key not in layer.lora_embedding_A


def unit_scaling(layer: Any, key: str) -> float:
    """peft's scaling of `key` at scale 1 (`LoraLayer.set_scale`)."""
    rank = layer.r[key]
    return layer.lora_alpha[key] / (math.sqrt(rank) if layer.use_rslora.get(key, False) else rank)


class RoutingError(RuntimeError):
    """A LoRA layer saw a batch whose rows are not whole copies of the call's images."""


# Copies of the batch a layer may see: classifier-free guidance doubles it, a few pipelines
# (InstructPix2Pix) triple it. More rows than that are not images but tokens of several images
# flattened into one sequence, which cannot be told apart by row.
MAX_ROWS_PER_IMAGE = 4


class RowRouter:
    """A forward hook for peft LoRA layers (with adapters disabled, so a layer returns its base
    output) that adds each row's own adapters. Row r of a layer's input belongs to image
    r % images: diffusers stacks classifier-free guidance as [unconditional; conditional] (or
    runs it as a second call), and text encoders see one row per image. A layer that sees any
    other number of rows raises `RoutingError` (the call is then retried job by job)."""

    def __init__(self, per_image: list[list[tuple[str, float]]]) -> None:
        self.images = len(per_image)
        self.by_adapter: dict[str, list[tuple[int, float]]] = {}
        for image, choices in enumerate(per_image):
            for key, scale in choices:
                self.by_adapter.setdefault(key, []).append((image, scale))
        self._plans: dict[tuple[int, Any], dict[str, tuple[Any, Any]]] = {}

    def plan(self, rows: int, device: Any) -> dict[str, tuple[Any, Any]]:
        """For each adapter: the rows that use it and their scales (cached per row count)."""
        import torch

        if rows % self.images or rows > MAX_ROWS_PER_IMAGE * self.images:
            raise RoutingError(f"a LoRA layer saw {rows} rows for a call of {self.images} images")
        cached = self._plans.get((rows, device))
        if cached is None:
            copies = range(rows // self.images)
            cached = {
                key: (
                    torch.tensor([copy * self.images + image for copy in copies for image, _ in uses], device=device),
                    torch.tensor([scale for _ in copies for _, scale in uses], dtype=torch.float64),
                )
                for key, uses in self.by_adapter.items()
            }
            self._plans[(rows, device)] = cached
        return cached

    def __call__(self, layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs["x"]
        for key, (rows, scales) in self.plan(x.shape[0], x.device).items():
            if key not in layer.lora_A:
                continue
            lora_a, lora_b = layer.lora_A[key], layer.lora_B[key]
            delta = lora_b(lora_a(layer.lora_dropout[key](x.index_select(0, rows).to(lora_a.weight.dtype))))
            factors = (scales * unit_scaling(layer, key)).to(delta.dtype).to(delta.device)
            output.index_add_(0, rows, (delta * factors.view(-1, *[1] * (delta.dim() - 1))).to(output.dtype))
        return output

"""LoRA adapters: the only code that loads, activates and unloads them (in the worker process).

- Adapters are loaded into the shared text-to-image pipeline with diffusers'
  `load_lora_weights(..., adapter_name=...)`; the image-to-image and inpainting pipelines share
  its modules, so an adapter applies to every mode.
- Every operation runs on the worker's single pipeline thread, between pipeline calls: a call
  never sees a half-loaded adapter, and `activate` sets exactly one call's adapter (or none).
- Paths sent by clients must resolve (symlinks followed) inside `HYPERGEN_LORA_DIRS`.
- At most `max_loaded` adapters stay loaded; loading one more evicts the least recently used
  adapter that was loaded on demand. Start-up adapters are pinned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
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

    def __init__(self, pipe: Any, allowed_dirs: list[Path], max_loaded: int) -> None:
        self.pipe = pipe
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
        if name in self._adapters:
            raise LoraError(f"An adapter named '{name}' is already loaded; unload it first.", status=409)
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
        adapter = LoadedAdapter(name, key, shown, scale, pinned, now, size, seconds, now)
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

    def activate(self, adapter: LoadedAdapter | None, scale: float | None) -> None:
        """Make the next pipeline call use exactly `adapter` at `scale`, or no adapter."""
        if adapter is None:
            if self._lora_enabled is not False and self._adapters:
                self.pipe.disable_lora()
            self._lora_enabled, self._active = False, None
            return
        wanted = (adapter.adapter_name, adapter.scale if scale is None else scale)
        if self._lora_enabled is not True:
            self.pipe.enable_lora()
            self._lora_enabled = True
        if self._active != wanted:
            self.pipe.set_adapters([wanted[0]], adapter_weights=[wanted[1]])
            self._active = wanted

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

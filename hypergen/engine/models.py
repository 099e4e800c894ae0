"""The served models in the worker: loading them (default, extras, a dedicated inpainting
checkpoint, start-up adapters), finding one by name, their limits, and where their weights live
(`ModelResidency`). Runs on the engine's pipeline thread."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ..config import Settings, is_bentoml_tag
from ..logs import quiet_model_libraries
from ..metrics import metrics
from ..protocol import LoraCommand, LoraReply, ModelLimits, WorkerError
from .loras import LoraError, LoraManager, resolve_allowed_path, shown_path
from .residency import MB, ModelResidency

logger = logging.getLogger("hypergen.engine")


def locate_model(source: str) -> str:
    """A BentoML model tag's directory in the store; paths and Hub ids as they are."""
    if is_bentoml_tag(source):
        import bentoml

        return bentoml.models.get(source).path
    return source


def pipeline_bytes(loaded: Any) -> int:
    """Bytes of a model's weights (parameters and buffers of every torch component)."""
    import torch

    modules = {  # the mode pipelines share components: count each once
        id(component): component
        for pipe in loaded.modes.values()
        for component in pipe.components.values()
        if isinstance(component, torch.nn.Module)
    }
    return sum(t.numel() * t.element_size() for module in modules.values() for t in (*module.parameters(), *module.buffers()))


def model_limits(loaded: Any) -> ModelLimits:
    from .pipelines import size_multiple

    native_side = max(loaded.native_width, loaded.native_height)
    return ModelLimits(
        id=loaded.name,
        native_width=loaded.native_width,
        native_height=loaded.native_height,
        min_side=min(64, native_side),
        max_side=max(loaded.max_side, native_side),
        default_steps=loaded.default_steps,
        default_guidance_scale=loaded.default_guidance_scale,
        modes=list(loaded.modes),
        schedulers=loaded.schedulers,
        quality_steps=loaded.quality_steps,
        size_multiple=size_multiple(loaded.pipe),
    )


def looks_like_hub_id(source: str, allowed_dirs: list[Path]) -> bool:
    """`org/name` that is no path under an allowed directory nor relative to the worker's own
    directory (diffusers would load that local path): left to diffusers' Hub loader."""
    if os.path.isabs(source) or source.startswith(".") or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return False
    if os.path.exists(source):
        return False
    return not any(os.path.exists(os.path.join(directory, source)) for directory in allowed_dirs)


def _count_move(model: str, to_device: bool) -> None:
    metrics().model_moves.labels(model=model, direction="reload" if to_device else "offload").inc()


class ServedModels:
    """Every served model's pipelines and adapters, once `load()` has succeeded."""

    def __init__(self, settings: Settings, model_path: str | None = None) -> None:
        self.settings = settings
        self._model_path = model_path
        self.default: Any = None  # pipelines.LoadedPipeline once loaded
        self.default_loras: LoraManager | None = None  # set last: its presence means ready
        self._extra: dict[str, tuple[Any, LoraManager]] = {}  # HYPERGEN_MODELS beyond the first
        budget = int(settings.memory_budget_mb * MB) if settings.memory_budget_mb else None
        self.residency = ModelResidency(budget, move=self._move, on_move=_count_move)
        self.error: str | None = None
        self._step_seconds: dict[str, float] = {}  # model → fastest native one-step warm-up call

    def record_step(self, name: str, seconds: float) -> None:
        """A one-image, one-step call at the model's native size took `seconds`."""
        self._step_seconds[name] = min(seconds, self._step_seconds.get(name, seconds))

    @property
    def ready(self) -> bool:
        return self.default_loras is not None

    def limits(self) -> list[ModelLimits]:
        loaded = [self.default] + [extra for extra, _ in self._extra.values()]
        return [model_limits(model).model_copy(update={"native_step_s": self._step_seconds.get(model.name)}) for model in loaded]

    def get(self, name: str) -> tuple[Any, LoraManager]:
        """The loaded pipeline and adapters of a served model (the API only sends known names)."""
        if name in self._extra:
            return self._extra[name]
        assert self.default_loras is not None
        return self.default, self.default_loras

    def is_extra(self, name: str) -> bool:
        return name in self._extra

    # --- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Load everything configured; a failure is kept in `error` (reported through /health)."""
        quiet_model_libraries()
        import torch

        torch.set_num_threads(self.settings.torch_threads or os.cpu_count() or 1)
        try:
            self._load_default()
            loras = self._start_up_adapters()
            self._load_extras()
        except Exception as error:  # the worker stays up to say why
            self.error = error.message if isinstance(error, LoraError) else f"{type(error).__name__}: {error}"
            logger.error("loading failed: %s", self.error, exc_info=not isinstance(error, LoraError))
            return
        self.residency.use(self.default.name)  # most requests name no model: start with the default
        self.default_loras = loras
        loaded = self.default
        logger.info(
            "model '%s' loaded from %s on %s (%s) in %.2fs; native size %dx%d, default %d steps%s",
            loaded.name,
            loaded.source,
            loaded.device,
            str(loaded.dtype).replace("torch.", ""),
            loaded.load_seconds,
            loaded.native_width,
            loaded.native_height,
            loaded.default_steps,
            "; its weights are RANDOM (it draws noise, not your prompt)" if loaded.random_weights else "",
        )

    def _source(self) -> str:
        """The directory or Hub id to load the default model from."""
        from .pipelines import embedded_default_path

        if self._model_path:
            return self._model_path
        source = self.settings.default_model_source
        return locate_model(source) if source else str(embedded_default_path())

    def _load_default(self) -> None:
        from .pipelines import load_inpainting, load_text_to_image

        self.default = load_text_to_image(self.settings.served_model_name, self._source(), self.settings.device, self.settings.levers)
        if self.settings.inpaint_model:
            loaded = self.default
            loaded.modes["inpainting"] = load_inpainting(self.settings.inpaint_model, loaded.device, loaded.dtype, self.settings.levers)
            logger.info("inpainting uses the dedicated checkpoint %s", self.settings.inpaint_model)
        self.residency.register(self.default.name, pipeline_bytes(self.default))

    def _start_up_adapters(self) -> LoraManager:
        loras = self._adapters_of(self.default)
        for spec in self.settings.lora_specs:
            local = not is_bentoml_tag(spec.source) and os.path.exists(spec.source)
            shown = shown_path(Path(os.path.realpath(spec.source)), self.settings.lora_dir_list) if local else None
            try:
                loras.load(spec.name, spec.source, spec.scale, pinned=True, shown=shown)
            except LoraError as error:
                raise LoraError(f"start-up LoRA '{spec.name}' failed to load: {error.message}") from None
        return loras

    def _load_extras(self) -> None:
        from .pipelines import load_text_to_image

        for name, source in self.settings.extra_models:
            extra = load_text_to_image(name, locate_model(source), self.settings.device, self.settings.levers)
            self._extra[name] = (extra, self._adapters_of(extra))
            self.residency.register(name, pipeline_bytes(extra))
            logger.info("model '%s' loaded from %s in %.2fs", name, source, extra.load_seconds)

    def _adapters_of(self, loaded: Any) -> LoraManager:
        refused = "HYPERGEN_FUSE_QKV is on: fused projections would skip the adapters' q/k/v weights" if self.settings.fuse_qkv else None
        return LoraManager(loaded.pipe, self.settings.lora_dir_list, self.settings.max_loras, refused)

    def _move(self, name: str, to_device: bool) -> None:
        """Move a model's weights (all its mode pipelines share them) to its device or to host
        memory. On a CPU-only worker the device *is* host memory: only the bookkeeping changes."""
        loaded = self._extra[name][0] if name in self._extra else self.default  # also while loading
        target = loaded.device if to_device else "cpu"
        for pipe in dict.fromkeys(loaded.modes.values()):  # a dedicated inpainting pipeline has its own weights
            pipe.to(target)

    # --- adapters (admin) ----------------------------------------------------------------------

    def manage_loras(self, command: LoraCommand) -> LoraReply:
        """List, load or unload the default model's adapters (on the pipeline thread)."""
        loras = self.default_loras
        if loras is None:
            return LoraReply(error=WorkerError(message="The model is not loaded yet.", status=503))
        try:
            if command.action == "load":
                source = shown = command.path or ""
                dirs = self.settings.lora_dir_list
                if not is_bentoml_tag(source) and not looks_like_hub_id(source, dirs):
                    real = resolve_allowed_path(source, dirs)
                    source, shown = str(real), shown_path(real, dirs)
                loras.load(command.name or "", source, command.scale, shown=shown)
            elif command.action == "unload":
                loras.unload(command.name or "")
        except LoraError as error:
            param = {"load": "path", "unload": "name"}.get(command.action) if error.status == 400 else None
            return LoraReply(error=WorkerError(message=error.message, status=error.status, param=param), adapters=loras.list())
        return LoraReply(adapters=loras.list())

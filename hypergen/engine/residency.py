"""Which models' weights live on the compute device, under a memory budget.

With several models (HYPERGEN_MODELS) and HYPERGEN_MEMORY_BUDGET_MB set, the worker keeps the
most recently used models on the device and offloads idle ones to host memory, moving a model
back when a request needs it. Pure bookkeeping: the worker passes the function that moves
weights, and calls `use` on its pipeline thread before each pipeline call.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("hypergen.residency")

MB = 1024 * 1024


@dataclass
class Resident:
    size_bytes: int
    on_device: bool = True
    offloads: int = 0
    reloads: int = 0


class ModelResidency:
    """LRU placement of models on the device within `budget_bytes` (None: no limit)."""

    def __init__(
        self,
        budget_bytes: int | None,
        move: Callable[[str, bool], None],
        on_move: Callable[[str, bool], None] | None = None,
    ) -> None:
        """`move(name, to_device)` moves a model's weights; `on_move` is told afterwards (metrics)."""
        self.budget_bytes = budget_bytes
        self._move = move
        self._on_move = on_move or (lambda name, to_device: None)
        self._models: OrderedDict[str, Resident] = OrderedDict()  # least recently used first

    def register(self, name: str, size_bytes: int) -> None:
        """A model just loaded onto the device; older idle models make room if it does not fit."""
        self._models[name] = Resident(size_bytes)
        self._make_room(keep=name)

    def use(self, name: str) -> bool:
        """Make sure `name` is on the device (moving others off if needed); True if it was moved."""
        model = self._models[name]
        self._models.move_to_end(name)
        if model.on_device:
            return False
        model.on_device = True
        self._make_room(keep=name)
        self._move(name, True)
        model.reloads += 1
        self._on_move(name, True)
        logger.info("model '%s' moved back to the device (%.1f MB)", name, model.size_bytes / MB)
        return True

    @property
    def device_bytes(self) -> int:
        return sum(model.size_bytes for model in self._models.values() if model.on_device)

    def _make_room(self, keep: str) -> None:
        if self.budget_bytes is None:
            return
        for name, model in list(self._models.items()):  # least recently used first
            if self.device_bytes <= self.budget_bytes:
                break
            if name == keep or not model.on_device:
                continue
            self._move(name, False)
            model.on_device = False
            model.offloads += 1
            self._on_move(name, False)
            logger.info(
                "model '%s' offloaded to host memory (%.1f MB) to stay within the %.1f MB budget",
                name,
                model.size_bytes / MB,
                self.budget_bytes / MB,
            )
        if self.device_bytes > self.budget_bytes:
            logger.warning(
                "models on the device use %.1f MB, over the %.1f MB budget (the model in use cannot leave)",
                self.device_bytes / MB,
                self.budget_bytes / MB,
            )

    def snapshot(self) -> dict[str, Any]:
        """For `/health`: the budget, what is on the device, and each model's moves.

        Called from the worker's event loop while `use` may run on the pipeline thread: it reads
        one copy of the table (taken in a single step under the GIL), never the live one."""
        models = list(self._models.items())
        return {
            "budget_mb": None if self.budget_bytes is None else round(self.budget_bytes / MB, 2),
            "device_mb": round(sum(model.size_bytes for _, model in models if model.on_device) / MB, 2),
            "models": {
                name: {
                    "on_device": model.on_device,
                    "mb": round(model.size_bytes / MB, 2),
                    "offloads": model.offloads,
                    "reloads": model.reloads,
                }
                for name, model in models
            },
            "offloaded": [name for name, model in models if not model.on_device],
        }

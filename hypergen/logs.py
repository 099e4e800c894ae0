"""stdout logging for HyperGen's own loggers (`hypergen.*`)."""

from __future__ import annotations

import logging
import sys
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send `hypergen.*` records to stdout at `level` (HYPERGEN_LOG_LEVEL); idempotent."""
    logger = logging.getLogger("hypergen")
    logger.setLevel(level.upper())
    if not any(getattr(handler, "_hypergen", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._hypergen = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


# Access-log lines BentoML would print for HyperGen's own traffic: the API polls the worker's
# `/status` several times a second, and probes poll `/health` and `/metrics`.
QUIET_ACCESS_PATHS = ["/status", "/health", "/metrics", "/healthz", "/livez", "/readyz"]


def access_logging(service: str) -> dict[str, Any]:
    """`@bentoml.service(logging=...)`: access lines for real requests only. The worker's are
    all the API's own calls (each real request already has its API line and a pipeline-call line)."""
    return {"access": {"enabled": service == "api", "skip_paths": QUIET_ACCESS_PATHS}}


class _DropTorchvisionFallback(logging.Filter):
    """transformers warns at every import that its image processors fall back to PIL without
    torchvision; HyperGen's pipelines do not use those processors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def quiet_model_libraries() -> None:
    """Before importing diffusers in the worker: no tqdm bars or torchvision notices at start;
    HyperGen logs what it loads and how long it took instead."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # On the logger that emits it: BentoML's handlers also receive transformers' records.
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()

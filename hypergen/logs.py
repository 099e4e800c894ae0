"""stdout logging for HyperGen's own loggers (`hypergen.*`)."""

from __future__ import annotations

import logging
import sys

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

"""HyperGen's Bento entry for `bentoml serve` / `bentoml build` (bentofile.yaml: `service:ImageAPI`).

The services are declared in `hypergen/service.py`; this file only names them here.
"""

from hypergen.service import DiffusionWorker, ImageAPI

__all__ = ["DiffusionWorker", "ImageAPI"]

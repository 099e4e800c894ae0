"""The API process's FastAPI app: middleware, error handlers and every route.

`hypergen/service.py` mounts it on the BentoML API service and hands over the serving object
(`app.state.serving`) and the key check (`app.state.auth`) when the service starts, and arms the
shutdown gate (`app.state.shutdown`).
"""

from __future__ import annotations

from fastapi import FastAPI

from .. import __version__
from ..errors import install_error_handlers
from .middleware import RequestLimits
from .routes import images, models, ops, videos
from .routes.playground import mount_playground
from .shutdown import ShutdownGate

MIB = 1024 * 1024


def create_app(max_body_bytes: int = 50 * MIB, max_bytes_in_flight: int = 256 * MIB) -> FastAPI:
    app = FastAPI(title="HyperGen", version=__version__, description="OpenAI-compatible image generation for diffusers models.")
    install_error_handlers(app)
    app.state.shutdown = ShutdownGate()  # its signal handlers are installed when the service starts
    app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes, max_bytes_in_flight=max_bytes_in_flight)
    for router in (images.router, videos.router, models.router, ops.router):
        app.include_router(router)
    mount_playground(app)
    ops.add_unknown_route(app)  # last: routes match in the order they were added
    return app

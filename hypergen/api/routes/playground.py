"""The playground: a web page at `/playground/` for trying the server from a browser.

The page is three static files shipped in `hypergen/playground/` (no build step, nothing fetched
from elsewhere); it talks to the server only through the public API, like any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND_FILES = Path(__file__).resolve().parents[2] / "playground"  # hypergen/playground/


def mount_playground(app: FastAPI) -> None:
    """Serve the page at `/playground/`, with `/` and `/playground` redirecting there.

    Call it before any catch-all route: routes match in the order they were added.
    """

    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    async def open_playground() -> RedirectResponse:
        # The trailing slash matters: the page loads its script and stylesheet by relative URLs.
        return RedirectResponse("/playground/")

    app.mount("/playground", StaticFiles(directory=PLAYGROUND_FILES, html=True), name="playground")

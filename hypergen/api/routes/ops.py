"""Operations: health, Prometheus metrics, the images behind `url` responses, and the OpenAI
404 for every other path (`add_unknown_route`, added last)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import OpenAIError
from ...metrics import exposition
from ..access import authorized, serving
from ..serving import ImageServing

router = APIRouter()


@router.get("/v1/images/files/{file_id}")
async def image_file(file_id: str, images: ImageServing = Depends(serving)) -> FileResponse:
    # No key needed: like OpenAI's image URLs, the unguessable id is the capability.
    stored = images.store.get(file_id)
    if stored is None:
        raise OpenAIError(404, f"The image '{file_id}' does not exist or has expired.", param="file_id", code="not_found")
    return FileResponse(stored.path, media_type=stored.media_type)


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request, images: ImageServing = Depends(serving)) -> Response:
    """Prometheus text; needs a key only with HYPERGEN_METRICS_AUTH (it names no request or file)."""
    if images.settings.metrics_auth:
        authorized(request)
    body, content_type = await run_in_threadpool(exposition)
    return Response(body, media_type=content_type)


@router.get("/health")
async def health(request: Request, images: ImageServing = Depends(serving)) -> JSONResponse:
    ready, body = await images.health()
    videos = getattr(request.app.state, "videos", None)
    if videos is not None and videos.model_name is not None:
        body["video"] = videos.health(await images.readiness.status())
    return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})


def add_unknown_route(app: FastAPI) -> None:
    """Paths nothing else declares get OpenAI's 404 object, not BentoML's plain-text one."""

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"], include_in_schema=False)
    async def unknown_route() -> Any:
        raise StarletteHTTPException(404)  # mapped with every other 404 in errors.to_openai

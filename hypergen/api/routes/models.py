"""Served models (OpenAI's `/v1/models`) and their LoRA adapters (`/v1/loras`, the admin API)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from ...protocol import LoraCommand, LoraLoadRequest, ModelCard, ModelList
from ..access import authorized, rate_limited, serving
from ..serving import ImageServing

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(_key: str | None = Depends(authorized), images: ImageServing = Depends(serving)) -> ModelList:
    return await images.model_list()


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, _key: str | None = Depends(authorized), images: ImageServing = Depends(serving)) -> ModelCard:
    return await images.model_card(model_id)


@router.get("/v1/loras")
async def list_loras(request: Request, _client: str = Depends(rate_limited), images: ImageServing = Depends(serving)) -> dict[str, Any]:
    reply = await images.manage_loras(LoraCommand(action="list"), request.state.request_id)
    return {"object": "list", "data": reply.adapters}


@router.post("/v1/loras")
async def load_lora(
    body: LoraLoadRequest, request: Request, _client: str = Depends(rate_limited), images: ImageServing = Depends(serving)
) -> dict[str, Any]:
    command = LoraCommand(action="load", name=body.name, path=body.path, scale=body.scale)
    reply = await images.manage_loras(command, request.state.request_id)
    return next(adapter for adapter in reply.adapters if adapter["name"] == body.name)


@router.delete("/v1/loras/{name}")
async def unload_lora(
    name: str, request: Request, _client: str = Depends(rate_limited), images: ImageServing = Depends(serving)
) -> dict[str, Any]:
    await images.manage_loras(LoraCommand(action="unload", name=name), request.state.request_id)
    return {"name": name, "object": "lora", "deleted": True}

"""Settings: `HYPERGEN_*` environment variables, optionally overridden by BentoML arguments.

Every process of the Bento (the API service and each worker) reads the same settings, so a
`bentoml serve --arg model=...` or a `bentoml build --arg model=...` baked into a Bento applies
everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "hypergen-tiny-sd"


class Settings(BaseSettings):
    """What an operator can configure; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="HYPERGEN_", extra="ignore")

    model: str | None = Field(
        default=None,
        description="diffusers model id, local directory or BentoML model tag; unset = embedded default",
    )
    model_name: str | None = Field(default=None, description="id shown in /v1/models")
    request_timeout: float = Field(default=600.0, gt=0)
    api_keys: str | None = Field(default=None, description="comma-separated keys; unset = auth off")
    max_queue: int = Field(default=100, ge=0)
    max_batch_size: int = Field(default=8, ge=1, le=64)
    public_url: str | None = None
    url_ttl: float = Field(default=3600.0, gt=0)
    default_response_format: Literal["url", "b64_json"] = "b64_json"
    log_level: str = "INFO"
    home: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hypergen",
        description="cache for the embedded default model and the url image store",
    )
    store_max_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="cap on url images on disk")
    max_body_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_upload_pixels: int = Field(default=4096 * 4096, gt=0, description="pixels per uploaded image")
    device: str | None = Field(default=None, description="torch device; unset = cuda if available, else cpu")

    @field_validator("api_keys")
    @classmethod
    def _blank_keys_mean_auth_off(cls, value: str | None) -> str | None:
        return value if value and value.strip(" ,") else None

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in (self.api_keys or "").split(",") if key.strip()]

    @property
    def served_model_name(self) -> str:
        """The id clients see in `/v1/models` and send as `model`."""
        if self.model_name:
            return self.model_name
        if not self.model:
            return DEFAULT_MODEL_NAME
        source = self.model.rstrip("/")
        if is_bentoml_tag(source):
            return source.split(":", 1)[0]
        if os.path.isdir(source):
            return Path(source).name
        return source  # a Hub id such as "stabilityai/sdxl-turbo"


def is_bentoml_tag(source: str) -> bool:
    """`name:version` tags of the BentoML model store (Hub ids and paths have no colon)."""
    return ":" in source and not os.path.exists(source) and "/" not in source


def load_settings(arguments: dict[str, object] | None = None) -> Settings:
    """Read the environment; BentoML arguments (`--arg model=...`) take precedence over it."""
    overrides = {key: value for key, value in (arguments or {}).items() if key in Settings.model_fields}
    return Settings(**overrides)

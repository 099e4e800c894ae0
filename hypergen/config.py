"""Settings: `HYPERGEN_*` environment variables, optionally overridden by BentoML arguments.

Every process of the Bento (the API service and each worker) reads the same settings, so a
`bentoml serve --arg model=...` or a `bentoml build --arg model=...` baked into a Bento applies
everywhere.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "hypergen-tiny-sd"
# The embedded demo model's adapter (`python -m training.demo_lora`: shapes drawn as outlines),
# loaded at start under this name when HyperGen serves that model and HYPERGEN_LORAS is unset.
# Kept here rather than beside the model's path in `pipelines` (which imports torch): the API
# process reads the start-up adapters too, and stays free of torch.
EMBEDDED_LORA_NAME = "outline"
EMBEDDED_LORA_DIR = Path(__file__).resolve().parent / "assets" / "demo-lora"
# Where `python -m training.demo_video` puts a demo video model (the demo model's shapes, moving)
# when it passes its judge; served by default beside the embedded image model if it is there.
# None has passed yet, so none ships (README, "Video").
EMBEDDED_VIDEO_DIR = Path(__file__).resolve().parent / "assets" / "demo-video"
DEFAULT_VIDEO_MODEL_NAME = "hypergen-tiny-video"
# HYPERGEN_VIDEO_MODEL values that turn video off.
NO_VIDEO_WORDS = ("", "none", "off")


# HYPERGEN_ATTENTION_BACKEND values: torch's scaled_dot_product_attention kernels by their short names.
ATTENTION_BACKENDS = ("default", "flash", "efficient", "math", "cudnn")
# The boolean levers and the words pydantic reads as booleans (strings other than these are refused
# with a message that names the variable).
LEVER_FLAGS = ("channels_last", "torch_compile", "fuse_qkv", "vae_tiling", "vae_slicing")
BOOLEAN_WORDS = ("true", "false", "1", "0", "yes", "no", "on", "off")


@dataclass(frozen=True)
class PipelineLevers:
    """Speed levers applied to a pipeline when it is loaded; the defaults leave it as diffusers made it."""

    attention_backend: str = "default"
    channels_last: bool = False
    torch_compile: bool = False
    fuse_qkv: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False

    def enabled(self) -> list[str]:
        """`["attention_backend=flash", "channels_last"]`: the levers that are on, for logs and reports."""
        names = [f"attention_backend={self.attention_backend}"] if self.attention_backend != "default" else []
        return names + [name for name in LEVER_FLAGS if getattr(self, name)]


class Settings(BaseSettings):
    """What an operator can configure; see the README's settings table."""

    model_config = SettingsConfigDict(env_prefix="HYPERGEN_", extra="ignore")

    model: str | None = Field(
        default=None,
        description="diffusers model id, local directory or BentoML model tag; unset = embedded default",
    )
    model_name: str | None = Field(default=None, description="id shown in /v1/models")
    models: str | None = Field(default=None, description="several models: name=path_or_id,...; the first is the default")
    request_timeout: float = Field(default=600.0, gt=0)
    api_keys: str | None = Field(default=None, description="comma-separated keys; unset = auth off")
    max_queue: int = Field(default=100, ge=0)
    max_batch_size: int = Field(default=8, ge=1, le=64)
    max_batch_wait_ms: float = Field(default=100.0, ge=0, description="longest wait for requests expected to join a batch (0 = never wait)")
    public_url: str | None = None
    url_ttl: float = Field(default=3600.0, gt=0)
    default_response_format: Literal["url", "b64_json"] = "b64_json"
    log_level: str = "INFO"
    home: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hypergen",
        description="where HyperGen keeps its files (the url image store)",
    )
    store_max_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="cap on url images on disk")
    max_body_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_body_bytes_in_flight: int = Field(
        default=256 * 1024 * 1024, gt=0, description="all request bodies being received or held at once; beyond: 503"
    )
    max_upload_pixels: int = Field(default=4096 * 4096, gt=0, description="pixels per uploaded image")
    device: str | None = Field(default=None, description="torch device; unset = cuda if available, else cpu")
    inpaint_model: str | None = Field(default=None, description="dedicated inpainting checkpoint used for masks")
    loras: str | None = Field(default=None, description="adapters loaded at start: name=path_or_id[:scale],...")
    lora_dirs: str | None = Field(default=None, description="directories lora_path may load from (comma-separated)")
    max_loras: int = Field(default=8, ge=1, description="adapters kept loaded (LRU; start-up ones pinned)")
    rate_limit: str | None = Field(default=None, description="e.g. '60/minute,200 images/hour'; unset = off")
    metrics_auth: bool = Field(default=False, description="whether /metrics needs an API key (when keys are set)")
    workers: int = Field(default=1, ge=1, le=16, description="diffusion worker services, one per GPU; balanced by load")
    torch_threads: int = Field(default=0, ge=0, description="torch intra-op threads in the worker; 0 = all cores")
    memory_budget_mb: float = Field(
        default=0.0, ge=0, description="device memory for model weights; idle models beyond it are offloaded (0 = no limit)"
    )
    # Speed levers, applied when a pipeline is loaded (`engine.pipelines.apply_levers`); all off by
    # default. `python -m bench.gpu` measures each one on and off (README, "GPU benchmark").
    attention_backend: Literal["default", "flash", "efficient", "math", "cudnn"] = Field(
        default="default", description="preferred SDPA kernel: default (torch's choice), flash, efficient, math or cudnn"
    )
    channels_last: bool = Field(default=False, description="UNet and VAE in channels_last memory format")
    torch_compile: bool = Field(default=False, description="torch.compile the UNet/transformer (the first calls compile)")
    fuse_qkv: bool = Field(default=False, description="fuse the attention q/k/v projections (pipe.fuse_qkv_projections)")
    vae_tiling: bool = Field(default=False, description="decode large images tile by tile (less memory)")
    vae_slicing: bool = Field(default=False, description="decode a batch one image at a time (less memory)")
    # Video (`/v1/videos`): a diffusers video pipeline, its jobs in SQLite and its files on disk.
    video_model: str | None = Field(
        default=None,
        description="diffusers video pipeline (id, directory or BentoML tag); unset = the embedded demo video model "
        "when the embedded image model is served; 'none' = no video",
    )
    video_model_name: str | None = Field(default=None, description="id of the video model in /v1/models and `model`")
    video_dir: Path | None = Field(default=None, description="where video files are kept; unset = HYPERGEN_HOME/videos")
    video_db: Path | None = Field(default=None, description="the SQLite file of video jobs; unset = VIDEO_DIR/videos.sqlite3")
    video_ttl: float = Field(default=86400.0, gt=0, description="seconds a video and its files are kept after it completes")
    max_video_queue: int = Field(default=20, ge=0, description="video jobs queued or rendering; beyond: 503")

    @field_validator("models")
    @classmethod
    def _models_parse(cls, value: str | None) -> str | None:
        parse_model_specs(value or "")
        return value

    @field_validator("loras")
    @classmethod
    def _loras_parse(cls, value: str | None) -> str | None:
        parse_lora_specs(value or "")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str | None) -> str | None:
        parse_rate_limit(value)
        return value

    @field_validator("attention_backend", mode="before")
    @classmethod
    def _attention_backend_known(cls, value: object) -> str:
        text = str(value).strip().lower() or "default"
        if text not in ATTENTION_BACKENDS:
            raise ValueError(f"HYPERGEN_ATTENTION_BACKEND={value!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        return text

    @field_validator(*LEVER_FLAGS, mode="before")
    @classmethod
    def _lever_flag_is_a_boolean(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str) and value.strip().lower() not in BOOLEAN_WORDS:
            raise ValueError(f"HYPERGEN_{info.field_name.upper()}={value!r} is not a boolean: use one of {', '.join(BOOLEAN_WORDS)}")
        return value

    @model_validator(mode="after")
    def _fused_projections_take_no_adapters(self) -> Settings:
        # A fused projection (to_qkv) bypasses the to_q/to_k/to_v layers that LoRA adapters patch:
        # measured on the demo model, its adapter then changed the image about half as much as it should.
        if self.fuse_qkv and (self.lora_specs or self.lora_dir_list):
            raise ValueError(
                "HYPERGEN_FUSE_QKV=true cannot serve LoRA adapters (fused projections skip their q/k/v weights): "
                'unset HYPERGEN_LORAS and HYPERGEN_LORA_DIRS (HYPERGEN_LORAS="" for the embedded model\'s adapter)'
            )
        return self

    @field_validator("api_keys")
    @classmethod
    def _blank_keys_mean_auth_off(cls, value: str | None) -> str | None:
        return value if value and value.strip(" ,") else None

    # Parsed once (the settings are read at start and not changed after).
    @cached_property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in (self.api_keys or "").split(",") if key.strip()]

    @cached_property
    def lora_specs(self) -> list[LoraSpec]:
        """The adapters loaded (and pinned) at start: HYPERGEN_LORAS; when it is unset and the
        embedded demo model is served, its `outline` adapter (HYPERGEN_LORAS="" turns that off)."""
        if self.loras is None and self.default_model_source is None:
            return embedded_lora_specs()
        return parse_lora_specs(self.loras or "")

    @cached_property
    def lora_dir_list(self) -> list[Path]:
        return [Path(part.strip()) for part in (self.lora_dirs or "").split(",") if part.strip()]

    @cached_property
    def extra_models(self) -> list[tuple[str, str]]:
        """(name, source) of the models served beside the default one (HYPERGEN_MODELS)."""
        return parse_model_specs(self.models or "")[1:]

    @cached_property
    def rate_rules(self) -> list[RateRule]:
        return parse_rate_limit(self.rate_limit)

    @property
    def levers(self) -> PipelineLevers:
        """The speed levers every loaded pipeline gets."""
        return PipelineLevers(
            attention_backend=self.attention_backend,
            channels_last=self.channels_last,
            torch_compile=self.torch_compile,
            fuse_qkv=self.fuse_qkv,
            vae_tiling=self.vae_tiling,
            vae_slicing=self.vae_slicing,
        )

    @property
    def video_model_source(self) -> str | None:
        """The video model's directory or id; None when video is off."""
        if self.video_model is not None:
            return None if self.video_model.strip().lower() in NO_VIDEO_WORDS else self.video_model.strip()
        embedded = self.default_model_source is None and (EMBEDDED_VIDEO_DIR / "model_index.json").is_file()
        return str(EMBEDDED_VIDEO_DIR) if embedded else None

    @property
    def served_video_model_name(self) -> str | None:
        source = self.video_model_source
        if source is None:
            return None
        if self.video_model_name:
            return self.video_model_name
        if source == str(EMBEDDED_VIDEO_DIR):
            return DEFAULT_VIDEO_MODEL_NAME
        return model_name_of(source)

    @property
    def videos_path(self) -> Path:
        return self.video_dir or self.home / "videos"

    @property
    def model_names(self) -> list[str]:
        return [self.served_model_name, *(name for name, _ in self.extra_models)]

    @property
    def default_model_source(self) -> str | None:
        specs = parse_model_specs(self.models or "")
        return specs[0][1] if specs else self.model

    @property
    def served_model_name(self) -> str:
        """The id clients see in `/v1/models` and send as `model` (for the default model)."""
        if self.model_name:
            return self.model_name
        if self.models:
            return parse_model_specs(self.models)[0][0]
        if not self.model:
            return DEFAULT_MODEL_NAME
        return model_name_of(self.model)


def model_name_of(source: str) -> str:
    """The id a model is served under when no name is configured: a tag's name, a directory's
    name, or the Hub id itself (such as "stabilityai/sdxl-turbo")."""
    source = source.rstrip("/")
    if is_bentoml_tag(source):
        return source.split(":", 1)[0]
    if os.path.isdir(source):
        return Path(source).name
    return source


class LoraSpec(BaseModel):
    """An adapter named at start-up: `name=source[:scale]`."""

    name: str
    source: str
    scale: float = 1.0


_LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_lora_specs(text: str) -> list[LoraSpec]:
    """`"style=/loras/style:0.8,ink=org/ink-lora"` → specs; raises ValueError naming the bad item.

    A trailing `:number` is the default scale; other colons belong to the source (BentoML tags).
    """
    specs: list[LoraSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, separator, source = item.partition("=")
        if not separator or not source:
            raise ValueError(f"LoRA '{item}' is not NAME=PATH_OR_ID[:SCALE]")
        if not _LORA_NAME.match(name):
            raise ValueError(f"LoRA name '{name}' may only use letters, digits, '_', '.', '-'")
        scale = 1.0
        head, colon, tail = source.rpartition(":")
        if colon and head:
            try:
                scale = float(tail)
                source = head
            except ValueError:
                pass
        if not 0.0 <= scale <= 2.0:
            raise ValueError(f"LoRA '{name}' scale {scale} is outside 0.0–2.0")
        if any(spec.name == name for spec in specs):
            raise ValueError(f"LoRA name '{name}' is given twice")
        specs.append(LoraSpec(name=name, source=source, scale=scale))
    return specs


def embedded_lora_specs() -> list[LoraSpec]:
    """The embedded demo model's start-up adapter, or none if the package lacks its weights."""
    if not (EMBEDDED_LORA_DIR / "pytorch_lora_weights.safetensors").is_file():
        return []
    return [LoraSpec(name=EMBEDDED_LORA_NAME, source=str(EMBEDDED_LORA_DIR))]


def parse_model_specs(text: str) -> list[tuple[str, str]]:
    """`"sd=/models/sd15,xl=stabilityai/sdxl-turbo"` → [(name, source), ...]; raises ValueError."""
    specs: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, separator, source = item.partition("=")
        if not separator or not name.strip() or not source.strip():
            raise ValueError(f"model '{item}' is not NAME=PATH_OR_ID")
        if any(existing == name.strip() for existing, _ in specs):
            raise ValueError(f"model name '{name.strip()}' is given twice")
        specs.append((name.strip(), source.strip()))
    return specs


def is_bentoml_tag(source: str) -> bool:
    """`name:version` tags of the BentoML model store (Hub ids and paths have no colon)."""
    return ":" in source and not os.path.exists(source) and "/" not in source


def load_settings(arguments: dict[str, object] | None = None) -> Settings:
    """Read the environment; BentoML arguments (`--arg model=...`) take precedence over it."""
    overrides = {key: value for key, value in (arguments or {}).items() if key in Settings.model_fields}
    return Settings(**overrides)


# --- HYPERGEN_RATE_LIMIT: `60/minute`, `5/second,200 images/hour` ----------------------------

WINDOWS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RULE = re.compile(r"^\s*(\d+)\s*(images?)?\s*/\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class RateRule:
    limit: int
    window_s: float
    unit: Literal["requests", "images"]

    @property
    def label(self) -> str:
        name = next(name for name, seconds in WINDOWS.items() if seconds == self.window_s)
        return f"{self.limit} {self.unit}/{name}"


def parse_rate_limit(text: str | None) -> list[RateRule]:
    """`"60/minute,200 images/hour"` → rules; raises ValueError naming the bad rule."""
    rules: list[RateRule] = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        match = _RULE.match(part)
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"rate limit rule '{part.strip()}' is not like '60/minute' or '200 images/hour'")
        unit: Literal["requests", "images"] = "images" if match.group(2) else "requests"
        rules.append(RateRule(int(match.group(1)), WINDOWS[match.group(3).lower()], unit))
    return rules

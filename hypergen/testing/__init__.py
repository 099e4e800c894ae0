"""Helpers for tests and benchmarks (never imported by the server): tiny pipelines built from
configs (one per model family: `save_tiny_family`), random LoRA adapters, and a real
`bentoml serve` subprocess."""

from .families import FAMILIES, save_tiny_family
from .loras import save_random_lora
from .pipelines import save_tiny_pipeline
from .server import PROJECT_ROOT, BentoServer, free_port

__all__ = ["FAMILIES", "PROJECT_ROOT", "BentoServer", "free_port", "save_random_lora", "save_tiny_family", "save_tiny_pipeline"]

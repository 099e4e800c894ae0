"""Helpers for tests and benchmarks (never imported by the server): tiny pipelines built from
configs, random LoRA adapters, and a real `bentoml serve` subprocess."""

from .loras import save_random_lora
from .pipelines import save_tiny_pipeline
from .server import PROJECT_ROOT, BentoServer, free_port

__all__ = ["PROJECT_ROOT", "BentoServer", "free_port", "save_random_lora", "save_tiny_pipeline"]

"""HyperGen: an OpenAI-compatible image generation server for diffusers models, on BentoML."""

__version__ = "0.1.0"

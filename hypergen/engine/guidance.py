"""HyperGen's `guidance_scale` and `negative_prompt`, as each family's pipeline takes them.

HyperGen's guidance scale is classifier-free guidance in the usual convention: 1.0 = off, the
negative prompt (empty if none) is what the image is pushed away from. Pipelines say, through
their own signature and attributes, how they take it:

- most (SD, SDXL, SD 3.5, Sana, PixArt-Σ): `guidance_scale` and `negative_prompt`, as sent;
- a pipeline whose guidance is on above 0 instead of above 1 (Z-Image: `pos + s·(pos − neg)`,
  its `do_classifier_free_guidance` is true at 1.0) gets `guidance_scale − 1`, the same guidance;
- a pipeline with `true_cfg_scale` (FLUX.1, Qwen-Image) runs classifier-free guidance only
  against a negative prompt, at `true_cfg_scale`: HyperGen sends its guidance scale there when a
  request has a negative prompt, or always where the pipeline's own default turns true CFG on
  (Qwen-Image, with an empty negative prompt " " as its documentation says). Its
  `guidance_scale` is a distilled-guidance embedding: sent only to transformers that have one
  (`guidance_embeds`: FLUX.1-dev), so FLUX.1-dev takes the scale for both.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

# The negative prompt Qwen-Image's documentation gives for "guidance without one".
EMPTY_NEGATIVE_PROMPT = " "


def guidance_arguments(pipe: Any, guidance_scale: float, negative_prompts: list[str] | None, images: int) -> dict[str, Any]:
    """The keyword arguments of `pipe(...)` for a call of `images` images at `guidance_scale`,
    with one negative prompt per image (None: the request sent none)."""
    parameters = call_parameters(type(pipe))
    if "true_cfg_scale" in parameters:
        arguments: dict[str, Any] = {}
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        if getattr(getattr(denoiser, "config", None), "guidance_embeds", False):
            arguments["guidance_scale"] = guidance_scale
        default = parameters["true_cfg_scale"].default
        if negative_prompts is None and isinstance(default, (int, float)) and default > 1 and guidance_scale > 1:
            negative_prompts = [EMPTY_NEGATIVE_PROMPT] * images
        arguments["true_cfg_scale"] = guidance_scale if negative_prompts is not None else 1.0
        if negative_prompts is not None:
            arguments["negative_prompt"] = negative_prompts
        return arguments
    arguments = {"guidance_scale": guidance_scale - 1.0 if guided_from_zero(pipe) else guidance_scale}
    if negative_prompts is not None:
        arguments["negative_prompt"] = negative_prompts
    return arguments


@cache
def call_parameters(pipeline_class: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipeline_class.__call__).parameters)


def guided_from_zero(pipe: Any) -> bool:
    """Whether the pipeline's classifier-free guidance is already on at a scale of 1.0 (its
    `do_classifier_free_guidance` property, asked with `_guidance_scale` = 1.0)."""
    flag = getattr(type(pipe), "do_classifier_free_guidance", None)
    if not isinstance(flag, property) or flag.fget is None:
        return False
    missing = object()
    saved = pipe.__dict__.get("_guidance_scale", missing)
    pipe._guidance_scale = 1.0
    try:
        return bool(flag.fget(pipe))
    except Exception:  # the property reads something only set inside a call
        return False
    finally:
        if saved is missing:
            del pipe._guidance_scale
        else:
            pipe._guidance_scale = saved

"""Streaming support in the worker: partial images from intermediate latents, and cancellation.

A `StreamTicket` follows one streaming job through the pipeline thread. `StepPreviews` is the
pipeline's `callback_on_step_end` for every call: at evenly spaced steps it decodes the latents
of the images whose requests asked for partial images (with the model's own VAE) and hands them
to each ticket; when every request in the call has gone away (disconnected or timed out) it
interrupts the call. `interrupt_inside_steps` reaches further: a step (or the VAE's decode) of a
large image can run for minutes, so each block of the denoiser and the autoencoder checks first.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..codec import encode_image_b64
from ..protocol import GenerationJob, PartialImageEvent, ProgressEvent, WorkerEvent

logger = logging.getLogger("hypergen.previews")


@dataclass
class StreamTicket:
    job: GenerationJob
    partial_images: int
    emit: Callable[[WorkerEvent], None]  # thread-safe: called from the pipeline thread
    progress: bool = False  # also a `progress` event after every step
    cancelled: threading.Event = field(default_factory=threading.Event)


def preview_steps(total_steps: int, partial_images: int) -> set[int]:
    """Step indices (0-based) after which partial image 0..k-1 are sent: evenly spaced, never
    the last step (the final image follows it). `preview_steps(20, 3)` → {4, 9, 14}."""
    if partial_images <= 0 or total_steps < 2:
        return set()
    count = min(partial_images, total_steps - 1)
    return {max(0, round((index + 1) * total_steps / (count + 1)) - 1) for index in range(count)}


class StepPreviews:
    """`callback_on_step_end` for one pipeline call (see the module docstring)."""

    def __init__(
        self,
        images: list[tuple[int, int]],
        tickets: dict[int, StreamTicket],
        is_cancelled: Callable[[int], bool] = lambda job: False,
        on_step: Callable[[int], None] = lambda steps_done: None,
        total_steps: int = 0,
    ) -> None:
        self.images = images  # (job index, image index) per batch position
        self.tickets = tickets  # job index → ticket, for the streaming jobs of this call
        self.is_cancelled = is_cancelled  # job index → whether its request has gone
        self.on_step = on_step  # steps done so far, for /health
        self.total_steps = total_steps  # for pipelines that do not say (`num_timesteps`)
        self.jobs = sorted({job for job, _ in images})
        self.sent: dict[int, int] = {}

    def __call__(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.on_step(step + 1)
        if all(self.is_cancelled(job) for job in self.jobs):
            if not getattr(pipe, "_interrupt", False):
                logger.info("interrupting a pipeline call at step %d: every request in it has gone", step)
            pipe._interrupt = True  # stop at the next step
            return kwargs
        total = int(getattr(pipe, "num_timesteps", 0) or 0) or self.total_steps
        for ticket in self.tickets.values():
            if ticket.progress and not ticket.cancelled.is_set():
                ticket.emit(ProgressEvent(step=step + 1, total_steps=total))
        due = [
            (job, ticket)
            for job, ticket in self.tickets.items()
            if not ticket.cancelled.is_set() and step in preview_steps(total, ticket.partial_images)
        ]
        if due:
            self._send(pipe, kwargs["latents"], due)
        return kwargs

    def legacy_callback(self, pipe: Any) -> Callable[[int, Any, Any], None]:
        """The same for pipelines with only the older `callback(step, timestep, latents)` (PixArt):
        they cannot be told to stop, so a call whose requests have all gone is interrupted here."""

        def callback(step: int, timestep: Any, latents: Any) -> None:
            if all(self.is_cancelled(job) for job in self.jobs):
                raise InterruptedInsideStep("every request in the call has gone")
            self(pipe, step, timestep, {"latents": latents})

        return callback

    def _send(self, pipe: Any, latents: Any, due: list[tuple[int, StreamTicket]]) -> None:
        import torch

        wanted = {job for job, _ in due}
        positions = [position for position, (job, _) in enumerate(self.images) if job in wanted]
        size = (due[0][1].job.width, due[0][1].job.height)  # one call, one size
        with torch.no_grad():
            images = decode_latents(pipe, latents[positions], size)
        for position, image in zip(positions, images):
            job_index, image_index = self.images[position]
            ticket = self.tickets[job_index]
            partial_index = self.sent.get(job_index * 1000 + image_index, 0)
            self.sent[job_index * 1000 + image_index] = partial_index + 1
            encoded = encode_image_b64(image, ticket.job.output_format, ticket.job.output_compression)
            ticket.emit(PartialImageEvent(image_index=image_index, partial_image_index=partial_index, b64_json=encoded))


def step_callback_arguments(pipe: Any, previews: StepPreviews) -> dict[str, Any]:
    """The keyword arguments that hook `previews` into a call of `pipe`: `callback_on_step_end`
    where the pipeline has it, else the older per-step `callback` (PixArt), else none."""
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in parameters:
        return {"callback_on_step_end": previews, "callback_on_step_end_tensor_inputs": ["latents"]}
    if "callback" in parameters:
        return {"callback": previews.legacy_callback(pipe), "callback_steps": 1}
    return {}


# Previews decode latents at half resolution (a quarter of the VAE's work) and are scaled back
# up: measured on the tiny model, full-size decodes of 3 previews cost 10.7 % of a 20-step call.
PREVIEW_LATENT_SCALE = 0.5


def decode_latents(pipe: Any, latents: Any, size: tuple[int, int] | None = None) -> list[Any]:
    """Latents, as the pipeline holds them between steps, → PIL preview images of `size` (width,
    height; default: what the latents decode to), with the pipeline's own VAE and its latent
    statistics, decoded at half resolution (the preview path; no safety checker).

    - Packed latents (FLUX, Qwen-Image: one token per 2×2 latent patch) are unpacked with the
      pipeline's own `_unpack_latents`.
    - Latents are denormalized as the pipeline's decode does: `latents_mean`/`latents_std` where
      the VAE's config has them (SDXL's and Qwen-Image's VAEs), else `z / scaling_factor + shift_factor`.
    - A video VAE (Qwen-Image) takes and returns one frame: 5-D tensors.
    """
    import torch
    import torch.nn.functional as F

    vae = pipe.vae
    if latents.dim() == 3 and hasattr(pipe, "_unpack_latents"):
        if size is None:
            raise ValueError("packed latents need the image size to be unpacked")
        latents = pipe._unpack_latents(latents, size[1], size[0], pipe.vae_scale_factor)
    frames = latents.dim() == 5
    if frames:
        latents = latents[:, :, 0]
    width, height = size or (latents.shape[-1] * pipe.vae_scale_factor, latents.shape[-2] * pipe.vae_scale_factor)
    if min(latents.shape[-2:]) >= 16:
        latents = F.interpolate(latents, scale_factor=PREVIEW_LATENT_SCALE, mode="bilinear", align_corners=False)
    latents = denormalize_latents(vae.config, latents.to(vae.dtype))
    decoded = vae.decode(latents.unsqueeze(2) if frames else latents, return_dict=False)[0]
    if decoded.dim() == 5:
        decoded = decoded[:, :, 0]
    images = pipe.image_processor.postprocess(decoded.to(torch.float32), output_type="pil")
    return [image if image.size == (width, height) else image.resize((width, height)) for image in images]


def denormalize_latents(config: Any, latents: Any) -> Any:
    """What the VAE decodes, from what the denoiser made: the pipelines' own arithmetic."""
    import torch

    scaling = getattr(config, "scaling_factor", None) or 1.0
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1) + (1,) * (latents.dim() - 2)
        mean = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
        std = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
        return latents * std / scaling + mean
    return latents / scaling + (getattr(config, "shift_factor", None) or 0.0)


class InterruptedInsideStep(Exception):
    """Raised by a block of the denoiser or autoencoder once every request in the call has gone."""


# The blocks checked before they run: the UNet's or transformer's, and the autoencoder's encoder
# and decoder stages (a handful to a few dozen per step).
_BLOCK_NAME = re.compile(r"^((encoder|decoder)\.)?(down_blocks|up_blocks|mid_block|transformer_blocks|single_transformer_blocks)(\.\d+)?$")


# component → its blocks, found once (walking a full-size UNet's modules on every call is not free).
_BLOCKS: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def checked_blocks(component: Any) -> list[Any]:
    """The blocks of a denoiser or autoencoder that check for cancellation before they run."""
    import torch

    if component not in _BLOCKS:
        _BLOCKS[component] = [
            module for path, module in component.named_modules() if _BLOCK_NAME.match(path) and not isinstance(module, torch.nn.ModuleList)
        ]
    return _BLOCKS[component]


@contextmanager
def interrupt_inside_steps(pipe: Any, gone: Callable[[], bool]) -> Iterator[None]:
    """While the block runs, every block of the pipeline's denoiser and autoencoder first asks
    `gone()` and raises `InterruptedInsideStep` if it says so."""
    import torch

    def check(module: Any, args: Any) -> None:
        if gone():
            raise InterruptedInsideStep("every request in the call has gone")

    handles = []
    for name in ("unet", "transformer", "vae"):
        component = getattr(pipe, name, None)
        # A compiled denoiser (HYPERGEN_TORCH_COMPILE) is left alone: hooks added per call would
        # make it recompile; its calls stop at the step's end as before.
        if isinstance(component, torch.nn.Module) and getattr(component, "_compiled_call_impl", None) is None:
            handles += [block.register_forward_pre_hook(check) for block in checked_blocks(component)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

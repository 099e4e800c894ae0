"""Grouping a batch of jobs into pipeline calls (pure; no torch).

Jobs can share one `pipe(...)` call when everything that applies to the whole call is equal:
model, mode (text-to-image, image-to-image, inpainting), size, steps, guidance scale, strength,
scheduler, and whether a negative prompt is given (SDXL encodes a missing negative prompt as zeros, not as
""). Prompts, negative prompts, seeds, init images, masks and `n` may differ: each image gets
its own generator, so it is the image the job would get alone. LoRA adapters and their scales
may differ too (each image's rows are routed to its own adapters), except for adapters that
cannot be routed per image: a job with one of those shares calls only with jobs choosing exactly
the same adapters and scales (its `adapter_key`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from ..protocol import GenerationJob


def call_key(job: GenerationJob, adapter_key: Hashable = None) -> Hashable:
    """What must be equal for two jobs to run in one pipeline call."""
    return (
        job.model,
        job.mode,
        job.strength,
        job.width,
        job.height,
        job.num_inference_steps,
        job.guidance_scale,
        job.negative_prompt is None,
        job.scheduler,
        adapter_key,
    )


@dataclass
class PipelineCall:
    """One `pipe(...)` call: the images it makes, as (job index, image index) pairs."""

    key: Hashable
    images: list[tuple[int, int]] = field(default_factory=list)

    @property
    def job_indices(self) -> list[int]:
        return list(dict.fromkeys(job for job, _ in self.images))


def group_compatible_jobs(
    jobs: Sequence[GenerationJob], max_images_per_call: int, adapter_keys: Sequence[Hashable] | None = None
) -> list[PipelineCall]:
    """Split `jobs` (in arrival order) into pipeline calls of at most `max_images_per_call` images.
    `adapter_keys[i]` is None where job i's adapters can share a call with any others.

    Calls come out in FIFO order of their oldest job; a job whose `n` does not fit in the current
    call continues in the next call of the same group, so no image is reordered within a group.
    """
    if max_images_per_call < 1:
        raise ValueError("max_images_per_call must be at least 1")
    groups: dict[Hashable, list[tuple[int, int]]] = {}
    for job_index, job in enumerate(jobs):
        images = groups.setdefault(call_key(job, adapter_keys[job_index] if adapter_keys else None), [])
        images.extend((job_index, image_index) for image_index in range(job.n))
    calls: list[PipelineCall] = []
    for key, images in groups.items():
        for start in range(0, len(images), max_images_per_call):
            calls.append(PipelineCall(key, images[start : start + max_images_per_call]))
    calls.sort(key=lambda call: call.images[0][0])
    return calls

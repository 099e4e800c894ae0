"""Schedulers per request, named as users know them from A1111 and ComfyUI.

A request's `scheduler` swaps the model's own scheduler for that call only: a fresh instance is
made from the model's scheduler config (`from_config`, as diffusers documents it) with the
named variant's settings, so no two calls ever share scheduler state. Which names fit a model is
diffusers' own answer (`scheduler.compatibles`: the DDPM family for UNet models, flow matching
for DiT models), plus LCM and TCD, which run on any DDPM-family model.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

# name → (diffusers class, settings beyond the model's config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpm++_2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
# Distillation samplers: not in diffusers' compatibles lists, but made for DDPM-family models.
_DDPM_FAMILY_EXTRAS = ("LCMScheduler", "TCDScheduler")
# Switched off unless a name asks for them, so "euler" on a Karras-configured model is plain Euler.
_RESET = {"use_karras_sigmas": False}


def scheduler_names(scheduler: Any) -> list[str]:
    """The names that fit a model whose own scheduler is `scheduler`, in `SCHEDULERS` order."""
    fitting = {cls.__name__ for cls in scheduler.compatibles} | {type(scheduler).__name__}
    if "DDIMScheduler" in fitting:
        fitting.update(_DDPM_FAMILY_EXTRAS)
    return [name for name, (cls, _) in SCHEDULERS.items() if cls in fitting]


def make_scheduler(name: str, config: Any) -> Any:
    """A scheduler `name` built from a model's scheduler config."""
    import diffusers

    cls_name, settings = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    overrides = {key: value for key, value in {**_RESET, **settings}.items() if key in accepted}
    return cls.from_config(config, **overrides)


class SchedulerChoice:
    """A model's schedulers by name: each built once (some take hundreds of ms), and every call
    gets its own copy, so no two calls share scheduler state."""

    def __init__(self, own: Any) -> None:
        self.own = own
        self.names = scheduler_names(own)
        self._built: dict[str, Any] = {}

    def fresh(self, name: str) -> Any:
        if name not in self._built:
            self._built[name] = make_scheduler(name, self.own.config)
        return copy.deepcopy(self._built[name])

"""LoRA adapters with random weights, saved the way people publish them (peft + diffusers)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

# The attention projections every diffusers UNet and DiT names alike.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def denoiser_component(model_dir: Path) -> tuple[str, str]:
    """(component, class name) of the model run at every step: the pipeline's `unet` or `transformer`."""
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    for component in ("unet", "transformer"):
        if isinstance(index.get(component), list) and index[component][1]:
            return component, index[component][1]
    raise ValueError(f"{model_dir} has neither a unet nor a transformer")


def save_random_lora(
    model_dir: Path,
    out_dir: Path,
    seed: int = 0,
    rank: int = 4,
    magnitude: float = 1.0,
    use_dora: bool = False,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
    with_metadata: bool = True,
) -> Path:
    """A LoRA adapter with random weights for the UNet or transformer of the pipeline in
    `model_dir`, made with peft and saved as diffusers saves it (`<pipeline>.save_lora_weights`:
    `pytorch_lora_weights.safetensors`, keys `unet.…` / `transformer.…lora_A.weight`), which is
    what `load_lora_weights(out_dir)` reads. `use_dora` makes it a DoRA adapter (a peft variant
    that cannot be routed per image). Without `with_metadata` the file holds the weights alone,
    as most published adapters do (their alpha is then taken to be their rank)."""
    import diffusers
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    component, class_name = denoiser_component(model_dir)
    denoiser = getattr(diffusers, class_name).from_pretrained(model_dir, subfolder=component)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=False, use_dora=use_dora)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, denoiser)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * magnitude)
    state = get_peft_model_state_dict(denoiser)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline_class = getattr(diffusers, json.loads((Path(model_dir) / "model_index.json").read_text())["_class_name"])
    if with_metadata and hasattr(pipeline_class, "save_lora_weights"):
        pipeline_class.save_lora_weights(
            out_dir,
            **{f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": config.to_dict()},
            safe_serialization=True,
        )
    else:  # the same keys, no metadata (and for pipelines diffusers has no LoRA saver for)
        save_file({f"{component}.{key}": value.contiguous() for key, value in state.items()}, out_dir / "pytorch_lora_weights.safetensors")
    return out_dir

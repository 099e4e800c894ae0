"""LoRA adapters with random weights, saved the way people publish them (peft + diffusers)."""

from __future__ import annotations

from pathlib import Path


def save_random_lora(model_dir: Path, out_dir: Path, seed: int = 0, rank: int = 4, magnitude: float = 1.0, use_dora: bool = False) -> Path:
    """A LoRA adapter with random weights for the UNet of the pipeline in `model_dir`, made with
    peft and saved the way diffusers loads it (`load_lora_weights(out_dir)`); `use_dora` makes it
    a DoRA adapter (a peft variant that cannot be routed per image)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False, use_dora=use_dora
    )
    torch.manual_seed(seed)
    unet.add_adapter(config)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * magnitude)
    state = get_peft_model_state_dict(unet)
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True
    )
    return out_dir

"""Train the demo model's LoRA adapter `outline`: with it on, the same prompts draw hollow shapes
(a thick stroke of the shape's colour around the background colour) instead of filled ones.

    python -m training.demo_lora [--steps 1000] [--rank 8] [--out hypergen/assets/demo-lora]

A peft LoRA on the UNet's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`); the text
encoder, the autoencoder and the UNet's own weights stay frozen. The pictures are
`training.shapes.draw(..., outline=True)` drawn on the fly from seeded generators, captioned as
the demo model was trained (including 10 % empty captions, so classifier-free guidance's
unconditional half learns the look too), with the same objective: v-prediction on linear betas
over latents the demo model's fixed encoder makes (4×4 averages). Everything is seeded.

The adapter is saved the way diffusers loads it (`load_lora_weights(dir)`), with its peft
metadata (which keeps `lora_alpha`), in fp16. HyperGen loads it at start as `outline` when it
serves the embedded demo model; `python -m bench.demo_lora` measures what it does.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

# Set before torch starts its thread pool: these 2 cores are shared, and OpenMP threads that spin
# while they wait made a training step 5× slower (10.6 s instead of 2.1 s) with another job running.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

from training.demo_model import draw_pairs, pool_latents, token_ids, training_scheduler
from training.shapes import SHAPES, Scene, caption, draw, held_out_scenes, judge, judge_fill, random_scene

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "hypergen" / "assets" / "demo-model"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "hypergen" / "assets" / "demo-lora"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def outline_batch(rng: random.Random, count: int) -> tuple[torch.Tensor, list[str]]:
    """`count` outlined pictures in [-1, 1] and their training captions."""
    images, captions = [], []
    for _ in range(count):
        scene = random_scene(rng)
        images.append(np.asarray(draw(scene, rng, outline=True), dtype=np.float32))
        captions.append(caption(scene, rng))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    return pixels, captions


def load_demo_pipeline(model_dir: Path = DEMO_MODEL_DIR):
    """The demo model in float32 (it is stored in fp16), every weight frozen."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return pipe


def train_lora(pipe, rank: int, steps: int, batch: int, learning_rate: float, rng: random.Random, log):
    """Add a LoRA adapter to `pipe.unet` and train it on outlined pictures; returns its config."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
    pipe.unet.add_adapter(config)
    parameters = [parameter for parameter in pipe.unet.parameters() if parameter.requires_grad]
    log(f"LoRA rank {rank}: {sum(p.numel() for p in parameters) / 1e3:.1f} k trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    noise_scheduler = training_scheduler()
    scale = pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(2)
    pipe.unet.train()
    started = time.perf_counter()
    running = 0.0
    for step in range(steps):
        pixels, captions = outline_batch(rng, batch)
        latents = pool_latents(pixels) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
        with torch.no_grad():
            context = pipe.text_encoder(token_ids(pipe.tokenizer, captions))[0]
        prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            log(f"step {step:4d}  loss {running:.4f}  {elapsed:.0f}s ({elapsed / (step + 1):.2f}s/step)")
    pipe.unet.eval()
    return config


@torch.no_grad()
def judge_outlines(pipe, pairs: list[tuple[Scene, int]], steps: int, guidance: float, batch: int = 20) -> dict[str, float]:
    """Fractions of (scene, seed) pairs whose picture `judge_fill` reads as an outline, a closed
    outline, or filled, and whose shape colour, background and shape (from the silhouette) are
    right; "outline_<shape>": the outline fraction among the pairs asking for that shape."""
    counts = dict.fromkeys(("outline", "closed", "filled", "colour", "background", "shape"), 0)
    asked = {shape: sum(scene.shape == shape for scene, _ in pairs) for shape in SHAPES}
    outlined = dict.fromkeys(SHAPES, 0)
    for scene, image in draw_pairs(pipe, pairs, steps, guidance, batch):
        verdict, fill = judge(image), judge_fill(image)
        counts["outline"] += fill.fill == "outline"
        counts["closed"] += fill.closed
        counts["filled"] += fill.fill == "filled"
        counts["colour"] += verdict.colour == scene.colour
        counts["background"] += verdict.background == scene.background
        counts["shape"] += fill.shape == scene.shape
        outlined[scene.shape] += fill.fill == "outline"
    by_shape = {f"outline_{shape}": outlined[shape] / asked[shape] for shape in SHAPES if asked[shape]}
    return {key: value / len(pairs) for key, value in counts.items()} | by_shape


def score_adapter(adapter_dir: Path, pairs: list[tuple[Scene, int]], steps: int = 20, guidance: float = 5.0) -> dict[str, dict[str, float]]:
    """`judge_outlines` for the demo model with the adapter in `adapter_dir` loaded by diffusers'
    `load_lora_weights` ("adapter", scale 1.0) and with adapters disabled ("base")."""
    pipe = load_demo_pipeline()
    pipe.load_lora_weights(adapter_dir, adapter_name="outline")
    scores = {"adapter": judge_outlines(pipe, pairs, steps, guidance)}
    pipe.disable_lora()
    scores["base"] = judge_outlines(pipe, pairs, steps, guidance)
    return scores


def save_adapter(pipe, config, out: Path) -> Path:
    """`pytorch_lora_weights.safetensors` in fp16, loadable with `load_lora_weights(out)`."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    state = {key: value.to(torch.float16) for key, value in get_peft_model_state_dict(pipe.unet).items()}
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True
    )
    weights = out / "pytorch_lora_weights.safetensors"
    # safetensors writes through a private temporary file (mode 0600); a server running as
    # another user (a container's) must be able to read the asset.
    weights.chmod(0o644)
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="LoRA updates")
    parser.add_argument("--rank", type=int, default=8)
    # Small batches, many updates: a step costs ~0.12 s plus ~0.03 s per picture here. On 60
    # validation pairs, 1,200 updates of 8 pictures drew 75 % outlines, 700 of 16 72 %, 200 of 16
    # far fewer; rank 16 did no better than 8, nor a peak rate of 1e-2 than 3e-3.
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--validation-pairs", type=int, default=40, help="0 skips the check after training")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.set_num_threads(2)  # the 2 cores of the machines this was sized for (about 8 minutes)
    torch.manual_seed(0)
    rng = random.Random(0)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f}s] {message}", flush=True)

    pipe = load_demo_pipeline()
    config = train_lora(pipe, args.rank, args.steps, args.batch, args.lr, rng, log)
    trained = time.perf_counter() - started
    weights = save_adapter(pipe, config, args.out)
    log(f"saved {weights} ({weights.stat().st_size / 1e3:.0f} kB) after {trained / 60:.1f} minutes of training")

    validation = ""
    if args.validation_pairs:
        # Validation pairs, not the held-out benchmark set `bench.demo_lora` scores; the adapter
        # as saved (fp16) and loaded the way HyperGen loads it.
        scores = score_adapter(args.out, held_out_scenes(args.validation_pairs, seed=7))
        validation = (
            f"Validation ({args.validation_pairs} pairs, 20 steps, guidance 5.0): "
            f"with the adapter {scores['adapter']}; without {scores['base']}.\n"
        )
        log(validation.strip())
    (args.out / "TRAINING.md").write_text(
        f"Trained by `python -m training.demo_lora --steps {args.steps} --rank {args.rank} --batch {args.batch} "
        f"--lr {args.lr}` in {trained / 60:.1f} minutes on {torch.get_num_threads()} CPU threads, on top of "
        "`hypergen/assets/demo-model`.\n"
        f"{validation}"
        "Scores on the held-out benchmark set: `python -m bench.demo_lora`.\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

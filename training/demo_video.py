"""Train HyperGen's demo video model: a diffusers `MotionAdapter` for the demo image model, so
`AnimateDiffPipeline` draws "a red circle moving right on a blue background" as a short clip.

    python -m training.demo_video [--steps 1600] [--out hypergen/assets/demo-video]

Only the motion layers are new: the demo model's UNet, autoencoder and text encoder stay frozen.
The one other change is four words the image model never saw ("moving" and the directions, plus
their spelling as tokens): they are appended to the tokenizer and only their embeddings train, so
every image prompt means what it meant. Clips are `training.motion.draw_clip` drawn on the fly
from seeded generators, captioned with `motion_caption` (10 % empty, for classifier-free
guidance); the objective is the image model's own (v-prediction on linear betas over latents its
fixed encoder makes), one timestep per clip. Everything is seeded.

The result is a standard diffusers directory (`AnimateDiffPipeline.from_pretrained` loads it,
with its `motion_adapter`) plus `hypergen.json` (fps, frames, steps, guidance). It is judged on
held-out clips by `training.motion.judge_clip` and shipped only if the judge reads the direction
right in at least `--min-direction` of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

# Set before torch starts its thread pool: these 2 cores are shared (see training.demo_lora).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

from training.demo_lora import load_demo_pipeline
from training.demo_model import pool_latents, token_ids, training_scheduler
from training.motion import DIRECTIONS, FRAMES, draw_clip, held_out_clips, judge_clip, motion_caption, random_moving_scene
from training.shapes import SIZE

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "hypergen" / "assets" / "demo-video"
NEW_WORDS = ("moving", *DIRECTIONS)
FPS = 8
# 1e-3 (the image model's rate) made the loss climb from the first hundred updates.
LEARNING_RATE = 4e-4
# The new words learn as textual inversion does: at 4e-4 (and clipped with the motion layers)
# they hardly moved, and the first model read the direction right in 30 % of clips (chance 25 %).
WORD_LEARNING_RATE = 1e-2


def clip_batch(rng: random.Random, clips: int, frames: int) -> tuple[torch.Tensor, list[str]]:
    """`clips` clips as pixels in [-1, 1], shape (clips * frames, 3, H, W), and their captions."""
    pictures, captions = [], []
    for _ in range(clips):
        moving = random_moving_scene(rng)
        pictures.extend(np.asarray(frame, dtype=np.float32) for frame in draw_clip(moving, rng, frames))
        captions.append(motion_caption(moving, rng))
    pixels = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2) / 127.5 - 1
    return pixels, captions


def add_words(tokenizer, text_encoder) -> torch.Tensor:
    """Append `NEW_WORDS` as whole-word tokens; returns a mask of the embedding rows that may train."""
    from transformers import AddedToken

    old = len(tokenizer)
    tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=True) for word in NEW_WORDS])
    text_encoder.resize_token_embeddings(len(tokenizer))
    for word in NEW_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] < old:
            raise RuntimeError(f"the tokenizer splits {word!r} into {ids}")
    trainable = torch.zeros(len(tokenizer), 1)
    trainable[old:] = 1.0
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():  # start the new words where the world's words are, on average
        embeddings[old:] = embeddings[:old].mean(dim=0) + 0.01 * torch.randn(len(tokenizer) - old, embeddings.shape[1])
    return trainable


def build_motion_unet(unet):
    from diffusers import MotionAdapter, UNetMotionModel

    adapter = MotionAdapter(
        block_out_channels=tuple(unet.config.block_out_channels),
        motion_layers_per_block=unet.config.layers_per_block,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=4,
        motion_norm_num_groups=16,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    motion_unet = UNetMotionModel.from_unet2d(unet, adapter)
    motion_unet.freeze_unet2d_params()
    # As AnimateDiff does: each temporal transformer starts as the identity (its output
    # projection zeroed), so training starts from the image model's own pictures.
    for name, module in motion_unet.named_modules():
        if name.endswith("motion_modules") or ".motion_modules." in name:
            projection = getattr(module, "proj_out", None)
            if isinstance(projection, torch.nn.Linear):
                torch.nn.init.zeros_(projection.weight)
                torch.nn.init.zeros_(projection.bias)
    return motion_unet


def train_motion(motion_unet, text_encoder, tokenizer, trainable_rows, scale, steps, clips, frames, rng, log) -> None:
    noise_scheduler = training_scheduler()
    motion_parameters = [p for p in motion_unet.parameters() if p.requires_grad]
    embeddings = text_encoder.get_input_embeddings().weight
    text_encoder.requires_grad_(False)
    embeddings.requires_grad_(True)
    embeddings.register_hook(lambda grad: grad * trainable_rows)
    optimizer = torch.optim.AdamW(
        [{"params": motion_parameters, "weight_decay": 1e-2}, {"params": [embeddings], "weight_decay": 0.0}], lr=LEARNING_RATE
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[LEARNING_RATE, WORD_LEARNING_RATE], total_steps=steps, pct_start=0.05, final_div_factor=20
    )
    generator = torch.Generator().manual_seed(3)
    started = time.perf_counter()
    running = 0.0
    motion_unet.train()
    for step in range(steps):
        pixels, captions = clip_batch(rng, clips, frames)
        latents = pool_latents(pixels) * scale  # (clips * frames, 4, h, w)
        latents = latents.reshape(clips, frames, *latents.shape[1:]).permute(0, 2, 1, 3, 4)  # (clips, 4, frames, h, w)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (clips,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
        context = text_encoder(token_ids(tokenizer, captions))[0].repeat_interleave(frames, dim=0)  # as the pipeline does
        prediction = motion_unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(motion_parameters, 1.0)  # the words' tiny gradients are not scaled down with them
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            log(f"motion step {step:5d}  loss {running:.4f}  {elapsed:.0f}s ({elapsed / (step + 1):.2f}s/step)")
    motion_unet.eval()


def assemble_video_pipeline(image_pipe, motion_unet, tokenizer, text_encoder):
    from diffusers import AnimateDiffPipeline

    adapter = extract_adapter(motion_unet)
    pipe = AnimateDiffPipeline(
        vae=image_pipe.vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=image_pipe.unet,
        motion_adapter=adapter,
        scheduler=image_pipe.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def extract_adapter(motion_unet):
    """The trained motion layers as a `MotionAdapter` (the pipeline rebuilds the motion UNet from
    the image UNet and this adapter, as it does when loading)."""
    from diffusers import MotionAdapter

    config = motion_unet.config
    adapter = MotionAdapter(
        block_out_channels=tuple(config.block_out_channels),
        motion_layers_per_block=config.layers_per_block,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=config.motion_num_attention_heads,
        motion_norm_num_groups=16,
        motion_max_seq_length=config.motion_max_seq_length,
        use_motion_mid_block=config.use_motion_mid_block if hasattr(config, "use_motion_mid_block") else True,
    )
    state = {k: v for k, v in motion_unet.state_dict().items() if "motion_modules" in k}
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if "motion_modules" in key]:
        raise RuntimeError(f"motion layers do not match the adapter: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return adapter


@torch.no_grad()
def judge_video_pipeline(pipe, pairs, steps: int, guidance: float, frames: int) -> dict[str, float]:
    """Fraction of held-out (clip, seed) pairs whose clip the judge reads back correctly."""
    correct = {"colour": 0, "background": 0, "direction": 0}
    for moving, seed in pairs:
        clip = pipe(
            moving.prompt,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            height=SIZE,
            width=SIZE,
            output_type="pil",
        ).frames[0]
        for key, ok in judge_clip(clip).score(moving).items():
            correct[key] += ok
    return {key: value / len(pairs) for key, value in correct.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1600, help="motion updates")
    parser.add_argument("--clips", type=int, default=4, help="clips per update")
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eval-clips", type=int, default=40)
    parser.add_argument("--min-direction", type=float, default=0.7, help="ship only at this held-out direction score")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    rng = random.Random(0)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    image_pipe = load_demo_pipeline()
    tokenizer, text_encoder = image_pipe.tokenizer, image_pipe.text_encoder
    trainable_rows = add_words(tokenizer, text_encoder)
    motion_unet = build_motion_unet(image_pipe.unet)
    new = sum(p.numel() for p in motion_unet.parameters() if p.requires_grad)
    log(f"motion layers {new / 1e6:.2f} M parameters; new words {NEW_WORDS}")
    scale = image_pipe.vae.config.scaling_factor
    train_motion(motion_unet, text_encoder, tokenizer, trainable_rows, scale, args.steps, args.clips, args.frames, rng, log)
    text_encoder.requires_grad_(False)

    pipe = assemble_video_pipeline(image_pipe, motion_unet, tokenizer, text_encoder)
    pairs = held_out_clips(args.eval_clips)
    scores = judge_video_pipeline(pipe, pairs, args.sample_steps, args.guidance, args.frames)
    log(f"held-out ({len(pairs)} clips, {args.sample_steps} steps, guidance {args.guidance}): {scores}")
    elapsed = time.perf_counter() - started
    report = (
        f"Trained by `python -m training.demo_video --steps {args.steps} --clips {args.clips} --frames {args.frames}` "
        f"in {elapsed / 60:.1f} minutes on {torch.get_num_threads()} CPU threads.\n"
        f"Held-out judge ({len(pairs)} clips, {args.sample_steps} steps, guidance {args.guidance}): {scores}.\n"
    )
    shipped = scores["direction"] >= args.min_direction
    target = args.out if shipped else args.out.with_name(args.out.name + "-rejected")
    if target.exists():
        shutil.rmtree(target)
    pipe.to(torch.float16).save_pretrained(target, safe_serialization=True)
    defaults = {
        "num_inference_steps": args.sample_steps,
        "guidance_scale": args.guidance,
        "width": SIZE,
        "height": SIZE,
        "fps": FPS,
        "num_frames": args.frames,
        "max_frames": 32,
    }
    (target / "hypergen.json").write_text(json.dumps(defaults, indent=2) + "\n")
    (target / "TRAINING.md").write_text(report)
    log(f"saved {target} ({sum(f.stat().st_size for f in target.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    if not shipped:
        log(f"direction {scores['direction']:.0%} < {args.min_direction:.0%}: not shipped (kept in {target} to look at)")
    return 0 if shipped else 1


if __name__ == "__main__":
    raise SystemExit(main())

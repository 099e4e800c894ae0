"""Train HyperGen's demo model: a ~10 MB Stable-Diffusion-layout pipeline that draws the shapes
world of `training.shapes` ("a red circle on a blue background") at 64×64.

    python -m training.demo_model [--steps 2400] [--out hypergen/assets/demo-model]

Everything is seeded and the data is drawn on the fly; on the 2-core CPU machine it takes about
25 minutes with nothing else running. The result is a standard diffusers directory
(`StableDiffusionPipeline.from_pretrained` loads it; LoRA, image-to-image and inpainting work).

Recipe (measured on these machines, see ../shared/NOTES.md):
- a word-level CLIP tokenizer over the world's vocabulary and a 2-layer, 64-wide CLIP text
  encoder trained jointly with the UNet; 10 % empty captions so classifier-free guidance works;
- an `AutoencoderKL` with 4× downsampling whose encoder is *set*, not trained, to the 4×4
  average of the pixels (latents are tiny pictures, which the UNet learns fast) and whose decoder
  is trained to draw sharp edges back;
- a (48, 96, 96)-channel UNet on 16×16 latents, v-prediction, linear betas (so black and white
  backgrounds are reachable), EMA weights; DDIM "trailing" sampling.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.shapes import SIZE, caption, draw, held_out_scenes, judge, random_scene, vocabulary

LATENT_SIZE = SIZE // 4
MAX_TOKENS = 24
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "hypergen" / "assets" / "demo-model"
# A large constant carried through the encoder's group norms so they stay (almost exactly) linear.
NORM_ANCHOR = 100.0
SILU_OFFSET = 20.0


# --- tokenizer and text encoder ------------------------------------------------------------


def write_word_tokenizer(directory: Path) -> None:
    """vocab.json + merges.txt for a CLIP BPE tokenizer that maps each world word to one token."""
    words = vocabulary()
    # The BPE model needs every merge's parts in the vocabulary: letters, digits, and each
    # word's prefixes. Words outside the world therefore become letter pieces the model learns
    # to ignore (training scatters random letter strings through captions).
    characters = [*"abcdefghijklmnopqrstuvwxyz0123456789"]
    tokens = ["<|startoftext|>", "<|endoftext|>", *characters, *(c + "</w>" for c in characters)]
    # Learn merges the way BPE training does (one pair at a time, applied to every word) until
    # each word is a single symbol; applying them in rank order then rebuilds each word.
    pieces = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    for word in words:
        tokens.extend(pieces[word])
    while unfinished := [symbols for symbols in pieces.values() if len(symbols) > 1]:
        pair = (unfinished[0][0], unfinished[0][1])
        merges.append(pair)
        tokens.append(pair[0] + pair[1])
        for word, symbols in pieces.items():
            merged, index = [], 0
            while index < len(symbols):
                if tuple(symbols[index : index + 2]) == pair:
                    merged.append(pair[0] + pair[1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            pieces[word] = merged
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    write_word_tokenizer(directory)
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=MAX_TOKENS)
    for word in vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise RuntimeError(f"the tokenizer splits {word!r} into {ids}")
    return tokenizer


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=64,
    )
    return CLIPTextModel(config)


# --- autoencoder ---------------------------------------------------------------------------


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=SIZE,
    )


def pool_latents(images: torch.Tensor) -> torch.Tensor:
    """What the fixed encoder computes: each channel's 4×4 average, plus their mean as a 4th."""
    pooled = F.avg_pool2d(images, 4)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


@torch.no_grad()
def set_encoder_to_average_pool(vae) -> None:
    """Set the encoder's weights so that it computes `pool_latents` (with ~1e-5 error).

    Residual branches are zeroed (each block passes its input through); the two downsampling
    convolutions average 2×2 blocks; channels carry (x, -x, A, -A) per group so the final group
    norm divides by a constant (≈A/2) instead of a picture-dependent one, and a +20 shift keeps
    the SiLU in its linear range."""
    encoder = vae.encoder
    for parameter in encoder.parameters():
        parameter.zero_()
    for parameter in vae.quant_conv.parameters():
        parameter.zero_()
    channels = vae.quant_conv.weight.shape[0]
    vae.quant_conv.weight[:, :, 0, 0] = torch.eye(channels)

    # conv_in: 0-2 = r,g,b; 3-5 = -r,-g,-b; 6 = A; 7 = -A.
    for colour in range(3):
        encoder.conv_in.weight[colour, colour, 1, 1] = 1.0
        encoder.conv_in.weight[3 + colour, colour, 1, 1] = -1.0
    encoder.conv_in.bias[6] = NORM_ANCHOR
    encoder.conv_in.bias[7] = -NORM_ANCHOR

    def average_2x2(conv) -> None:
        for channel in range(conv.weight.shape[0]):
            conv.weight[channel, channel, 0:2, 0:2] = 0.25

    average_2x2(encoder.down_blocks[0].downsamplers[0].conv)
    # The 32→64 shortcut regroups channels: group c (8 wide) = (x_c, -x_c, A, -A, 0, 0, 0, 0).
    shortcut = encoder.down_blocks[1].resnets[0].conv_shortcut
    group = encoder.conv_norm_out.num_channels // encoder.conv_norm_out.num_groups
    for colour in range(3):
        for offset, source in enumerate((colour, 3 + colour, 6, 7)):
            shortcut.weight[colour * group + offset, source, 0, 0] = 1.0
    average_2x2(encoder.down_blocks[1].downsamplers[0].conv)

    # Group variance = (2·x² + 2·A²) / group ≈ A²·2/group, so scale back by A·sqrt(2/group).
    for colour in range(3):
        encoder.conv_norm_out.weight[colour * group] = NORM_ANCHOR * (2 / group) ** 0.5
        encoder.conv_norm_out.bias[colour * group] = SILU_OFFSET
    latent = vae.config.latent_channels
    for colour in range(3):
        encoder.conv_out.weight[colour, colour * group, 1, 1] = 1.0
        encoder.conv_out.weight[3, colour * group, 1, 1] = 1 / 3
    encoder.conv_out.bias[:latent] = -SILU_OFFSET
    encoder.conv_out.bias[latent:] = -30.0  # log-variance: a (near) deterministic encoder
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)


# --- data ----------------------------------------------------------------------------------


def pixel_batch(rng: random.Random, count: int) -> tuple[torch.Tensor, list[str]]:
    """`count` pictures in [-1, 1] and their training captions."""
    images, captions = [], []
    for _ in range(count):
        scene = random_scene(rng)
        images.append(np.asarray(draw(scene, rng), dtype=np.float32))
        captions.append(caption(scene, rng))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    return pixels, captions


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids


# --- training ------------------------------------------------------------------------------


def train_decoder(vae, steps: int, rng: random.Random, log) -> None:
    """Teach the decoder to turn pooled latents (with a little noise, as sampling leaves) back
    into sharp pictures."""
    parameters = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        pixels, _ = pixel_batch(rng, 16)
        latents = pool_latents(pixels)
        latents = latents + 0.03 * torch.randn(latents.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, pixels) + 0.5 * F.l1_loss(reconstruction, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step:4d}  loss {loss.item():.4f}")


def build_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction")


def sampling_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules, decay: float = 0.999):
        self.shadows = [copy.deepcopy(module).requires_grad_(False) for module in modules]
        self.modules = modules
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, module in zip(self.shadows, self.modules):
            for averaged, current in zip(shadow.parameters(), module.parameters()):
                averaged.lerp_(current, 1 - decay)


def train_diffusion(unet, text_encoder, tokenizer, scale: float, steps: int, batch: int, rng: random.Random, log) -> EMA:
    # Plain v-prediction loss. (Min-SNR weighting was tried: it starves the high-noise steps
    # where a picture's layout is decided, and shapes stayed blobs — 40 % vs the 75 % goal.)
    noise_scheduler = training_scheduler()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05, final_div_factor=20)
    ema = EMA([unet, text_encoder])
    generator = torch.Generator().manual_seed(2)
    started = time.perf_counter()
    running = 0.0
    for step in range(steps):
        pixels, captions = pixel_batch(rng, batch)
        latents = pool_latents(pixels) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
        context = text_encoder(token_ids(tokenizer, captions))[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        ema.update()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            log(f"diffusion step {step:5d}  loss {running:.4f}  {elapsed:.0f}s ({elapsed / (step + 1):.2f}s/step)")
    return ema


# --- assembling and judging ------------------------------------------------------------------


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def draw_pairs(pipe, pairs, steps: int, guidance: float, batch: int):
    """(scene, picture) for each (scene, seed) pair, drawn `batch` at a time."""
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        images = pipe(
            [scene.prompt for scene, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
            height=SIZE,
            width=SIZE,
        ).images
        yield from zip((scene for scene, _ in chunk), images)


def judge_pipeline(pipe, pairs, steps: int, guidance: float, batch: int = 25) -> dict[str, float]:
    """Fraction of (scene, seed) pairs whose picture the judge reads back correctly."""
    correct = {"colour": 0, "background": 0, "shape": 0}
    for scene, image in draw_pairs(pipe, pairs, steps, guidance, batch):
        for key, ok in judge(image).score(scene).items():
            correct[key] += ok
    return {key: value / len(pairs) for key, value in correct.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2400, help="diffusion updates")
    parser.add_argument("--decoder-steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sample-steps", type=int, default=20, help="recommended sampling steps written to hypergen.json")
    parser.add_argument("--guidance", type=float, default=5.0, help="recommended guidance written to hypergen.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = random.Random(0)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    with tempfile.TemporaryDirectory() as work:
        tokenizer = build_tokenizer(Path(work))
    text_encoder = build_text_encoder(len(tokenizer))
    vae = build_vae()
    set_encoder_to_average_pool(vae)
    probe, _ = pixel_batch(random.Random(99), 64)
    with torch.no_grad():
        encoded = vae.encode(probe).latent_dist.mean
    error = (encoded - pool_latents(probe)).abs().max().item()
    if error > 1e-3:
        raise RuntimeError(f"the fixed encoder is not an average pool (max error {error})")
    scale = float(1 / pool_latents(probe).std())
    vae.register_to_config(scaling_factor=scale)
    log(f"encoder = 4×4 average pool (max error {error:.1e}); latent scaling factor {scale:.3f}")

    train_decoder(vae, args.decoder_steps, rng, log)
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        pixels, _ = pixel_batch(random.Random(7), 32)
        round_trip = (vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1) - pixels).abs().mean().item() * 127.5
    log(f"held-out round trip: mean absolute error {round_trip:.2f}/255")

    unet = build_unet(text_encoder.config.hidden_size)
    log(
        f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters; text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M"
    )
    ema = train_diffusion(unet, text_encoder, tokenizer, scale, args.steps, args.batch, rng, log)

    # Pick the raw or the averaged weights on validation pairs (not the held-out benchmark set).
    validation = held_out_scenes(50, seed=7)
    candidates = {"raw": (unet, text_encoder), "ema": tuple(ema.shadows)}
    scores = {}
    for name, (candidate_unet, candidate_text) in candidates.items():
        pipe = assemble_pipeline(candidate_unet.eval(), vae, candidate_text.eval(), tokenizer)
        scores[name] = judge_pipeline(pipe, validation, args.sample_steps, args.guidance)
        log(f"validation ({name}): {scores[name]}")
    chosen = max(scores, key=lambda name: (sum(scores[name].values()), name == "ema"))
    chosen_unet, chosen_text_encoder = candidates[chosen]
    pipe = assemble_pipeline(chosen_unet, vae, chosen_text_encoder, tokenizer)

    args.out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    defaults = {"num_inference_steps": args.sample_steps, "guidance_scale": args.guidance, "width": SIZE, "height": SIZE}
    (args.out / "hypergen.json").write_text(json.dumps(defaults, indent=2) + "\n")
    elapsed = time.perf_counter() - started
    (args.out / "TRAINING.md").write_text(
        f"Trained by `python -m training.demo_model --steps {args.steps} --decoder-steps {args.decoder_steps} "
        f"--batch {args.batch}` in {elapsed / 60:.1f} minutes on {torch.get_num_threads()} CPU threads.\n"
        f"Autoencoder round trip {round_trip:.2f}/255; kept the {chosen} weights; validation (50 pairs, "
        f"{args.sample_steps} steps, guidance {args.guidance}): {scores[chosen]}.\n"
        "Scores on the held-out benchmark set: `python -m bench.demo_quality`.\n"
    )
    log(f"saved {args.out} ({sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

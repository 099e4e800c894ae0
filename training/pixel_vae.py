"""Train the small autoencoder HyperGen's tiny pipelines use, so that images survive the
encode → decode round trip (a random-weight VAE is ~90/255 off, which makes image-to-image and
inpainting meaningless).

    python -m training.pixel_vae [--steps 600] [--out hypergen/assets/pixel-vae]

Data is generated on the fly (fixed seed): flat backgrounds with coloured rectangles, ellipses
and smooth gradients at 64×64. CPU, about two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def synthetic_batch(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1]: background colour, a gradient, and 1–3 shapes of random colours."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(batch):
        colour = torch.rand(3, 1, 1, generator=generator)
        angle = torch.rand(1, generator=generator).item() * 2 * math.pi
        ramp = (xs * math.cos(angle) + ys * math.sin(angle)) * torch.rand(1, generator=generator).item() * 0.5
        image = (colour + ramp).clamp(0, 1).expand(3, size, size).clone()
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            cx, cy, rx, ry = torch.rand(4, generator=generator).tolist()
            rx, ry = 0.08 + rx * 0.3, 0.08 + ry * 0.3
            if torch.rand(1, generator=generator).item() < 0.5:
                inside = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) <= 1
            else:
                inside = ((xs - cx).abs() <= rx) & ((ys - cy).abs() <= ry)
            image[:, inside] = torch.rand(3, 1, generator=generator)
        images.append(image)
    return torch.stack(images) * 2 - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "hypergen" / "assets" / "pixel-vae")
    args = parser.parse_args(argv)

    from hypergen.testing.pipelines import tiny_vae

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    vae = tiny_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=args.steps, pct_start=0.1)
    started = time.perf_counter()
    for step in range(args.steps):
        images = synthetic_batch(args.batch, 64, generator)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl().mean() / (64 * 64 * 3)
        loss = F.mse_loss(reconstruction, images) + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  mse {F.mse_loss(reconstruction, images).item():.5f}  {time.perf_counter() - started:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():
        held_out = synthetic_batch(32, 64, torch.Generator().manual_seed(12345))
        mean = vae.encode(held_out).latent_dist.mean
        error = (vae.decode(mean).sample - held_out).abs().mean().item() / 2 * 255
    print(f"held-out round trip: mean absolute error {error:.2f}/255")
    args.out.mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    (args.out / "TRAINING.md").write_text(
        f"Trained by `python -m training.pixel_vae --steps {args.steps} --batch {args.batch}` "
        f"in {time.perf_counter() - started:.0f}s; held-out round trip {error:.2f}/255 mean absolute error.\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost of streaming previews: one pipeline call with and without partial images, side by side.

    python -m bench.previews [--name cpu-tiny-previews] [--steps 20] [--partial-images 3]

Previews decode the intermediate latents with the model's VAE at evenly spaced steps. Writes
bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.run import RESULTS_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.previews", description=__doc__)
    parser.add_argument("--name", default="cpu-tiny-previews")
    parser.add_argument("--model", help="diffusers directory (default: a tiny random SD pipeline)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--partial-images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    import torch

    from hypergen.engine.pipelines import load_text_to_image
    from hypergen.engine.previews import StepPreviews, StreamTicket
    from hypergen.protocol import GenerationJob
    from hypergen.testing import save_tiny_pipeline

    model = args.model or str(save_tiny_pipeline(Path(tempfile.mkdtemp()) / "model"))
    pipe = load_text_to_image("bench", model).pipe
    job = GenerationJob(
        request_id="bench", model="bench", prompt="a red circle", width=args.size, height=args.size,
        num_inference_steps=args.steps, guidance_scale=7.5, seeds=[0], admitted_at=0.0,
    )  # fmt: skip
    received: list[dict] = []

    def call(previews: bool) -> float:
        extra = {}
        if previews:
            ticket = StreamTicket(job, args.partial_images, received.append)
            extra = {"callback_on_step_end": StepPreviews([(0, 0)], {0: ticket}), "callback_on_step_end_tensor_inputs": ["latents"]}
        started = time.perf_counter()
        pipe(prompt=["a red circle"], width=args.size, height=args.size, num_inference_steps=args.steps,
             generator=[torch.Generator().manual_seed(0)], **extra)  # fmt: skip
        return time.perf_counter() - started

    call(False), call(True)  # warm-up
    plain, streamed = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        plain.append(call(False))
        streamed.append(call(True))
    overhead = statistics.median(streamed) / statistics.median(plain) - 1
    result = {
        "name": args.name, "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model or "tiny random SD",
        "size": args.size, "steps": args.steps, "partial_images": args.partial_images,
        "plain_ms_p50": statistics.median(plain) * 1000, "with_previews_ms_p50": statistics.median(streamed) * 1000,
        "overhead": overhead, "previews_received": len(received),
    }  # fmt: skip
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    table = (
        f"# Preview cost `{args.name}` ({result['date']}, {result['model']}, {args.size}², {args.steps} steps)\n\n"
        f"| | p50 |\n|---|---|\n| no previews | {result['plain_ms_p50']:.1f} ms |\n"
        f"| {args.partial_images} VAE-decoded previews | {result['with_previews_ms_p50']:.1f} ms |\n"
        f"| overhead | {overhead * 100:.1f} % |\n"
    )
    (args.results_dir / f"{args.name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

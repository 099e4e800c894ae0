"""What the demo model's `outline` adapter does, judged by a program.

    python -m bench.demo_lora [--pairs 90] [--name cpu-demo-lora]

Loads `hypergen/assets/demo-model` and its adapter `hypergen/assets/demo-lora` the way the
server does (`load_text_to_image`, then `LoraManager`, which uses diffusers' `load_lora_weights`
and `set_adapters`), draws held-out (prompt, seed) pairs — the same set `bench.demo_quality`
scores — with the adapter at scale 1.0 and 0.5 and without it, at the model's recommended
settings, and reads each picture back with `training.shapes.judge_fill` (outline, closed
outline or filled; the shape from its silhouette) and `judge` (shape colour, background). First
it checks the judge itself on pictures `training.shapes.draw` makes, outlined and filled.
Writes bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from bench.run import RESULTS_DIR, write_results


def judge_check(count: int) -> dict[str, float]:
    """How often `judge_fill` reads drawn pictures right: `count` outlined, `count` filled."""
    from training.shapes import draw, judge_fill, random_scene

    rng = random.Random(11)
    right = {"outline": 0, "filled": 0}
    for fill in right:
        for _ in range(count):
            scene = random_scene(rng)
            verdict = judge_fill(draw(scene, rng, outline=fill == "outline"))
            right[fill] += (verdict.fill, verdict.closed, verdict.shape) == (fill, fill == "outline", scene.shape)
    return {fill: value / count for fill, value in right.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_lora", description=__doc__)
    parser.add_argument("--name", default="cpu-demo-lora")
    parser.add_argument("--pairs", type=int, default=90)
    parser.add_argument("--scales", default="1.0,0.5", help="adapter scales to score besides none")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    import torch

    from hypergen.config import EMBEDDED_LORA_DIR, EMBEDDED_LORA_NAME
    from hypergen.engine.loras import LoraManager
    from hypergen.engine.pipelines import DEMO_MODEL_DIR, load_text_to_image
    from training.demo_lora import judge_outlines
    from training.shapes import held_out_scenes

    drawn = judge_check(200)
    print(f"judge on drawn pictures: {drawn}", flush=True)
    loaded = load_text_to_image("demo", str(DEMO_MODEL_DIR), device="cpu")
    adapters = LoraManager(loaded.pipe, [], max_loaded=1)
    adapter = adapters.load(EMBEDDED_LORA_NAME, str(EMBEDDED_LORA_DIR), pinned=True)
    steps, guidance = loaded.default_steps, loaded.default_guidance_scale
    pairs = held_out_scenes(args.pairs)
    rows = []
    for scale in [*(float(value) for value in args.scales.split(",")), None]:
        adapters.activate([(adapter, scale)] if scale is not None else [])
        started = time.perf_counter()
        scores = {key: round(value, 4) for key, value in judge_outlines(loaded.pipe, pairs, steps, guidance).items()}
        rows.append({"adapter": EMBEDDED_LORA_NAME if scale is not None else None, "scale": scale, **scores,
                     "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
        print(rows[-1], flush=True)

    root = DEMO_MODEL_DIR.parent.parent.parent
    training_note = EMBEDDED_LORA_DIR / "TRAINING.md"
    result = {
        "model": str(DEMO_MODEL_DIR.relative_to(root)),
        "adapter": str(EMBEDDED_LORA_DIR.relative_to(root)),
        "adapter_bytes": adapter.size_bytes,
        "adapter_load_ms": round(adapter.load_seconds * 1000, 1),
        # Its first line: the command and the minutes it took.
        "training": training_note.read_text().splitlines()[0] if training_note.is_file() else None,
        "pairs": args.pairs,
        "steps": steps,
        "guidance": guidance,
        "threads": torch.get_num_threads(),
        "judge_on_drawn_pictures": drawn,
        "rows": rows,
    }
    lines = [
        f"# Demo LoRA `{EMBEDDED_LORA_NAME}` ({args.pairs} held-out prompt/seed pairs, {steps} steps, guidance {guidance})",
        "",
        (
            f"Adapter: `{result['adapter']}`, {adapter.size_bytes / 1e3:.0f} kB, loaded in {result['adapter_load_ms']} ms. "
            f"Judged by `training.shapes.judge_fill` (fill; shape from the silhouette) and `judge` "
            f"(colours), which read 200 drawn outlined pictures right {drawn['outline']:.0%} and 200 filled ones "
            f"{drawn['filled']:.0%}."
        ),
        "",
        "| adapter | scale | outline | (circles / squares / triangles) | closed outline | filled | shape colour "
        "| background | shape | time for all pairs |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {row['adapter'] or 'none'} | {'' if row['scale'] is None else row['scale']} | {row['outline']:.0%} "
            f"| {row['outline_circle']:.0%} / {row['outline_square']:.0%} / {row['outline_triangle']:.0%} "
            f"| {row['closed']:.0%} | {row['filled']:.0%} | {row['colour']:.0%} | {row['background']:.0%} "
            f"| {row['shape']:.0%} | {row['seconds']} s |"
            for row in rows
        ),
        "",
        "Outline: the middle of the shape shows the background and the shape surrounds it (16 rays from "
        "its centre, 12 must meet it); closed outline: it encloses background with no gap wider than "
        "about two pixels; filled: its middle has its colour. Neither outline nor filled: broken or "
        "wide-open shapes.",
        "",
        *([result["training"], ""] if result["training"] else []),
    ]
    write_results(args.results_dir, args.name, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

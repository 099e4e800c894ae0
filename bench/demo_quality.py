"""How well the shipped demo model draws what it is asked, judged by a program.

    python -m bench.demo_quality [--pairs 120] [--name cpu-demo-quality]

Loads `hypergen/assets/demo-model` the way the server does (`from_pretrained`), draws held-out
(prompt, seed) pairs — "a red circle on a blue background" — and reads each picture back with
`training.shapes.judge`: the background is the named colour most of the border has, the shape's
colour the most common named colour inside, the shape from how much of its bounding box it fills.
Scores at the model's recommended settings and a few others, plus the time for one 64×64 image.
Writes bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.run import RESULTS_DIR, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_quality", description=__doc__)
    parser.add_argument("--name", default="cpu-demo-quality")
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--settings", default="10:5,15:5,20:5,20:3,20:7.5", help="steps:guidance,... besides the recommended one")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    import torch

    from hypergen.engine.pipelines import DEMO_MODEL_DIR, load_text_to_image
    from training.demo_model import judge_pipeline
    from training.shapes import held_out_scenes

    loaded = load_text_to_image("demo", str(DEMO_MODEL_DIR), device="cpu")
    pipe = loaded.pipe
    recommended = (loaded.default_steps, loaded.default_guidance_scale)
    pairs = held_out_scenes(args.pairs)
    settings = [recommended] + [
        (int(steps), float(guidance))
        for steps, guidance in (item.split(":") for item in args.settings.split(","))
        if (int(steps), float(guidance)) != recommended
    ]
    rows = []
    for steps, guidance in settings:
        started = time.perf_counter()
        scores = judge_pipeline(pipe, pairs, steps, guidance)
        rows.append({"steps": steps, "guidance": guidance, **scores, "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)

    def one_image() -> float:
        started = time.perf_counter()
        pipe("a red circle on a blue background", num_inference_steps=recommended[0], guidance_scale=recommended[1],
             generator=torch.Generator().manual_seed(0))  # fmt: skip
        return time.perf_counter() - started

    one_image()  # warm-up
    latencies = [one_image() for _ in range(10)]
    result = {
        "model": str(DEMO_MODEL_DIR.relative_to(DEMO_MODEL_DIR.parent.parent.parent)),
        "pairs": args.pairs,
        "recommended": {"steps": recommended[0], "guidance": recommended[1]},
        "threads": torch.get_num_threads(),
        "one_image_s": {"median": round(statistics.median(latencies), 3), "max": round(max(latencies), 3)},
        "rows": rows,
    }
    lines = [
        f"# Demo model quality ({args.pairs} held-out prompt/seed pairs, judged by `training.shapes.judge`)",
        "",
        f"One 64×64 image at the recommended {recommended[0]} steps, guidance {recommended[1]}: "
        f"median {result['one_image_s']['median']:.3f} s, max {result['one_image_s']['max']:.3f} s "
        f"({result['threads']} CPU threads).",
        "",
        "| steps | guidance | shape colour | background | shape | time for all pairs |",
        "|---|---|---|---|---|---|",
        *(
            f"| {row['steps']}{' (recommended)' if (row['steps'], row['guidance']) == recommended else ''} | {row['guidance']} "
            f"| {row['colour']:.0%} | {row['background']:.0%} | {row['shape']:.0%} | {row['seconds']} s |"
            for row in rows
        ),
        "",
    ]
    write_results(args.results_dir, args.name, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

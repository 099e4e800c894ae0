"""LoRA timings on the tiny pipeline: load, switch (activate another adapter), disable, unload.

    python -m bench.loras [--name cpu-tiny-loras] [--repeats 20]

Goes through `LoraManager`, as the worker does; writes bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.run import RESULTS_DIR, percentile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loras", description=__doc__)
    parser.add_argument("--name", default="cpu-tiny-loras")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    from hypergen.engine.loras import LoraManager
    from hypergen.engine.pipelines import load_text_to_image
    from hypergen.testing import save_random_lora, save_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="hypergen-bench-loras-"))
    model = save_tiny_pipeline(work / "model")
    sources = [save_random_lora(model, work / f"lora-{index}", seed=index) for index in range(2)]
    pipe = load_text_to_image("bench", str(model)).pipe
    manager = LoraManager(pipe, [work], max_loaded=8)
    timings: dict[str, list[float]] = {"load": [], "switch": [], "disable": [], "unload": []}

    def timed(kind: str, action) -> None:
        started = time.perf_counter()
        action()
        timings[kind].append((time.perf_counter() - started) * 1000)

    for _ in range(args.repeats):
        timed("load", lambda: manager.load("a", str(sources[0])))
        manager.load("b", str(sources[1]))
        first, second = manager.resolve("a"), manager.resolve("b")
        manager.activate([(first, 1.0)])
        timed("switch", lambda: manager.activate([(second, 0.7)]))  # noqa: B023 (called at once)
        timed("disable", lambda: manager.activate([]))
        manager.unload("b")
        timed("unload", lambda: manager.unload("a"))
    summary = {
        kind: {"p50_ms": percentile(values, 50), "p95_ms": percentile(values, 95), "mean_ms": statistics.mean(values)}
        for kind, values in timings.items()
    }
    result = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": "tiny random SD",
        "repeats": args.repeats,
        "timings": summary,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# LoRA timings `{args.name}` ({result['date']}, tiny random SD, {args.repeats} repeats)",
        "",
        "| operation | p50 | p95 |",
        "|---|---|---|",
    ]
    lines += [f"| {kind} | {values['p50_ms']:.1f} ms | {values['p95_ms']:.1f} ms |" for kind, values in summary.items()]
    table = "\n".join(lines) + "\n"
    (args.results_dir / f"{args.name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

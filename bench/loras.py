"""LoRA timings on the tiny pipeline: load, switch (activate another adapter), disable, unload;
and 8 requests over 4 adapters, grouped into one call per adapter vs one routed call.

    python -m bench.loras [--name cpu-tiny-loras] [--repeats 20] [--model DIR]

Goes through `LoraManager` and the engine, as the worker does; writes bench/results/<name>.json and .md.
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
    parser.add_argument("--model", help="model directory for the mixed-adapter part (default: the embedded demo model)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps in the mixed-adapter part")
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
    mixed = bench_mixed_adapters(args.model, work, args.steps, max(3, args.repeats // 4))
    result = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": "tiny random SD",
        "repeats": args.repeats,
        "timings": summary,
        "mixed_adapters": mixed,
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
    lines += [
        "",
        f"## 8 requests over 4 adapters ({mixed['model']}, {mixed['size']}, {mixed['steps']} steps, guidance {mixed['guidance']}, "
        f"{mixed['repeats']} repeats, median)",
        "",
        "| how | pipeline calls | seconds | images/s |",
        "|---|---|---|---|",
        f"| grouped: one call per adapter (before) | 4 | {mixed['grouped_s']:.3f} | {8 / mixed['grouped_s']:.2f} |",
        f"| routed: one call for all | 1 | {mixed['one_call_s']:.3f} | {8 / mixed['one_call_s']:.2f} |",
        f"| reference: all 8 on one adapter, one call (peft's own path, no routing) | 1 | {mixed['same_adapter_s']:.3f} | "
        f"{8 / mixed['same_adapter_s']:.2f} |",
        "",
        f"One call is **{mixed['grouped_s'] / mixed['one_call_s']:.2f}×** the grouped throughput; "
        f"largest mean pixel difference from each request run alone: {mixed['max_mean_diff']:.2f}/255.",
    ]
    table = "\n".join(lines) + "\n"
    (args.results_dir / f"{args.name}.md").write_text(table)
    print(table)
    return 0


def bench_mixed_adapters(model: str | None, work: Path, steps: int, repeats: int) -> dict:
    """8 requests, two per adapter, through the engine: as four calls (one per adapter, what
    grouping did) and as one call whose rows are routed to their adapters."""
    import numpy as np

    from hypergen.codec import decode_image_b64
    from hypergen.config import Settings
    from hypergen.engine.engine import DiffusionEngine
    from hypergen.engine.pipelines import DEMO_MODEL_DIR
    from hypergen.protocol import GenerationJob, LoraChoice
    from hypergen.testing import save_random_lora

    model_dir = Path(model) if model else DEMO_MODEL_DIR
    adapters = work / "mixed"
    for index in range(4):
        save_random_lora(model_dir, adapters / f"style-{index}", seed=100 + index, magnitude=0.3)
    engine = DiffusionEngine(Settings(home=work / "home", loras="", lora_dirs=str(adapters), max_batch_size=8), model_path=str(model_dir))
    while not engine.status().ready:
        if engine.status().detail and "failed" in engine.status().detail:
            raise RuntimeError(engine.status().detail)
        time.sleep(0.05)
    limits = engine.models.limits()[0]
    jobs = [
        GenerationJob(
            request_id=f"r{index}",
            model=limits.id,
            prompt="a red circle on a blue background",
            seeds=[index],
            width=limits.native_width,
            height=limits.native_height,
            num_inference_steps=steps,
            guidance_scale=limits.default_guidance_scale,
            loras=[LoraChoice(path=f"style-{index % 4}")],
            admitted_at=time.time(),
        )  # fmt: skip
        for index in range(8)
    ]
    groups = [[job for job in jobs if job.loras == jobs[index].loras] for index in range(4)]
    engine.run_batch(jobs)  # loads the adapters, warms up

    def timed(action) -> float:
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    uniform = [job.model_copy(update={"loras": jobs[0].loras}) for job in jobs]
    grouped, one_call, same = [], [], []
    for _ in range(repeats):  # interleaved, so all three see the same machine
        grouped.append(timed(lambda: [engine.run_batch(group) for group in groups]))
        one_call.append(timed(lambda: engine.run_batch(jobs)))
        same.append(timed(lambda: engine.run_batch(uniform)))
    together = engine.run_batch(jobs)
    assert all(result.batch_images == 8 for result in together), "the eight requests did not share one call"
    diffs = []
    for job, result in zip(jobs, together):
        alone = engine.run_batch([job])[0]
        pixels = [np.asarray(decode_image_b64(item.images_b64[0]).convert("RGB"), dtype=np.float32) for item in (result, alone)]
        diffs.append(float(np.abs(pixels[0] - pixels[1]).mean()))
    return {
        "model": limits.id,
        "size": f"{limits.native_width}x{limits.native_height}",
        "steps": steps,
        "guidance": limits.default_guidance_scale,
        "repeats": repeats,
        "grouped_s": statistics.median(grouped),
        "one_call_s": statistics.median(one_call),
        "same_adapter_s": statistics.median(same),
        "max_mean_diff": max(diffs),
    }


if __name__ == "__main__":
    raise SystemExit(main())

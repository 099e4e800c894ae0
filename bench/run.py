"""HyperGen benchmark: the bare pipeline and the server, measured side by side in one run.

    python -m bench [--name cpu-tiny] [--model DIR] [--steps 20] [--size 64x64] [--quick]

Measures, on the same model and parameters:
- bare `pipe()` throughput at batch 1 and at the max batch size;
- server throughput with the official client at each concurrency, and server ÷ bare;
- batching gain: the server with batching vs `HYPERGEN_MAX_BATCH_SIZE=1` at the top concurrency;
- dispatch overhead: end-to-end latency minus the worker's pipeline and encoding time (from the
  `Server-Timing` header), and queue wait, at concurrency 1;
- encoding: PNG/JPEG/WebP encode time per megapixel and its share of end-to-end time.

Writes `bench/results/<name>.json` and `bench/results/<name>.md`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(results_dir: Path, name: str, result: dict[str, Any], lines: list[str]) -> None:
    """bench/results/<name>.json (the numbers) and <name>.md (the table), and the table on stdout."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results_dir / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def parse_server_timing(header: str) -> dict[str, float]:
    """`queue;dur=2.1, generation;dur=300` → {"queue": 0.0021, "generation": 0.3} (seconds)."""
    timings = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            timings[name] = float(duration) / 1000
        elif ';desc="' in part:
            name, _, value = part.strip().partition(';desc="')
            timings[name] = float(value.rstrip('"'))
    return timings


# --- bare pipeline ------------------------------------------------------------------------------


def bench_bare(model_dir: str, width: int, height: int, steps: int, batch_sizes: list[int], repeats: int) -> dict[str, Any]:
    import torch

    from hypergen.engine.pipelines import load_text_to_image

    loaded = load_text_to_image("bench", model_dir)
    pipe = loaded.pipe
    out: dict[str, Any] = {"device": loaded.device, "dtype": str(loaded.dtype).replace("torch.", "")}

    def call(batch: int) -> list[Any]:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in range(batch)]
        return pipe(
            prompt=[f"a shape {index}" for index in range(batch)],
            width=width, height=height, num_inference_steps=steps, generator=generators, output_type="pil",
        ).images  # fmt: skip

    call(1)  # warm-up
    for batch in batch_sizes:
        call(batch)
        if loaded.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            images = call(batch)
        if loaded.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        out[f"batch_{batch}"] = {"images_per_s": batch * repeats / elapsed, "seconds_per_call": elapsed / repeats}
    out["sample_image"] = images[0]
    pipe = loaded = None  # free the weights before the servers load theirs
    gc.collect()
    return out


# --- encoding -----------------------------------------------------------------------------------


def bench_encoding(image: Any, repeats: int = 20) -> dict[str, Any]:
    from hypergen.codec import encode_image

    megapixels = image.width * image.height / 1e6
    result = {}
    for output_format in ("png", "jpeg", "webp"):
        encode_image(image, output_format)
        started = time.perf_counter()
        for _ in range(repeats):
            data = encode_image(image, output_format)
        seconds = (time.perf_counter() - started) / repeats
        result[output_format] = {"ms_per_image": seconds * 1000, "ms_per_megapixel": seconds * 1000 / megapixels, "bytes": len(data)}
    return result


# --- server -------------------------------------------------------------------------------------


def run_load(base_url: str, concurrency: int, requests: int, body: dict[str, Any]) -> dict[str, Any]:
    """`requests` generations from `concurrency` client threads with the official client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=600)

    def one(index: int) -> dict[str, float]:
        started = time.perf_counter()
        raw = client.images.with_raw_response.generate(
            prompt=f"a red circle number {index}", size=body["size"], response_format="b64_json", n=1,
            extra_body={"num_inference_steps": body["steps"], "seed": index},
        )  # fmt: skip
        latency = time.perf_counter() - started
        raw.parse()
        timing = parse_server_timing(raw.headers.get("server-timing", ""))
        return {"latency": latency, **timing}

    for index in range(min(concurrency, 2)):
        one(10_000 + index)  # warm-up: first calls pay for lazy imports and the batcher's training
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    latencies = [sample["latency"] for sample in samples]
    overheads = [sample["latency"] - sample.get("generation", 0) - sample.get("encode", 0) for sample in samples]
    queue_waits = [sample.get("queue", 0) for sample in samples]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "images_per_s": requests / elapsed,
        "latency_p50_ms": percentile(latencies, 50) * 1000,
        "latency_p95_ms": percentile(latencies, 95) * 1000,
        "overhead_p50_ms": percentile(overheads, 50) * 1000,
        "overhead_p99_ms": percentile(overheads, 99) * 1000,
        "queue_wait_p50_ms": percentile(queue_waits, 50) * 1000,
        "queue_wait_p99_ms": percentile(queue_waits, 99) * 1000,
        "encode_mean_ms": statistics.mean(sample.get("encode", 0) for sample in samples) * 1000,
        "mean_images_per_call": statistics.mean(sample.get("batch", 1) for sample in samples),
        "latency_mean_ms": statistics.mean(latencies) * 1000,
        # The pipeline call each request rode in, as the worker timed it (compared with bare calls).
        "generation_mean_s": statistics.mean(sample.get("generation", 0) for sample in samples),
    }


def bench_server(
    model_dir: str, max_batch_size: int, levels: list[int], requests: int, body: dict[str, Any], work: Path, checkout: Path | None = None
) -> list[dict[str, Any]]:
    """The server (from `checkout`, default this tree) under closed-loop load at each level."""
    from hypergen.testing import BentoServer
    from hypergen.testing.server import PROJECT_ROOT

    label = f"{max_batch_size}-{checkout.name}" if checkout else str(max_batch_size)
    env = {
        "HYPERGEN_MODEL": model_dir,
        "HYPERGEN_MAX_BATCH_SIZE": str(max_batch_size),
        "HYPERGEN_HOME": str(work / f"home-{label}"),
        "HYPERGEN_LOG_LEVEL": "WARNING",
    }
    with BentoServer(work / f"serve-{label}.log", env, cwd=checkout or PROJECT_ROOT) as server:
        server.wait_ready()
        return [run_load(server.base_url, concurrency, max(requests, concurrency), body) for concurrency in levels]


def batching_gain(top: dict[str, Any], unbatched: dict[str, Any]) -> dict[str, Any]:
    """The batched server at its top concurrency against HYPERGEN_MAX_BATCH_SIZE=1 at the same."""
    return {
        "concurrency": top["concurrency"],
        "ratio": top["images_per_s"] / unbatched["images_per_s"],
        "batched_images_per_s": top["images_per_s"],
        "unbatched_images_per_s": unbatched["images_per_s"],
        "batched_p95_ms": top["latency_p95_ms"],
        "unbatched_p95_ms": unbatched["latency_p95_ms"],
    }


# --- report -------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    bare, config = result["bare"], result["config"]
    lines = [
        f"# Benchmark `{result['name']}`",
        "",
        f"{result['machine']} · device {bare['device']} ({bare['dtype']}) · model `{config['model']}` · "
        f"{config['size']}, {config['steps']} steps · max batch {config['max_batch_size']} · {result['date']}",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    lines += [
        f"| bare pipe() batch {size} | {bare[f'batch_{size}']['images_per_s']:.2f} images/s |"
        for size in range(1, config["max_batch_size"] + 1)
        if f"batch_{size}" in bare
    ]
    servers = [("server", result["server"])]
    if result.get("baseline"):
        servers.append((f"baseline `{Path(result['baseline']['checkout']).name}`", result["baseline"]["server"]))
    for label, levels in servers:
        for level in levels:
            lines.append(
                f"| {label}, concurrency {level['concurrency']} | {level['images_per_s']:.2f} images/s "
                f"(÷ bare batch {level['bare_batch']}: {level['server_over_bare']:.2f}; ÷ bare at the formed batch "
                f"{level.get('formed_batch', '?')}: {level.get('server_over_bare_formed', float('nan')):.2f}; ÷ best bare: "
                f"{level.get('server_over_bare_best', float('nan')):.2f}) · p50 {level['latency_p50_ms']:.0f} ms · "
                f"p95 {level['latency_p95_ms']:.0f} ms · {level['mean_images_per_call']:.1f} images per pipeline call · "
                f"overhead p50 {level['overhead_p50_ms']:.1f} ms p99 {level['overhead_p99_ms']:.1f} ms · pipeline call "
                f"{level.get('call_slowdown_formed', float('nan')):.2f}× the bare call at that batch |"
            )
    gain = result["batching_gain"]
    lines += [
        f"| batching gain at concurrency {gain['concurrency']} | {gain['ratio']:.2f}× ({gain['batched_images_per_s']:.2f} vs {gain['unbatched_images_per_s']:.2f} images/s); "
        f"p95 {gain['batched_p95_ms']:.0f} ms vs {gain['unbatched_p95_ms']:.0f} ms |",
        f"| dispatch overhead (concurrency 1) | p50 {result['overhead']['p50_ms']:.2f} ms · p99 {result['overhead']['p99_ms']:.2f} ms |",
        f"| queue wait (concurrency 1, idle) | p50 {result['overhead']['queue_wait_p50_ms']:.2f} ms · p99 {result['overhead']['queue_wait_p99_ms']:.2f} ms |",
    ]
    for output_format, encoding in result["encoding"].items():
        lines.append(f"| encode {output_format} | {encoding['ms_per_megapixel']:.1f} ms/MP ({encoding['ms_per_image']:.2f} ms per image) |")
    lines.append(f"| encoding share of end-to-end (png, concurrency 1) | {result['encoding_share'] * 100:.2f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="cpu-tiny")
    parser.add_argument("--model", help="diffusers directory (default: a tiny random SD pipeline built now)")
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--repeats", type=int, default=5, help="bare pipe() calls per batch size")
    parser.add_argument("--quick", action="store_true", help="a few seconds: smoke-test the harness")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--baseline", type=Path, help="another checkout (e.g. `git worktree add /tmp/before COMMIT`) served in the same run"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.requests, args.repeats, args.concurrency, args.max_batch_size = 2, 4, 1, "1,2", 2
    levels = [int(level) for level in args.concurrency.split(",")]
    width, height = (int(side) for side in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="hypergen-bench-"))
    model_dir = args.model
    if not model_dir:
        from hypergen.testing import save_tiny_pipeline

        model_dir = str(save_tiny_pipeline(work / "tiny-sd", kind="sd", seed=0))
    body = {"size": args.size, "steps": args.steps}

    print(f"bare pipeline: {args.size}, {args.steps} steps ...", flush=True)
    batch_sizes = list(range(1, args.max_batch_size + 1))  # every size, for the batch the server actually forms
    bare = bench_bare(model_dir, width, height, args.steps, batch_sizes, args.repeats)
    encoding = bench_encoding(bare.pop("sample_image"))
    print("server with batching ...", flush=True)
    batched = bench_server(model_dir, args.max_batch_size, levels, args.requests, body, work)
    print("server with HYPERGEN_MAX_BATCH_SIZE=1 ...", flush=True)
    unbatched = bench_server(model_dir, 1, [levels[-1]], args.requests, body, work)[0]
    baseline = None
    if args.baseline:
        print(f"baseline server from {args.baseline} ...", flush=True)
        baseline = bench_server(model_dir, args.max_batch_size, levels, args.requests, body, work, checkout=args.baseline.resolve())

    best = max(bare[f"batch_{size}"]["images_per_s"] for size in batch_sizes)
    for level in [*batched, *(baseline or [])]:
        level["bare_batch"] = min(level["concurrency"], args.max_batch_size)
        level["server_over_bare"] = level["images_per_s"] / bare[f"batch_{level['bare_batch']}"]["images_per_s"]
        formed = min(args.max_batch_size, max(1, round(level["mean_images_per_call"])))
        level["formed_batch"] = formed
        level["server_over_bare_formed"] = level["images_per_s"] / bare[f"batch_{formed}"]["images_per_s"]
        level["server_over_bare_best"] = level["images_per_s"] / best
        # >1: the same pipeline call is slower inside the server than bare (cores shared with the
        # API process, the client and the worker's own threads).
        level["call_slowdown_formed"] = level["generation_mean_s"] / bare[f"batch_{formed}"]["seconds_per_call"]
    top, single = batched[-1], batched[0]
    result = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "config": {
            "model": args.model or "tiny random SD (built from configs)",
            "size": args.size,
            "steps": args.steps,
            "max_batch_size": args.max_batch_size,
        },
        "bare": bare,
        "server": batched,
        "batching_gain": batching_gain(top, unbatched),
        "unbatched": unbatched,
        "baseline": {"checkout": str(args.baseline), "server": baseline} if baseline else None,
        "overhead": {
            "p50_ms": single["overhead_p50_ms"],
            "p99_ms": single["overhead_p99_ms"],
            "queue_wait_p50_ms": single["queue_wait_p50_ms"],
            "queue_wait_p99_ms": single["queue_wait_p99_ms"],
        },
        "encoding": encoding,
        "encoding_share": single["encode_mean_ms"] / single["latency_mean_ms"],
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.results_dir / f"{args.name}.md").write_text(table)
    print(table)
    return 0

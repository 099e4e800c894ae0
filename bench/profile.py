"""Where serving time goes: py-spy profiles of the API and worker processes under load, and the
CPU each process (and the load generator) spends per image.

    python -m bench.profile [--name cpu-profile] [--model DIR] [--concurrency 4] [--seconds 20] [--steps 20]

Starts `bentoml serve` as `python -m bench` does, sends closed-loop load with the official client,
samples both server processes with py-spy (`pip install py-spy`; without it only the CPU shares
are measured) and writes bench/results/<name>.md with the hottest functions per process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.run import RESULTS_DIR, parse_server_timing


def server_processes(root_pid: int) -> dict[str, Any]:
    """The API and worker processes of a `bentoml serve`, by their service names."""
    import psutil

    found = {}
    for child in psutil.Process(root_pid).children(recursive=True):
        line = child.cmdline()
        if "--service-name" in line:
            name = line[line.index("--service-name") + 1]
            found["worker" if name.startswith("hypergen-worker") else "api"] = child
    return found


def summarize(raw: Path, top: int) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks → the hottest functions: self time and inclusive time."""
    own, inclusive, total = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].split("/")[-1] + ")" for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = lambda counter: [(frame, count / total) for frame, count in counter.most_common(top)]  # noqa: E731
    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="cpu-profile")
    parser.add_argument("--model", help="diffusers directory (default: a tiny random SD pipeline built now)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the server; repeatable")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    import psutil
    from openai import OpenAI

    from hypergen.testing import BentoServer, save_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="hypergen-profile-"))
    model = args.model or str(save_tiny_pipeline(work / "tiny-sd", kind="sd", seed=1))
    env = {"HYPERGEN_MODEL": model, "HYPERGEN_HOME": str(work / "home"), "HYPERGEN_LOG_LEVEL": "WARNING"}
    env.update(dict(item.split("=", 1) for item in args.env))
    py_spy = shutil.which("py-spy")
    with BentoServer(work / "serve.log", env) as server:
        server.wait_ready()
        processes = server_processes(server.process.pid)
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="bench", max_retries=0, timeout=600)

        def one(index: int) -> dict[str, float]:
            raw = client.images.with_raw_response.generate(
                prompt=f"a red circle number {index}", size=args.size, response_format="b64_json",
                extra_body={"num_inference_steps": args.steps, "seed": index},
            )  # fmt: skip
            raw.parse()
            return parse_server_timing(raw.headers.get("server-timing", ""))

        for index in range(8):
            one(index)  # warm-up
        recorders = {}
        if py_spy:
            for role, process in processes.items():
                out = work / f"{role}.txt"
                command = [py_spy, "record", "--pid", str(process.pid), "--duration", str(int(args.seconds)), "--rate", "250"]
                command += ["--format", "raw", "--nonblocking", "--output", str(out)]
                recorders[role] = (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
        me = psutil.Process()
        before = {role: process.cpu_times() for role, process in processes.items()}
        before["load generator"] = me.cpu_times()
        started, stop_at, samples = time.perf_counter(), time.perf_counter() + args.seconds, []

        def loop(worker: int) -> None:
            index = worker * 100_000
            while time.perf_counter() < stop_at:
                samples.append(one(index))
                index += 1

        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(loop, range(args.concurrency)))
        elapsed = time.perf_counter() - started
        after = {role: process.cpu_times() for role, process in processes.items()}
        after["load generator"] = me.cpu_times()
        for process, _ in recorders.values():
            process.wait(timeout=args.seconds + 60)
    cpu = {role: (after[role].user + after[role].system - before[role].user - before[role].system) for role in before}
    images = len(samples)
    result = {
        "name": args.name,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "concurrency": args.concurrency,
        "steps": args.steps,
        "size": args.size,
        "seconds": elapsed,
        "images": images,
        "images_per_s": images / elapsed,
        "images_per_call": sum(sample.get("batch", 1) for sample in samples) / max(1, images),
        "cpu_seconds": cpu,
        "cpu_ms_per_image": {role: seconds * 1000 / max(1, images) for role, seconds in cpu.items()},
        "profiles": {role: summarize(out, args.top) for role, (_, out) in recorders.items() if out.exists()},
        "env": env | {"HYPERGEN_MODEL": "tiny random SD" if not args.model else args.model, "HYPERGEN_HOME": "(temp)"},
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.results_dir / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    total_cpu = sum(result["cpu_seconds"].values())
    lines = [
        f"# Profile `{result['name']}` ({result['date']})",
        "",
        f"Concurrency {result['concurrency']}, {result['size']}, {result['steps']} steps, {result['seconds']:.0f} s: "
        f"{result['images']} images, {result['images_per_s']:.2f} images/s, {result['images_per_call']:.1f} images per pipeline call.",
        "",
        "| process | CPU seconds | share of all CPU used | CPU ms per image |",
        "|---|---|---|---|",
    ]
    for role, seconds in result["cpu_seconds"].items():
        lines.append(f"| {role} | {seconds:.1f} | {seconds / total_cpu * 100:.1f} % | {result['cpu_ms_per_image'][role]:.1f} |")
    for role, profile in result["profiles"].items():
        lines += ["", f"## {role} process ({profile['samples']} samples)", "", "| hottest (inclusive) | share | | hottest (self) | share |"]
        lines.append("|---|---|---|---|---|")
        for (inclusive, inclusive_share), (own, own_share) in zip(profile["inclusive"], profile["self"]):
            lines.append(f"| `{inclusive}` | {inclusive_share * 100:.1f} % | | `{own}` | {own_share * 100:.1f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

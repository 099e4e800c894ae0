"""Memory of the API process under concurrent large uploads, against a real `bentoml serve`.

    python -m bench.uploads [--name cpu-upload-memory] [--uploads 24] [--megabytes 40]
                            [--checkout DIR --checkout DIR ...]

Starts the server (the embedded model, one API key, default body limits) from each checkout
given (default: this one) and sends `--uploads` concurrent `--megabytes` MB uploads to
`/v1/images/edits`, in three rounds: a noise PNG of that size (≈3650² pixels: decoded, resized
and edited) with the key, random bytes (held, then refused with a 400) with the key, and the PNG
without a key (401), each round on a freshly started server. It samples the resident memory of
the API process (and of the whole server) every 20 ms. Run it with an older checkout (e.g.
`git archive <commit> | tar -x -C /tmp/old`) to see a fix side by side.
Writes bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import subprocess
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.run import RESULTS_DIR

API_KEY = "k-bench-uploads"
MB = 1024 * 1024
ROUNDS = ("PNG, with the key", "random bytes, with the key", "PNG, without a key")


def api_process(server) -> Any:
    """The API service's process (`--service-name hypergen`), not the diffusion worker's."""
    import psutil

    for child in psutil.Process(server.process.pid).children(recursive=True):
        arguments = child.cmdline()
        if "--service-name" in arguments and arguments[arguments.index("--service-name") + 1] == "hypergen":
            return child
    raise RuntimeError("no API process found")


def server_processes(server) -> list[Any]:
    import psutil

    root = psutil.Process(server.process.pid)
    return [root, *root.children(recursive=True)]


class PeakMemory:
    """Samples resident bytes of the API process and of the whole server in a thread."""

    def __init__(self, server) -> None:
        self.server, self.api = server, api_process(server)
        self.api_peak = self.server_peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def current(self) -> tuple[int, int]:
        import psutil

        total = 0
        for process in server_processes(self.server):
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return self.api.memory_info().rss, total

    def _sample(self) -> None:
        while not self._done.is_set():
            api, total = self.current()
            self.api_peak, self.server_peak = max(self.api_peak, api), max(self.server_peak, total)
            time.sleep(0.02)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()


def noise_png(megabytes: int) -> bytes:
    """An incompressible RGB PNG of about `megabytes` MB (3 bytes a pixel)."""
    import io

    import numpy as np
    from PIL import Image

    side = int((megabytes * MB / 3) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def send_uploads(url: str, body: bytes, count: int, key: str | None) -> Counter:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def send(_: int) -> str:
        try:
            response = httpx.post(url, files={"image": ("a.png", body)}, data={"prompt": "x"}, headers=headers, timeout=300)
            return str(response.status_code)
        except httpx.HTTPError:  # refused before the body was sent: the server closed on us
            return "closed early"

    with ThreadPoolExecutor(count) as pool:
        return Counter(pool.map(send, range(count)))


def measure(checkout: Path, uploads: int, megabytes: int) -> dict[str, Any]:
    """Each round against a fresh server: freed memory stays in the process, so a round after
    another would start from the first one's high-water mark."""
    from hypergen.testing import BentoServer

    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    label = commit if (checkout / ".git").exists() and commit else checkout.name  # e.g. an exported old commit
    png, junk = noise_png(megabytes), secrets.token_bytes(megabytes * MB)
    result: dict[str, Any] = {"checkout": str(checkout), "commit": label, "png_bytes": len(png)}
    for round_name, body, key in zip(ROUNDS, (png, junk, png), (API_KEY, API_KEY, None)):
        scratch = Path(tempfile.mkdtemp(prefix="bench-uploads-"))
        env = {"HYPERGEN_API_KEYS": API_KEY, "HYPERGEN_HOME": str(scratch / "hypergen"), "BENTOML_HOME": str(scratch / "bentoml")}
        with BentoServer(scratch / "serve.log", env, cwd=checkout) as server:
            server.wait_ready()
            time.sleep(2.0)  # the batcher's warm-up calls are done; let memory settle
            with PeakMemory(server) as memory:
                api_before, server_before = memory.current()
                started = time.perf_counter()
                statuses = send_uploads(f"{server.base_url}/v1/images/edits", body, uploads, key)
                seconds = time.perf_counter() - started
        result[round_name] = {
            "statuses": dict(statuses),
            "seconds": round(seconds, 2),
            "api_rss_before_mb": round(api_before / MB),
            "api_rss_peak_mb": round(memory.api_peak / MB),
            "api_rss_growth_mb": round((memory.api_peak - api_before) / MB),
            "server_rss_peak_mb": round(memory.server_peak / MB),
            "server_rss_growth_mb": round((memory.server_peak - server_before) / MB),
        }
    return result


def markdown(name: str, uploads: int, megabytes: int, runs: list[dict[str, Any]]) -> str:
    lines = [
        f"# Upload memory `{name}` ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, `python -m bench.uploads`)",
        "",
        f"{uploads} concurrent uploads of {megabytes} MB each to `POST /v1/images/edits` (the PNG is RGB noise, decoded and edited;",
        "random bytes are held, then refused with a 400),",
        "against `bentoml serve` with the embedded model, one API key and the default body limits",
        "(`HYPERGEN_MAX_BODY_BYTES` 50 MiB, `HYPERGEN_MAX_BODY_BYTES_IN_FLIGHT` 256 MiB where the checkout has them).",
        "RSS sampled every 20 ms, each round on a freshly started server; API = the `hypergen` service process,",
        "server = all its processes.",
        "",
        "| checkout | uploads | statuses | API RSS before → peak (growth) | server RSS peak (growth) | wall |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        for label in ROUNDS:
            row = run[label]
            statuses = ", ".join(f"{status} ×{count}" for status, count in sorted(row["statuses"].items()))
            lines.append(
                f"| `{run['commit']}` | {label} | {statuses} | {row['api_rss_before_mb']} → **{row['api_rss_peak_mb']} MB** "
                f"(+{row['api_rss_growth_mb']} MB) | {row['server_rss_peak_mb']} MB (+{row['server_rss_growth_mb']} MB) | {row['seconds']} s |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.uploads", description=__doc__)
    parser.add_argument("--name", default="cpu-upload-memory")
    parser.add_argument("--uploads", type=int, default=24)
    parser.add_argument("--megabytes", type=int, default=40)
    parser.add_argument("--checkout", type=Path, action="append", help="source tree to serve (repeatable; default: this one)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    from hypergen.testing.server import PROJECT_ROOT

    runs = [measure(checkout.resolve(), args.uploads, args.megabytes) for checkout in (args.checkout or [PROJECT_ROOT])]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    report = {"name": args.name, "uploads": args.uploads, "megabytes": args.megabytes, "runs": runs}
    (args.results_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(args.name, args.uploads, args.megabytes, runs)
    (args.results_dir / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prometheus metrics (`hypergen_*`), served by the API's `/metrics` from every process.

BentoML's own HTTP metrics are off on the API service: they label requests by raw path, so
every image file id (a capability) and every probed URL became a new, public series.

Created lazily, on first use: BentoML sets `PROMETHEUS_MULTIPROC_DIR` when its processes
start, and metrics made before that would not reach the merged `/metrics` output. Gauges use
`multiprocess_mode="livesum"` so several worker processes add up. Each server keeps those files
in a directory of its own (`use_own_multiprocess_dir`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def use_own_multiprocess_dir() -> Path | None:
    """In the process that starts a server (BentoML's arbiter, which imports the service before
    it starts anything): give this server its own Prometheus multiprocess directory,
    `BENTOML_HOME/prometheus/<pid>@<host>`, removed when the server exits; returns it. In the
    server's own processes (BentoML has set `PROMETHEUS_MULTIPROC_DIR` for them), does nothing.

    BentoML 1.4 uses `BENTOML_HOME/prometheus_multiproc_dir` for every server, honours no
    environment variable for it, and empties it when a server starts: two servers sharing a
    BENTOML_HOME deleted each other's files, and `/metrics` showed the other server's counts.
    Directories left by servers of this host that are gone (killed, never cleaned up) are
    removed; other hosts' are left alone (a shared BENTOML_HOME may be mounted on several).
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    import psutil
    from bentoml._internal.configuration.containers import BentoMLContainer

    parent = Path(BentoMLContainer.bentoml_home.get()) / "prometheus"
    host = socket.gethostname()
    if parent.is_dir():
        for stale in parent.glob(f"*@{host}"):
            pid = stale.name.split("@", 1)[0]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
    directory = parent / f"{os.getpid()}@{host}"
    BentoMLContainer.prometheus_multiproc_dir.set(str(directory))  # BentoML creates it at start
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def exposition() -> tuple[bytes, str]:
    """Prometheus text of every process's metrics (BentoML's multiprocess directory), and its
    content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # in-process (tests): this process only
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


@lru_cache(maxsize=1)
def metrics() -> SimpleNamespace:
    """The process's metric objects (see the README's metrics table)."""
    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        requests=Counter("hypergen_requests_total", "HTTP requests by route and status", ["route", "status"]),
        request_seconds=Histogram("hypergen_request_seconds", "End-to-end latency of image requests", ["route"], buckets=LATENCY_BUCKETS),
        queue_depth=Gauge("hypergen_queue_depth", "Requests admitted and waiting", multiprocess_mode="livesum"),
        in_flight=Gauge("hypergen_in_flight", "Requests handed to the worker", multiprocess_mode="livesum"),
        queue_wait_seconds=Histogram("hypergen_queue_wait_seconds", "Admission to the start of the pipeline call", buckets=LATENCY_BUCKETS),
        generation_seconds=Histogram("hypergen_generation_seconds", "Duration of pipeline calls", ["mode"], buckets=LATENCY_BUCKETS),
        encode_seconds=Histogram("hypergen_encode_seconds", "Image encoding per pipeline call", buckets=LATENCY_BUCKETS),
        batch_images=Histogram("hypergen_batch_images", "Images per pipeline call", buckets=BATCH_BUCKETS),
        batch_requests=Histogram("hypergen_batch_requests", "Requests per pipeline call", buckets=BATCH_BUCKETS),
        images=Counter("hypergen_images_generated_total", "Images generated", ["mode"]),
        rejected=Counter("hypergen_rejected_total", "Requests refused before generation", ["reason"]),
        lora_loads=Counter("hypergen_lora_loads_total", "LoRA adapter loads", ["outcome"]),
        loras_loaded=Gauge("hypergen_loras_loaded", "LoRA adapters loaded", multiprocess_mode="livesum"),
        model_moves=Counter(
            "hypergen_model_moves_total", "Models offloaded from or moved back to the device (memory budget)", ["model", "direction"]
        ),
        video_jobs=Counter("hypergen_video_jobs_total", "Video jobs by how they ended (or were refused)", ["status"]),
        video_queue=Gauge("hypergen_video_queue_depth", "Video jobs queued or rendering", multiprocess_mode="livesum"),
        video_render_seconds=Histogram("hypergen_video_render_seconds", "Pipeline time per video job", buckets=LATENCY_BUCKETS),
        video_frames=Counter("hypergen_video_frames_total", "Video frames rendered"),
        gpu_memory_bytes=Gauge(
            "hypergen_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated per worker", multiprocess_mode="livesum"
        ),
    )

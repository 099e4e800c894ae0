"""GPU benchmark: everything issue #18 asks of a GPU, in one run that fits a time budget.

    python -m bench.gpu --out DIR [--tiny] [--budget-s 480] [--models sd15,sdxl,flux]

On a GPU it builds full-size SD 1.5, SDXL and FLUX.1-dev pipelines with random weights from their
published configs (`bench/full_size.py`; random weights cost the same FLOPs) in the dtype the
server uses (bf16 where supported, else fp16) and measures, in order:

1. `flops`: FLOPs of one denoising step of each full-size model, counted with
   `torch.utils.flop_counter.FlopCounterMode` on the meta device (no memory, any machine);
2. `models`: bare `pipe()` throughput per batch size, the UNet/transformer FLOPs per step counted
   on the real inputs, the TFLOP/s reached (the whole call, and the denoiser alone) and the share
   of the GPU's dense peak for the dtype;
3. `encoding`: PNG/JPEG/WebP encoding at 1024² and PNG's share of an image's end-to-end time;
4. `server`: a real `bentoml serve` of SD 1.5: server ÷ bare at concurrency 1/4/8, the batching
   gain (vs `HYPERGEN_MAX_BATCH_SIZE=1`), the encoding share seen by the server, and memory before
   and after 200 requests;
5. `levers`: each speed lever (`HYPERGEN_ATTENTION_BACKEND`, `_CHANNELS_LAST`, `_FUSE_QKV`,
   `_VAE_TILING`, `_VAE_SLICING`, `_TORCH_COMPILE`) on and off on SDXL in the same run, same batch;
   the VAE levers on a 2048² decode; compile with its warm-up cost.

Each section gets a share of `--budget-s`; what does not fit is skipped and the report says so.
`--tiny` runs the same code on the tiny random pipelines of `hypergen/testing` (CPU is fine): a
smoke test of the harness, its numbers mean nothing. Writes `results.json` and `results.md` into
`--out` after every section, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.run import batching_gain, bench_encoding, run_load

MB = 1024 * 1024
# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets, fp16 and bf16 with fp32
# accumulation (what torch uses). The first name fragment that the device name contains wins.
PEAK_DENSE_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"float16": 835.5, "bfloat16": 835.5}),
    ("H200", {"float16": 989.5, "bfloat16": 989.5}),
    ("H100 NVL", {"float16": 835.5, "bfloat16": 835.5}),
    ("H100 PCIe", {"float16": 756.5, "bfloat16": 756.5}),
    ("H100", {"float16": 989.5, "bfloat16": 989.5}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", {"float16": 312.0, "bfloat16": 312.0}),
    ("L40S", {"float16": 362.1, "bfloat16": 362.1}),
    ("L4", {"float16": 121.0, "bfloat16": 121.0}),
    ("A10G", {"float16": 70.0, "bfloat16": 70.0}),  # AWS's A10 variant: no NVIDIA datasheet; the commonly cited figure
    ("RTX 4090", {"float16": 165.2, "bfloat16": 165.2}),
]
# Share of --budget-s each section may spend (a section that finishes early leaves the rest to later ones).
SECTION_SHARES = {"flops": 0.04, "models": 0.30, "encoding": 0.02, "server": 0.24, "levers": 0.40}


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The dense fp16/bf16 peak of a GPU by its `torch.cuda.get_device_name()`; None if unknown."""
    for fragment, peaks in PEAK_DENSE_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


# --- time budget ----------------------------------------------------------------------------------


class Budget:
    """Seconds left for the whole run, and for the section being run."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.started = time.monotonic()
        self.section_ends = float("inf")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return min(self.total_s - self.elapsed(), self.section_ends - time.monotonic())

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Within this block `left()` also counts down the section's share of the total, plus what
        the sections before it (in SECTION_SHARES order) left unspent."""
        names = list(SECTION_SHARES)
        shares_so_far = sum(SECTION_SHARES[earlier] for earlier in names[: names.index(name) + 1])
        self.section_ends = self.started + self.total_s * shares_so_far
        try:
            yield
        finally:
            self.section_ends = float("inf")


# --- the run's context ----------------------------------------------------------------------------


@dataclass
class Run:
    out: Path
    tiny: bool
    device: str
    dtype: Any  # torch.dtype
    budget: Budget
    work: Path
    result: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)  # family → an image it made (for the encoding section)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.result.setdefault("notes", []).append(text)

    def skip(self, what: str, why: str) -> None:
        print(f"  skipped: {what} ({why})", flush=True)
        self.result.setdefault("skipped", []).append(f"{what}: {why}")

    def save(self) -> None:
        self.result["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.result, indent=2, default=str))
        (self.out / "results.md").write_text(markdown(self.result))


def synchronize(run: Run) -> None:
    if run.cuda:
        import torch

        torch.cuda.synchronize()


def free_memory(run: Run) -> None:
    gc.collect()
    if run.cuda:
        import torch

        torch.cuda.empty_cache()


def timed(run: Run, call: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, the GPU's queued work included."""
    synchronize(run)
    started = time.perf_counter()
    result = call()
    synchronize(run)
    return time.perf_counter() - started, result


def seconds_per_call(run: Run, call: Callable[[], Any], repeats: int) -> float:
    synchronize(run)
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    synchronize(run)
    return (time.perf_counter() - started) / repeats


# --- models: build, call, count ---------------------------------------------------------------------

TINY_BUILDS = {"sd15": "sd", "sdxl": "sdxl", "flux": "flux"}
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "flux": 3.5}


@dataclass
class Plan:
    """How hard to push each section: full size on a GPU, or a few seconds with --tiny."""

    batch_sizes: list[int]
    steps: dict[str, int]
    repeats: int
    denoiser_repeats: int
    server_batch: int
    concurrency: list[int]
    requests_per_level: Callable[[int], int]
    memory_requests: int
    lever_batch: int
    lever_steps: int
    lever_repeats: int
    vae_side: int  # the side of the image decoded for the VAE levers
    warm_up: bool  # an untimed call before each timed lever setting
    batching_gain: bool  # a second server with HYPERGEN_MAX_BATCH_SIZE=1 (~40 s of CPU for a tiny one)


def make_plan(tiny: bool, memory_requests: int | None) -> Plan:
    if tiny:
        return Plan(
            batch_sizes=[1, 2], steps={"sd15": 2, "sdxl": 2, "flux": 2}, repeats=1, denoiser_repeats=2,
            server_batch=8, concurrency=[1, 4, 8], requests_per_level=lambda level: level,
            memory_requests=memory_requests or 8, lever_batch=2, lever_steps=2, lever_repeats=1, vae_side=96,
            warm_up=False, batching_gain=False,
        )  # fmt: skip
    return Plan(
        batch_sizes=[1, 2, 4, 8], steps={"sd15": 20, "sdxl": 20, "flux": 8}, repeats=2, denoiser_repeats=5,
        server_batch=8, concurrency=[1, 4, 8], requests_per_level=lambda level: max(16, 4 * level),
        memory_requests=memory_requests or 200, lever_batch=2, lever_steps=10, lever_repeats=2, vae_side=2048,
        warm_up=True, batching_gain=True,
    )  # fmt: skip


def build_pipeline(run: Run, family: str) -> Any:
    """The benchmark's pipeline of `family`: full size (random weights) or the tiny test one."""
    if run.tiny:
        from hypergen.testing.pipelines import TINY_BUILDERS

        pipe = TINY_BUILDERS[TINY_BUILDS[family]](0)
        pipe = pipe.to(run.device) if run.dtype == pipe.dtype else pipe.to(run.device, run.dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from bench.full_size import build_full_size

    return build_full_size(family, run.device, run.dtype)


def image_side(run: Run, family: str) -> int:
    from bench.full_size import NATIVE

    return 64 if run.tiny else NATIVE[family]["width"]


def pipeline_call(pipe: Any, family: str, batch: int, side: int, steps: int) -> Callable[[], list[Any]]:
    """One `pipe()` call as the server makes it: a prompt and a CPU generator per image, PIL out."""
    import torch

    def call() -> list[Any]:
        generators = [torch.Generator("cpu").manual_seed(index) for index in range(batch)]
        return pipe(
            prompt=[f"a red circle number {index}" for index in range(batch)], width=side, height=side,
            num_inference_steps=steps, guidance_scale=GUIDANCE[family], generator=generators, output_type="pil",
        ).images  # fmt: skip

    return call


@contextmanager
def capturing_inputs(denoiser: Any) -> Iterator[dict[str, Any]]:
    """Records the arguments of the denoiser's first forward inside the block (one step's inputs)."""
    captured: dict[str, Any] = {}

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.setdefault("args", args)
        captured.setdefault("kwargs", kwargs)

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def count_flops(denoiser: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """FLOPs of one forward (torch's FlopCounterMode: matmuls, convolutions and attention)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    first = next(denoiser.parameters())
    # torch counts its CUDA attention kernels but not the CPU flash kernel: on the CPU attention runs
    # as plain matmuls while counting, which the counter sees (same count as the kernels' formula).
    kernels = sdpa_kernel(SDPBackend.MATH) if first.device.type == "cpu" else contextlib.nullcontext()
    with torch.inference_mode(), kernels, FlopCounterMode(display=False) as counter:
        denoiser(*args, **kwargs)
    return int(counter.get_total_flops())


def measure_flops_on_meta(run: Run) -> None:
    """Section 1: FLOPs per denoising step of the full-size models (meta device: no memory, any machine)."""
    import torch

    from bench.full_size import FAMILIES, NATIVE, build_denoiser, denoiser_inputs

    flops: dict[str, Any] = {}
    for family in FAMILIES:
        if not run.budget.allows(2):
            run.skip(f"flops {family}", "out of time")
            continue
        denoiser = build_denoiser(family, "meta", torch.bfloat16)
        args, kwargs = denoiser_inputs(family, 1, "meta", torch.bfloat16)
        per_image = count_flops(denoiser, args, kwargs)
        flops[family] = {
            "size": f"{NATIVE[family]['width']}x{NATIVE[family]['height']}",
            "params_m": round(sum(parameter.numel() for parameter in denoiser.parameters()) / 1e6, 1),
            "cfg": family != "flux",  # the UNets run twice per step (with and without the prompt)
            "tflop_per_image_step": round(per_image / 1e12, 3),
            "tflop_per_image_forward": round(per_image / (2 if family != "flux" else 1) / 1e12, 3),
        }
        print(f"  {family}: {per_image / 1e12:.2f} TFLOP per image per step", flush=True)
    run.result["flops"] = flops


def bench_model(run: Run, plan: Plan, family: str) -> dict[str, Any]:
    """Section 2 for one model: throughput per batch size, FLOPs and TFLOP/s."""
    import torch

    from hypergen.engine.pipelines import denoiser_of

    started = time.perf_counter()
    pipe = build_pipeline(run, family)
    synchronize(run)
    side, steps = image_side(run, family), plan.steps[family]
    denoiser = denoiser_of(pipe)
    out: dict[str, Any] = {
        "size": f"{side}x{side}",
        "steps": steps,
        "guidance_scale": GUIDANCE[family],
        "build_s": round(time.perf_counter() - started, 2),
        "params_m": {
            name: round(sum(parameter.numel() for parameter in part.parameters()) / 1e6, 1)
            for name, part in pipe.components.items()
            if isinstance(part, torch.nn.Module)
        },
        "batches": {},
    }
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    previous: tuple[int, float, int] | None = None  # batch, seconds per call, FLOPs per step
    captured: dict[str, Any] = {}
    for batch in plan.batch_sizes:
        estimate = previous[1] * batch / previous[0] * 3 if previous else 0.0  # warm-up and up to 2 repeats
        if not run.budget.allows(estimate):
            run.skip(f"{family} batch {batch}", f"needs ~{estimate:.0f}s, {run.budget.left():.0f}s left")
            break
        call = pipeline_call(pipe, family, batch, side, steps)
        with capturing_inputs(denoiser) as inputs:
            warm_up_s, images = timed(run, call)  # also the warm-up: kernels chosen, caches filled
        run.samples[family] = images[0]
        captured = inputs
        repeats = 1 if warm_up_s > 3 else plan.repeats  # long calls vary little on a GPU
        seconds = seconds_per_call(run, call, repeats)
        flops_per_step = count_flops(denoiser, inputs["args"], inputs["kwargs"])
        row = {
            "images_per_s": batch / seconds,
            "seconds_per_call": seconds,
            "tflop_per_step": flops_per_step / 1e12,
            "call_tflops": flops_per_step * steps / seconds / 1e12,  # denoiser FLOPs over the whole call's time
        }
        out["batches"][str(batch)] = row
        previous = (batch, seconds, flops_per_step)
        print(f"  {family} batch {batch}: {row['images_per_s']:.3f} images/s, {row['call_tflops']:.1f} TFLOP/s", flush=True)
    if captured and previous:
        out["denoiser"] = bench_denoiser_alone(run, plan, denoiser, captured, previous)
    if run.cuda:
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / MB)
    pipe = denoiser = captured = None
    free_memory(run)
    return out


def bench_denoiser_alone(run: Run, plan: Plan, denoiser: Any, captured: dict[str, Any], last: tuple[int, float, int]) -> dict[str, Any]:
    """The UNet/transformer forward alone at the largest batch measured: the TFLOP/s the GPU reaches."""
    import torch

    batch, _, flops = last
    args, kwargs = captured["args"], captured["kwargs"]
    with torch.inference_mode():
        denoiser(*args, **kwargs)
        seconds = seconds_per_call(run, lambda: denoiser(*args, **kwargs), plan.denoiser_repeats)
    return {"batch": batch, "forward_ms": seconds * 1000, "tflops": flops / seconds / 1e12}


def bench_models(run: Run, plan: Plan, families: list[str]) -> None:
    run.result.setdefault("models", {})
    for family in families:
        if run.tiny and family not in TINY_BUILDS:
            continue
        if not run.budget.allows(5):
            run.skip(f"model {family}", "out of time")
            continue
        print(f"{family} ...", flush=True)
        try:
            result = bench_model(run, plan, family)
        except Exception as error:  # e.g. out of memory on a small GPU: the other models still run
            free_memory(run)
            run.result["models"][family] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            run.note(f"{family} failed: {type(error).__name__}: {str(error)[:300]}")
            continue
        run.result["models"][family] = result
        peak = run.result["device"]["peak_tflops"]
        for row in [*result["batches"].values(), result.get("denoiser", {})]:
            if peak and "tflops" in row:
                row["peak_share"] = row["tflops"] / peak
            if peak and "call_tflops" in row:
                row["peak_share"] = row["call_tflops"] / peak
        run.save()


# --- encoding ------------------------------------------------------------------------------------


def bench_encoding_share(run: Run) -> None:
    """Section 3: encoding time per image at 1024² (SDXL's output) against its end-to-end time."""
    samples = run.samples
    family = "sdxl" if "sdxl" in samples else next(iter(samples), None)
    if family is None:
        run.skip("encoding", "no model produced an image")
        return
    from PIL import Image

    image = samples[family]
    side = 1024
    if image.width != side:  # --tiny: scale the tiny model's picture up to the size asked about
        image = image.resize((side, side), Image.Resampling.NEAREST)
    encoding = bench_encoding(image, repeats=3 if run.tiny else 10)
    per_image_s = run.result["models"][family]["batches"]["1"]["seconds_per_call"]
    png_s = encoding["png"]["ms_per_image"] / 1000
    run.result["encoding"] = {
        "model": family,
        "size": f"{side}x{side}",
        "formats": encoding,
        "pipeline_s_per_image": per_image_s,
        "png_share": png_s / (per_image_s + png_s),
        "source": "bare batch-1 call + PNG encode" + (" (tiny model's image scaled up; its call time is 64x64's)" if run.tiny else ""),
    }
    run.save()


# --- server --------------------------------------------------------------------------------------


def server_memory(run: Run, server: Any) -> dict[str, Any]:
    """What the server holds: the worker's `torch.cuda.memory_allocated` (from /metrics), the GPU's
    used memory (all processes), and the resident memory of the server's processes."""
    import httpx
    import psutil

    memory: dict[str, Any] = {}
    if run.cuda:
        import torch

        text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
        samples = re.findall(r"^hypergen_gpu_memory_allocated_bytes(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.MULTILINE)
        if samples:
            memory["worker_allocated_mb"] = round(sum(float(value) for value in samples) / MB, 1)
        free, total = torch.cuda.mem_get_info()
        memory["gpu_used_mb"] = round((total - free) / MB, 1)
    root = psutil.Process(server.process.pid)
    processes = [root, *root.children(recursive=True)]
    memory["server_rss_mb"] = round(sum(process.memory_info().rss for process in processes if process.is_running()) / MB, 1)
    return memory


def save_server_model(run: Run, family: str, steps: int) -> Path:
    """The pipeline saved where `bentoml serve` can load it (HYPERGEN_MODEL)."""
    pipe = build_pipeline(run, family).to("cpu")
    target = run.work / f"{family}-model"
    pipe.save_pretrained(target, safe_serialization=True)
    side = image_side(run, family)
    defaults = {"random_weights": True, "num_inference_steps": steps, "guidance_scale": GUIDANCE[family], "width": side, "height": side}
    (target / "hypergen.json").write_text(json.dumps(defaults))
    pipe = None
    free_memory(run)
    return target


def bench_server(run: Run, plan: Plan) -> None:
    """Section 4: server ÷ bare, batching gain, encoding share, memory before/after many requests."""
    from hypergen.testing import BentoServer

    family = "sd15"
    bare = run.result.get("models", {}).get(family, {}).get("batches", {})
    if not bare:
        run.skip("server", f"no bare {family} measurement to compare with")
        return
    steps, side = plan.steps[family], image_side(run, family)
    body = {"size": f"{side}x{side}", "steps": steps}

    def bare_batch_for(level: int) -> int:
        """The bare batch a server at this concurrency is compared with (the largest measured that fits)."""
        return max(int(batch) for batch in bare if int(batch) <= min(level, plan.server_batch))

    def bare_seconds(requests: int, level: int) -> float:
        return requests / bare[str(bare_batch_for(level))]["images_per_s"]

    server_start_s = 30  # bentoml serve, the model loaded, the batcher warmed up (GPU or tiny CPU)
    estimate = server_start_s + sum(bare_seconds(plan.requests_per_level(level) + 2, level) for level in plan.concurrency)
    if not run.budget.allows(estimate):
        run.skip("server", f"needs ~{estimate:.0f}s, {run.budget.left():.0f}s left")
        return
    model_dir = save_server_model(run, family, steps)
    server_result: dict[str, Any] = {"model": family, "size": body["size"], "steps": steps, "max_batch_size": plan.server_batch}
    run.result["server"] = server_result

    def serve(max_batch_size: int) -> BentoServer:
        env = {
            "HYPERGEN_MODEL": str(model_dir),
            "HYPERGEN_MAX_BATCH_SIZE": str(max_batch_size),
            "HYPERGEN_HOME": str(run.work / f"home-{max_batch_size}"),
            "HYPERGEN_LOG_LEVEL": "WARNING",
            "HYPERGEN_LORAS": "",
        }
        return BentoServer(run.work / f"serve-{max_batch_size}.log", env)

    print("server with batching ...", flush=True)
    with serve(plan.server_batch) as server:
        server.wait_ready(timeout=600)
        ready = server_memory(run, server)
        levels = []
        for level in plan.concurrency:
            measured = run_load(server.base_url, level, plan.requests_per_level(level), body)
            measured["bare_batch"] = bare_batch_for(level)
            measured["server_over_bare"] = measured["images_per_s"] / bare[str(measured["bare_batch"])]["images_per_s"]
            levels.append(measured)
            print(f"  concurrency {level}: server ÷ bare batch {measured['bare_batch']} = {measured['server_over_bare']:.2f}", flush=True)
        server_result["levels"] = levels
        single = levels[0]
        server_result["encoding_share"] = single["encode_mean_ms"] / single["latency_mean_ms"]
        run.save()
        top = levels[-1]
        if run.budget.allows(2 * plan.memory_requests / top["images_per_s"]):
            before = server_memory(run, server)
            load = run_load(server.base_url, top["concurrency"], plan.memory_requests, body)
            after = server_memory(run, server)
            server_result["memory"] = {"requests": plan.memory_requests, "ready": ready, "before": before, "after": after, "load": load}
        else:
            run.skip(f"memory after {plan.memory_requests} requests", "out of time")
    run.save()
    if not plan.batching_gain:
        run.note("--tiny: no batching gain (it needs a second server with HYPERGEN_MAX_BATCH_SIZE=1: ~40 s of CPU here)")
        return
    estimate = server_start_s + bare_seconds(top["requests"] + 2, 1)
    if not run.budget.allows(estimate):
        run.skip("batching gain", f"needs ~{estimate:.0f}s, {run.budget.left():.0f}s left")
        return
    print("server with HYPERGEN_MAX_BATCH_SIZE=1 ...", flush=True)
    with serve(1) as server:
        server.wait_ready(timeout=600)
        unbatched = run_load(server.base_url, top["concurrency"], top["requests"], body)
    server_result["batching_gain"] = batching_gain(top, unbatched)
    shutil.rmtree(model_dir, ignore_errors=True)
    run.save()


# --- levers --------------------------------------------------------------------------------------


def bench_levers(run: Run, plan: Plan) -> None:
    """Section 5: each lever on vs off, same model, same batch, side by side. "Off" is measured
    first and last; gains are against the mean of the two (the drift between them is the noise)."""
    import torch

    from hypergen.config import PipelineLevers
    from hypergen.engine.pipelines import apply_levers, call_context, denoiser_of

    family = "sdxl"
    side, steps, batch = image_side(run, family), plan.lever_steps, plan.lever_batch
    pipe = build_pipeline(run, family)
    call = pipeline_call(pipe, family, batch, side, steps)
    call()  # warm-up
    rows: list[dict[str, Any]] = []
    levers: dict[str, Any] = {"model": family, "size": f"{side}x{side}", "batch": batch, "steps": steps, "rows": rows}
    run.result["levers"] = levers

    def measure(lever: str, env: str, levers_on: PipelineLevers | None = None) -> None:
        estimate = rows[0].get("seconds_per_call", 0.0) * (plan.lever_repeats + 1) if rows else 0.0
        if not run.budget.allows(estimate):
            run.skip(f"lever {env or lever}", "out of time")
            return
        try:
            with call_context(levers_on):
                if plan.warm_up:
                    call()
                seconds = seconds_per_call(run, call, plan.lever_repeats)
        except Exception as error:  # e.g. a kernel this GPU lacks
            rows.append({"lever": lever, "env": env, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            return
        rows.append({"lever": lever, "env": env, "seconds_per_call": seconds})
        print(f"  {env or lever}: {seconds:.3f} s per call", flush=True)

    measure("off", "")
    for backend in ("flash", "efficient", "math", "cudnn"):
        measure("attention backend", f"HYPERGEN_ATTENTION_BACKEND={backend}", PipelineLevers(attention_backend=backend))
    denoiser, vae = denoiser_of(pipe), pipe.vae
    apply_levers(pipe, PipelineLevers(channels_last=True))
    measure("channels_last", "HYPERGEN_CHANNELS_LAST=true")
    for part in (denoiser, vae):
        part.to(memory_format=torch.contiguous_format)
    if apply_levers(pipe, PipelineLevers(fuse_qkv=True)):
        measure("fused QKV projections", "HYPERGEN_FUSE_QKV=true")
        (pipe if hasattr(pipe, "unfuse_qkv_projections") else denoiser).unfuse_qkv_projections()
    else:
        rows.append({"lever": "fused QKV projections", "env": "HYPERGEN_FUSE_QKV=true", "error": "not supported by this pipeline"})
    measure("off again", "")
    offs = [row["seconds_per_call"] for row in rows if row["lever"].startswith("off") and "seconds_per_call" in row]
    if not offs:
        return
    baseline = sum(offs) / len(offs)
    levers["baseline_seconds_per_call"] = baseline
    levers["baseline_drift"] = max(offs) / min(offs) - 1
    for row in rows:
        if "seconds_per_call" in row and not row["lever"].startswith("off"):
            row["gain"] = baseline / row["seconds_per_call"]
    run.save()
    levers["vae"] = bench_vae_levers(run, plan, pipe)
    run.save()
    levers["compile"] = bench_compile(run, plan, pipe, call, baseline)
    pipe = denoiser = vae = None
    free_memory(run)
    run.save()


def bench_vae_levers(run: Run, plan: Plan, pipe: Any) -> list[dict[str, Any]]:
    """VAE tiling and slicing above 1024²: one decode of `lever_batch` images at `vae_side`², time
    and peak memory (their gain is memory; tiles cost some time)."""
    import torch

    vae = pipe.vae
    side, batch = plan.vae_side, plan.lever_batch
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.randn(batch, vae.config.latent_channels, side // scale, side // scale, device=run.device, dtype=run.dtype)
    rows: list[dict[str, Any]] = []
    for name, tiling, slicing in (
        ("off", False, False),
        ("tiling", True, False),
        ("slicing", False, True),
        ("tiling + slicing", True, True),
    ):
        if not run.budget.allows((rows[0]["seconds"] * 3) if rows and "seconds" in rows[0] else 5):
            run.skip(f"VAE {name}", "out of time")
            continue
        (vae.enable_tiling if tiling else vae.disable_tiling)()
        (vae.enable_slicing if slicing else vae.disable_slicing)()
        try:
            free_memory(run)
            if run.cuda:
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                if plan.warm_up:
                    vae.decode(latents)
                seconds = seconds_per_call(run, lambda: vae.decode(latents), 1)
        except Exception as error:  # out of memory without tiling is a result too
            rows.append({"setting": name, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        finally:
            vae.disable_tiling()
            vae.disable_slicing()
        row: dict[str, Any] = {"setting": name, "size": f"{side}x{side}", "batch": batch, "seconds": seconds}
        if run.cuda:
            row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / MB)
        rows.append(row)
    return rows


def bench_compile(run: Run, plan: Plan, pipe: Any, call: Callable[[], Any], baseline: float) -> dict[str, Any]:
    """`torch.compile` of the denoiser (HYPERGEN_TORCH_COMPILE): the first call's extra time, then
    the steady speed. On a CPU, inductor took 97–200 s for the tiny UNet on 2 cores, so `--tiny` on a
    CPU compiles with the `eager` backend: it exercises the path (dynamo tracing), not the speed."""
    from hypergen.config import PipelineLevers
    from hypergen.engine.pipelines import apply_levers, denoiser_of

    estimate = baseline * (plan.lever_repeats + 2) + (20 if run.tiny else 90)  # SDXL's UNet: about a minute to compile
    if not run.budget.allows(estimate):
        run.skip("lever HYPERGEN_TORCH_COMPILE=true", f"needs ~{estimate:.0f}s with its warm-up, {run.budget.left():.0f}s left")
        return {}
    if run.cuda:
        apply_levers(pipe, PipelineLevers(torch_compile=True))
        backend = "inductor"
    else:
        denoiser_of(pipe).compile(backend="eager")
        backend = "eager (CPU: tracing only)"
    try:
        first, _ = timed(run, call)
        if plan.warm_up:
            call()  # dynamo may recompile once with dynamic shapes on the second call
        steady = seconds_per_call(run, call, plan.lever_repeats)
    except Exception as error:  # e.g. no compiler toolchain for inductor on this machine
        return {"backend": backend, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    return {"backend": backend, "first_call_s": first, "warmup_s": first - steady, "seconds_per_call": steady, "gain": baseline / steady}


# --- report --------------------------------------------------------------------------------------


def _fmt(value: Any, pattern: str = "{:.2f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def markdown(result: dict[str, Any]) -> str:
    device = result["device"]
    lines = [
        f"# HyperGen GPU benchmark — {device['name']}",
        "",
        f"{result['mode']} · {device['dtype']} · dense peak {_fmt(device['peak_tflops'], '{:.0f}')} TFLOP/s · torch {device['torch']} · "
        f"diffusers {device['diffusers']} · {result['date']} · {result.get('elapsed_s', 0):.0f} s of a {result['budget_s']:.0f} s budget",
        "",
    ]
    if result["mode"] != "full size":
        lines += ["**Tiny random pipelines: this run checks the harness; its numbers say nothing about speed.**", ""]
    if result.get("flops"):
        lines += [
            "## FLOPs per denoising step (full-size models, counted on the meta device)",
            "",
            "| model | denoiser params | size | TFLOP per image forward | TFLOP per image step |",
            "|---|---|---|---|---|",
        ]
        for family, flops in result["flops"].items():
            guidance = " (classifier-free guidance: 2 forwards)" if flops["cfg"] else " (1 forward)"
            lines.append(
                f"| {family} | {flops['params_m']:.0f} M | {flops['size']} | {flops['tflop_per_image_forward']:.2f} | "
                f"{flops['tflop_per_image_step']:.2f}{guidance} |"
            )
        lines.append("")
    if result.get("models"):
        lines += [
            "## Bare pipeline (`pipe()`, PIL out)",
            "",
            "| model | size, steps | batch | images/s | s per call | TFLOP per step | TFLOP/s (call) | share of peak |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for family, model in result["models"].items():
            if "error" in model:
                lines.append(f"| {family} | failed: {model['error']} | | | | | | |")
                continue
            for batch, row in model["batches"].items():
                lines.append(
                    f"| {family} | {model['size']}, {model['steps']} | {batch} | {row['images_per_s']:.3f} | {row['seconds_per_call']:.3f} | "
                    f"{row['tflop_per_step']:.3g} | {row['call_tflops']:.3g} | {_fmt(row.get('peak_share'), '{:.0%}')} |"
                )
        lines += ["", "| model | denoiser alone: batch | forward ms | TFLOP/s | share of peak | peak memory |", "|---|---|---|---|---|---|"]
        for family, model in result["models"].items():
            alone = model.get("denoiser")
            if alone:
                lines.append(
                    f"| {family} | {alone['batch']} | {alone['forward_ms']:.1f} | {alone['tflops']:.3g} | "
                    f"{_fmt(alone.get('peak_share'), '{:.0%}')} | {_fmt(model.get('peak_memory_mb'), '{:.0f} MB')} |"
                )
        lines += [
            "",
            "TFLOP/s (call) counts only the UNet/transformer's FLOPs over the whole call (text encoders, VAE and PIL included).",
            "",
        ]
    encoding = result.get("encoding")
    if encoding:
        formats = ", ".join(f"{name} {value['ms_per_image']:.1f} ms" for name, value in encoding["formats"].items())
        lines += [
            f"## Encoding at {encoding['size']}",
            "",
            f"{formats} per image; PNG is {encoding['png_share']:.2%} of one image's end-to-end time ({encoding['source']}, {encoding['model']}).",
            "",
        ]
    server = result.get("server")
    if server:
        lines += [
            f"## Server ({server['model']}, {server['size']}, {server['steps']} steps, max batch {server['max_batch_size']})",
            "",
            "| concurrency | images/s | server ÷ bare (batch) | p50 ms | p95 ms | images per call |",
            "|---|---|---|---|---|---|",
        ]
        for level in server.get("levels", []):
            lines.append(
                f"| {level['concurrency']} | {level['images_per_s']:.3f} | {level['server_over_bare']:.2f} ({level['bare_batch']}) | "
                f"{level['latency_p50_ms']:.0f} | {level['latency_p95_ms']:.0f} | {level['mean_images_per_call']:.1f} |"
            )
        lines.append("")
        if "encoding_share" in server:
            lines.append(f"Encoding share of end-to-end time seen by the server (concurrency 1): {server['encoding_share']:.2%}.")
        gain = server.get("batching_gain")
        if gain:
            lines.append(
                f"Batching gain at concurrency {gain['concurrency']}: {gain['ratio']:.2f}× ({gain['batched_images_per_s']:.3f} vs "
                f"{gain['unbatched_images_per_s']:.3f} images/s with `HYPERGEN_MAX_BATCH_SIZE=1`; p95 {gain['batched_p95_ms']:.0f} vs "
                f"{gain['unbatched_p95_ms']:.0f} ms)."
            )
        memory = server.get("memory")
        if memory:
            lines += ["", f"| memory (MB) | server ready | before {memory['requests']} requests | after them |", "|---|---|---|---|"]
            for key in memory["before"]:
                lines.append(f"| {key} | {memory['ready'].get(key)} | {memory['before'][key]} | {memory['after'].get(key)} |")
        lines.append("")
    levers = result.get("levers")
    if levers:
        lines += [
            f"## Levers on vs off ({levers['model']}, {levers['size']}, batch {levers['batch']}, {levers['steps']} steps)",
            "",
            "| lever | setting | s per call | gain vs off |",
            "|---|---|---|---|",
        ]
        for row in levers["rows"]:
            if "error" in row:
                lines.append(f"| {row['lever']} | `{row['env']}` | failed: {row['error']} | |")
            else:
                setting = f"`{row['env']}`" if row["env"] else ""
                lines.append(f"| {row['lever']} | {setting} | {row['seconds_per_call']:.3f} | {_fmt(row.get('gain'), '{:.2f}×')} |")
        compiled = levers.get("compile")
        if compiled and "error" in compiled:
            lines.append(f"| torch.compile ({compiled['backend']}) | `HYPERGEN_TORCH_COMPILE=true` | failed: {compiled['error']} | |")
        elif compiled:
            lines.append(
                f"| torch.compile ({compiled['backend']}) | `HYPERGEN_TORCH_COMPILE=true` | {compiled['seconds_per_call']:.3f} | "
                f"{compiled['gain']:.2f}× (first call {compiled['first_call_s']:.1f} s: warm-up {compiled['warmup_s']:.1f} s) |"
            )
        if "baseline_drift" in levers:
            lines += ["", f"Off measured first and last: {levers['baseline_drift']:.1%} apart (the noise floor of these gains)."]
        if levers.get("vae"):
            lines += ["", "| VAE decode | size, batch | seconds | peak memory |", "|---|---|---|---|"]
            for row in levers["vae"]:
                if "error" in row:
                    lines.append(f"| {row['setting']} | failed: {row['error']} | | |")
                else:
                    memory = _fmt(row.get("peak_memory_mb"), "{:.0f} MB")
                    lines.append(f"| {row['setting']} | {row['size']}, {row['batch']} | {row['seconds']:.3f} | {memory} |")
        lines.append("")
    if result.get("section_s"):
        cpu = result.get("section_cpu_s", {})
        timings = ", ".join(
            f"{name} {seconds:.0f} s ({_fmt(cpu.get(name), '{:.0f}')} s CPU)" for name, seconds in result["section_s"].items()
        )
        lines += [f"Time per section: {timings}.", ""]
    for title, key in (("Notes", "notes"), ("Skipped", "skipped")):
        if result.get(key):
            lines += [f"## {title}", "", *(f"- {item}" for item in result[key]), ""]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the servers), user and system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def describe_device(device: str, dtype: Any) -> dict[str, Any]:
    import os

    import diffusers
    import torch

    dtype_name = str(dtype).replace("torch.", "")
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return {
            "name": name,
            "dtype": dtype_name,
            "peak_tflops": peak_tflops(name, dtype_name),
            "memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 1024**3, 1),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
        }
    name = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return {"name": name, "dtype": dtype_name, "peak_tflops": None, "torch": torch.__version__, "diffusers": diffusers.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--tiny", action="store_true", help="tiny random pipelines (CPU is fine): a smoke test of the harness")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time budget; sections that do not fit are skipped")
    parser.add_argument("--models", default="sd15,sdxl,flux", help="comma-separated: sd15, sdxl, flux")
    parser.add_argument("--sections", default=",".join(SECTION_SHARES), help="comma-separated: " + ", ".join(SECTION_SHARES))
    parser.add_argument("--memory-requests", type=int, help="requests between the two memory readings (default 200; --tiny 16)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)

    import torch

    from hypergen.engine.pipelines import choose_device, choose_dtype
    from hypergen.logs import quiet_model_libraries

    quiet_model_libraries()
    device = choose_device()
    if not device.startswith("cuda") and not args.tiny:
        parser.error("the full-size models need a CUDA GPU (this machine has none); --tiny runs the harness on the CPU")
    dtype = choose_dtype(device)
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="hypergen-gpu-bench-"))
    run = Run(out=args.out, tiny=args.tiny, device=device, dtype=dtype, budget=budget, work=work)
    run.result.update(
        {
            "title": f"HyperGen GPU benchmark — {describe_device(device, dtype)['name']}",
            "mode": "tiny (harness check)" if args.tiny else "full size",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "budget_s": args.budget_s,
            "device": describe_device(device, dtype),
            "levers_default": "all off (HYPERGEN_* unset)",
        }
    )
    if not args.tiny:
        run.note(
            "full-size pipelines with random weights from the published configs; tokenizers are character-level (prompts padded to full length)"
        )
    if args.tiny:
        run.note("--tiny: tiny random pipelines (hypergen/testing); FLOPs of the full-size models are still counted, on the meta device")
    plan = make_plan(args.tiny, args.memory_requests)
    families = [family.strip() for family in args.models.split(",") if family.strip()]
    sections = {name.strip() for name in args.sections.split(",")}
    print(f"{run.result['title']} ({run.result['mode']}, {run.dtype_name}); budget {args.budget_s:.0f}s", flush=True)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("flops", lambda: measure_flops_on_meta(run)),
        ("models", lambda: bench_models(run, plan, families)),
        ("encoding", lambda: bench_encoding_share(run)),
        ("server", lambda: bench_server(run, plan)),
        ("levers", lambda: bench_levers(run, plan)),
    ]
    try:
        for name, step in steps:
            if name not in sections:
                run.skip(name, "not asked for (--sections)")
                continue
            if budget.left() <= 0:
                run.skip(name, "out of time")
                continue
            print(f"[{budget.elapsed():.0f}s] {name}", flush=True)
            started, cpu_started = time.monotonic(), cpu_seconds()
            with budget.section(name):
                try:
                    step()
                except Exception as error:  # one section failing must not lose the others' results
                    run.note(f"section {name} failed: {type(error).__name__}: {str(error)[:300]}")
                    free_memory(run)
            run.result.setdefault("section_s", {})[name] = round(time.monotonic() - started, 1)
            run.result.setdefault("section_cpu_s", {})[name] = round(cpu_seconds() - cpu_started, 1)
            run.save()
    finally:
        run.save()
        shutil.rmtree(work, ignore_errors=True)
    print(f"[{budget.elapsed():.0f}s] done: {args.out / 'results.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

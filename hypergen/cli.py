"""`hypergen` command line: serve, import a model into the BentoML store, build a Bento.

    hypergen serve [MODEL] [--port 3000] [--api-key KEY] ...
    hypergen import [MODEL] [--name NAME]
    hypergen build [MODEL] [--name NAME] [--lora NAME=PATH[:SCALE] ...]

Flags map to the `HYPERGEN_*` settings; `serve` runs the same services as `bentoml serve`.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _project_root() -> Path:
    if not (PROJECT_ROOT / "service.py").is_file():
        sys.exit(
            f"hypergen: service.py not found next to the package ({PROJECT_ROOT}); "
            "install HyperGen from its source tree with `pip install -e .`"
        )
    return PROJECT_ROOT


def _serve_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    mapping = {
        "HYPERGEN_MODEL": args.model,
        "HYPERGEN_MODEL_NAME": args.model_name,
        "HYPERGEN_API_KEYS": ",".join(args.api_key) if args.api_key else None,
        "HYPERGEN_MAX_QUEUE": args.max_queue,
        "HYPERGEN_MAX_BATCH_SIZE": args.max_batch_size,
        "HYPERGEN_REQUEST_TIMEOUT": args.request_timeout,
        "HYPERGEN_PUBLIC_URL": args.public_url,
        "HYPERGEN_LOG_LEVEL": args.log_level,
        "HYPERGEN_LORAS": ",".join(args.lora) if args.lora else None,
        "HYPERGEN_LORA_DIRS": ",".join(args.lora_dir) if args.lora_dir else None,
        "HYPERGEN_WORKERS": args.workers,
        "HYPERGEN_MEMORY_BUDGET_MB": args.memory_budget_mb,
        "HYPERGEN_VIDEO_MODEL": args.video_model,
    }
    env.update({key: str(value) for key, value in mapping.items() if value is not None})
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    # The installed package's services: no source tree needed.
    command = [sys.executable, "-m", "bentoml", "serve", "hypergen.service:ImageAPI", "--host", args.host, "--port", str(args.port)]
    os.execvpe(command[0], command, _serve_env(args))
    return 0  # not reached


def cmd_import(args: argparse.Namespace) -> int:
    from .bento import default_model_name, import_model
    from .config import load_settings

    tag = import_model(args.model, args.name or default_model_name(args.model), load_settings())
    print(tag)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Import the model and the start-up LoRAs into the BentoML store (a version with the same
    content is reused), then build a Bento whose arguments name them, so the Bento carries all
    their weights, and whose `src` leaves out the copies of them that live in the source tree."""
    import tempfile

    import yaml

    from .bento import default_model_name, import_lora, import_model, resolve_model_directory, without_stored_copies
    from .config import DEFAULT_VIDEO_MODEL_NAME, EMBEDDED_VIDEO_DIR, NO_VIDEO_WORDS, embedded_lora_specs, load_settings, parse_lora_specs

    root = _project_root()
    settings = load_settings()
    tag = import_model(args.model, args.name or default_model_name(args.model), settings)
    arguments = {"model": tag}
    carried = [resolve_model_directory(args.model, settings)] if not args.model or Path(args.model).is_dir() else []
    specs = parse_lora_specs(",".join(args.lora or []))
    if not args.model and not args.lora:
        # The Bento names the embedded model by its store tag, so the `outline` adapter that
        # comes with it must be named (and carried) explicitly too.
        specs = embedded_lora_specs()
    if specs:
        arguments["loras"] = ",".join(f"{spec.name}={import_lora(spec)}:{spec.scale}" for spec in specs)
        carried += [Path(spec.source) for spec in specs]
    video = args.video_model or (
        str(EMBEDDED_VIDEO_DIR) if not args.model and (EMBEDDED_VIDEO_DIR / "model_index.json").is_file() else None
    )
    if video and video.strip().lower() not in NO_VIDEO_WORDS:
        embedded = Path(video).resolve() == EMBEDDED_VIDEO_DIR.resolve()
        arguments["video_model"] = import_model(video, DEFAULT_VIDEO_MODEL_NAME if embedded else default_model_name(video), settings)
        carried += [Path(video)] if Path(video).is_dir() else []
    print(f"stored {', '.join(arguments.values())}; building the Bento")
    bentofile = yaml.safe_load((Path(args.bentofile) if args.bentofile else root / "bentofile.yaml").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "args.yaml").write_text(yaml.safe_dump(arguments))
        (Path(scratch) / "bentofile.yaml").write_text(yaml.safe_dump(without_stored_copies(bentofile, carried, root), sort_keys=False))
        command = [
            sys.executable,
            "-m",
            "bentoml",
            "build",
            ".",
            "--arg-file",
            f"{scratch}/args.yaml",
            "--bentofile",
            f"{scratch}/bentofile.yaml",
        ]
        return subprocess.call(command, cwd=root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hypergen", description="OpenAI-compatible image generation server.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model (default: the embedded tiny model)")
    serve.add_argument("model", nargs="?", help="diffusers directory, Hub id or BentoML model tag")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=3000)
    serve.add_argument("--model-name", help="id shown in /v1/models (HYPERGEN_MODEL_NAME)")
    serve.add_argument("--api-key", action="append", help="accepted API key; repeat for several")
    serve.add_argument("--max-queue", type=int, help="requests allowed to wait (HYPERGEN_MAX_QUEUE, 100)")
    serve.add_argument("--max-batch-size", type=int, help="images per pipeline call (HYPERGEN_MAX_BATCH_SIZE, 8)")
    serve.add_argument("--request-timeout", type=float, help="seconds (HYPERGEN_REQUEST_TIMEOUT, 600)")
    serve.add_argument("--public-url", help="base for url responses (HYPERGEN_PUBLIC_URL)")
    serve.add_argument("--log-level", help="HYPERGEN_LOG_LEVEL (INFO)")
    serve.add_argument("--lora", action="append", help="NAME=PATH_OR_ID[:SCALE], loaded at start; repeatable")
    serve.add_argument("--lora-dir", action="append", help="directory lora_path may load from; repeatable")
    serve.add_argument("--workers", type=int, help="diffusion worker services, one per GPU (HYPERGEN_WORKERS, 1)")
    serve.add_argument("--memory-budget-mb", type=float, help="device memory for model weights (HYPERGEN_MEMORY_BUDGET_MB)")
    serve.add_argument("--video-model", help="video pipeline directory, Hub id or tag, or 'none' (HYPERGEN_VIDEO_MODEL)")
    serve.set_defaults(handler=cmd_serve)

    for name, handler, summary in (
        ("import", cmd_import, "store a diffusers model in the BentoML model store"),
        ("build", cmd_build, "import the model and build a Bento that carries it"),
    ):
        command = commands.add_parser(name, help=summary)
        command.add_argument("model", nargs="?", help="diffusers directory or Hub id (default: the embedded model)")
        command.add_argument("--name", help="BentoML model name (default: derived from MODEL)")
        command.set_defaults(handler=handler)
        if name == "build":
            command.add_argument(
                "--lora",
                action="append",
                help="NAME=PATH[:SCALE] carried in the Bento; repeatable (without MODEL: the demo model's outline adapter)",
            )
            command.add_argument("--bentofile", help="build with this bentofile instead of the project's (e.g. one adding wheels)")
            command.add_argument(
                "--video-model",
                help="video pipeline directory or Hub id carried in the Bento (without MODEL: the demo video model; 'none': no video)",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("import", "build"):  # say whether each model was stored or reused
        logging.basicConfig(level=logging.INFO, format="hypergen: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""The shipped demo video model, judged by a program, and its speed on this machine.

    python -m bench.demo_video [--clips 40] [--name cpu-demo-video] [--gif docs/demo-video.gif]

Loads `hypergen/assets/demo-video` the way the worker does (`engine.video.load_video_model`),
renders held-out (prompt, seed) clips — "a red circle moving right on a blue background" —
through the worker's own render path, and reads each back with `training.motion.judge_clip`
(colours from the middle frame, direction from the shape's centre between the first and last
frames). Reports seconds per frame at the model's defaults, and writes an animated GIF and a
strip of frames of one clip per direction for the README. Writes bench/results/<name>.json/.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.run import RESULTS_DIR, write_results

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"


def render(loaded, prompt: str, seed: int, frames: int, steps: int, guidance: float):
    from hypergen.engine.video import ImagesFirst, VideoCall, render_frames
    from hypergen.video_protocol import VideoJob

    limits = loaded.limits
    job = VideoJob(request_id="bench", model=limits.id, prompt=prompt, width=limits.native_width, height=limits.native_height,
                   num_frames=frames, fps=limits.fps, num_inference_steps=steps, guidance_scale=guidance, seed=seed)  # fmt: skip
    return render_frames(loaded, VideoCall(job), ImagesFirst(), lambda event: None)


def write_pictures(loaded, gif: Path, strip: Path, frames: int) -> None:
    """One clip per direction: an animated GIF (2×2 clips, 4× enlarged) and a strip of frames."""
    from PIL import Image

    from training.motion import DIRECTIONS

    limits = loaded.limits
    clips = [render(loaded, f"a red circle moving {direction} on a blue background", 7, frames, limits.default_steps,
                    limits.default_guidance_scale) for direction in DIRECTIONS]  # fmt: skip
    side, scale = limits.native_width, 4
    animation = []
    for index in range(frames):
        canvas = Image.new("RGB", (2 * side, 2 * side))
        for position, clip in enumerate(clips):
            canvas.paste(clip[index], ((position % 2) * side, (position // 2) * side))
        animation.append(canvas.resize((2 * side * scale, 2 * side * scale), Image.Resampling.NEAREST))
    gif.parent.mkdir(parents=True, exist_ok=True)
    animation[0].save(gif, save_all=True, append_images=animation[1:], duration=1000 // limits.fps, loop=0)
    sheet = Image.new("RGB", (frames * side, len(clips) * side))
    for row, clip in enumerate(clips):
        for column, frame in enumerate(clip):
            sheet.paste(frame, (column * side, row * side))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST).save(strip)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_video", description=__doc__)
    parser.add_argument("--name", default="cpu-demo-video")
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--gif", type=Path, default=DOCS_DIR / "demo-video.gif")
    parser.add_argument("--strip", type=Path, default=DOCS_DIR / "demo-video-frames.png")
    parser.add_argument("--model", type=Path, default=None, help="a video model directory (default: the demo video model)")
    args = parser.parse_args(argv)

    import torch

    from hypergen.config import EMBEDDED_VIDEO_DIR
    from hypergen.engine.video import load_video_model
    from training.motion import held_out_clips, judge_clip

    loaded = load_video_model("demo-video", str(args.model or EMBEDDED_VIDEO_DIR), device="cpu")
    limits = loaded.limits
    frames, steps, guidance = limits.default_frames, limits.default_steps, limits.default_guidance_scale
    correct = {"colour": 0, "background": 0, "direction": 0}
    pairs = held_out_clips(args.clips)
    started = time.perf_counter()
    for moving, seed in pairs:
        for key, ok in judge_clip(render(loaded, moving.prompt, seed, frames, steps, guidance)).score(moving).items():
            correct[key] += ok
    judged_s = time.perf_counter() - started
    scores = {key: value / len(pairs) for key, value in correct.items()}
    latencies = []
    for seed in range(6):
        began = time.perf_counter()
        render(loaded, "a green square moving up on a black background", seed, frames, steps, guidance)
        latencies.append(time.perf_counter() - began)
    latencies = latencies[1:]  # the first call warms up
    write_pictures(loaded, args.gif, args.strip, frames)
    result = {
        "model": str(args.model or "hypergen/assets/demo-video"),
        "clips": len(pairs),
        "frames": frames,
        "size": f"{limits.native_width}x{limits.native_height}",
        "fps": limits.fps,
        "steps": steps,
        "guidance": guidance,
        "threads": torch.get_num_threads(),
        "scores": scores,
        "clip_s": {"median": round(statistics.median(latencies), 3), "max": round(max(latencies), 3)},
        "seconds_per_frame": round(statistics.median(latencies) / frames, 4),
        "judging_s": round(judged_s, 1),
    }
    lines = [
        f"# Demo video model ({len(pairs)} held-out prompt/seed clips, judged by `training.motion.judge_clip`)",
        "",
        f"{frames} frames of {result['size']} at {limits.fps} fps, {steps} steps, guidance {guidance}, {result['threads']} CPU threads.",
        "",
        "| shape colour | background | direction (chance 25 %) | one clip (median of 5) | seconds per frame |",
        "|---|---|---|---|---|",
        f"| {scores['colour']:.0%} | {scores['background']:.0%} | {scores['direction']:.0%} | {result['clip_s']['median']:.2f} s "
        f"| {result['seconds_per_frame']:.3f} s |",
        "",
    ]
    write_results(args.results_dir, args.name, result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

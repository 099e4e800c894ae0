"""The moving world of HyperGen's demo video model, and the judge that scores its clips.

A clip is a `training.shapes` picture whose shape slides in a straight line: "a red circle
moving right on a blue background" (directions left, right, up, down), `FRAMES` frames of
64×64. The judge reads each frame back with the palette (as `shapes.judge` does), finds the
shape's centre in every frame, and calls the direction from the centre's displacement between
the first and the last frames.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training.shapes import COLOURS, PALETTE, SIZE, Scene, _shape_mask, judge, nearest_colours, random_scene

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
FRAMES = 8
# How far the centre travels over a clip, as a fraction of the side (26 pixels at 64×64).
TRAVEL = 0.40
# The judge calls a direction only when the centre moved at least this many pixels.
MIN_DISPLACEMENT = 4.0


@dataclass(frozen=True)
class MovingScene:
    scene: Scene
    direction: str

    @property
    def prompt(self) -> str:
        scene = self.scene
        return f"a {scene.colour} {scene.shape} moving {self.direction} on a {scene.background} background"


def random_moving_scene(rng: random.Random) -> MovingScene:
    return MovingScene(random_scene(rng), rng.choice(tuple(DIRECTIONS)))


def held_out_clips(count: int, seed: int = 2027) -> list[tuple[MovingScene, int]]:
    """(moving scene, generation seed) pairs for evaluation; directions take turns."""
    rng = random.Random(seed)
    directions = tuple(DIRECTIONS)
    return [(MovingScene(random_scene(rng), directions[index % 4]), rng.randrange(2**31)) for index in range(count)]


def motion_caption(moving: MovingScene, rng: random.Random) -> str:
    """A training caption: mostly the full prompt, sometimes shorter forms (10 % empty, for guidance)."""
    scene, direction = moving.scene, moving.direction
    roll = rng.random()
    if roll < 0.10:
        return ""
    if roll < 0.70:
        return moving.prompt
    if roll < 0.85:
        return f"a {scene.colour} {scene.shape} moving {direction}"
    return f"{scene.colour} {scene.shape} moving {direction} , {scene.background} background"


def draw_clip(moving: MovingScene, rng: random.Random, frames: int = FRAMES, size: int = SIZE) -> list[Image.Image]:
    """The frames of one clip: the shape (size as `shapes.draw`) slides `TRAVEL` of the side in
    its direction, centred on the middle of the picture (give or take a little)."""
    scene = moving.scene
    dx, dy = DIRECTIONS[moving.direction]
    scale = 4
    big = size * scale
    half = rng.uniform(0.18, 0.26) * big
    cx = big / 2 + rng.uniform(-0.06, 0.06) * big
    cy = big / 2 + rng.uniform(-0.06, 0.06) * big
    travel = TRAVEL * big
    ys, xs = np.mgrid[0:big, 0:big] + 0.5
    clip = []
    for frame in range(frames):
        offset = (frame / max(frames - 1, 1) - 0.5) * travel
        inside = _shape_mask(scene.shape, xs, ys, cx + dx * offset, cy + dy * offset, half)
        pixels = np.where(inside[..., None], PALETTE[scene.colour], PALETTE[scene.background]).astype(np.float32)
        pixels = pixels.reshape(size, scale, size, scale, 3).mean(axis=(1, 3))
        clip.append(Image.fromarray(pixels.round().astype(np.uint8)))
    return clip


@dataclass(frozen=True)
class ClipVerdict:
    colour: str | None
    background: str
    direction: str | None
    displacement: tuple[float, float]  # pixels, (x, y), last frames' centre minus the first's

    def score(self, moving: MovingScene) -> dict[str, bool]:
        return {
            "colour": self.colour == moving.scene.colour,
            "background": self.background == moving.scene.background,
            "direction": self.direction == moving.direction,
        }


def shape_centre(frame: Image.Image, colour: int) -> tuple[float, float] | None:
    """The centre of the pixels whose nearest named colour is `colour` (palette index)."""
    labels = nearest_colours(np.asarray(frame.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32))
    ys, xs = np.nonzero(labels == colour)
    if len(xs) < 8:
        return None
    return float(xs.mean()), float(ys.mean())


def judge_clip(frames: list[Image.Image]) -> ClipVerdict:
    """Colours from the middle frame (`shapes.judge`); direction from the shape's centre in the
    first and last quarter of the frames: the larger axis of the displacement, if it is at least
    `MIN_DISPLACEMENT` pixels."""
    middle = judge(frames[len(frames) // 2])
    if middle.colour is None:
        return ClipVerdict(None, middle.background, None, (0.0, 0.0))
    colour = COLOURS.index(middle.colour)
    centres = [shape_centre(frame, colour) for frame in frames]
    quarter = max(1, len(frames) // 4)
    first = [c for c in centres[:quarter] if c is not None]
    last = [c for c in centres[-quarter:] if c is not None]
    if not first or not last:
        return ClipVerdict(middle.colour, middle.background, None, (0.0, 0.0))
    dx = float(np.mean([c[0] for c in last]) - np.mean([c[0] for c in first]))
    dy = float(np.mean([c[1] for c in last]) - np.mean([c[1] for c in first]))
    direction = None
    if max(abs(dx), abs(dy)) >= MIN_DISPLACEMENT:
        direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return ClipVerdict(middle.colour, middle.background, direction, (round(dx, 1), round(dy, 1)))

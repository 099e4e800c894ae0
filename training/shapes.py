"""The synthetic world HyperGen's demo model draws, and the judge that scores its pictures.

A picture is one flat shape (circle, square or triangle) in a named colour on a background of
another named colour, 64×64, described by prompts such as "a red circle on a blue background".
Training draws pictures on the fly from a seeded generator; the judge reads a picture back into
(shape colour, background colour, shape) with nothing but the palette and the mask's geometry,
so `bench.demo_quality` and the tests score generated images the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (30, 60, 220),
    "purple": (140, 50, 180),
    "pink": (250, 140, 200),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZE = 64
# An outlined shape's stroke, as a fraction of its inradius (the largest circle inside it): 20 % of
# a circle's or square's width, 12 % of a triangle's (whose middle is smaller), 3–8 pixels. The
# demo model's 4× autoencoder (a latent pixel is 4×4 pixels) turns thinner strokes into blends of
# the two colours: decoding encoded outlines kept the shape's colour 73 % of the time at 0.35,
# 86 % at 0.4, and the judge saw 93 % of them as outlines at 0.4.
OUTLINE_STROKE = 0.4

# Words the tokenizer knows beyond the world's own; they carry no meaning and training scatters
# them through captions so prompts written in a more natural style still work.
FILLER_WORDS = (
    "the", "an", "of", "with", "and", "in", "photo", "picture", "image", "drawing", "painting",
    "simple", "flat", "plain", "colored", "coloured", "shape", "big", "small", "large", "little",
    "centered", "high", "quality", "detailed", "beautiful", "art", "style", "minimal", "icon",
)  # fmt: skip
# "a", "on", "background" and punctuation complete the caption grammar.
GRAMMAR_WORDS = ("a", "on", "background", ",", ".")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def vocabulary() -> list[str]:
    """Every word the demo model's tokenizer maps to one token."""
    return [*COLOURS, *SHAPES, *GRAMMAR_WORDS, *FILLER_WORDS]


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(COLOURS, 2)
    return Scene(colour, rng.choice(SHAPES), background)


def held_out_scenes(count: int, seed: int = 2026) -> list[tuple[Scene, int]]:
    """(scene, generation seed) pairs for evaluation: every colour, background and shape appears."""
    rng = random.Random(seed)
    return [(random_scene(rng), rng.randrange(2**31)) for _ in range(count)]


def caption(scene: Scene, rng: random.Random) -> str:
    """A training caption for a scene: mostly the full prompt, sometimes a partial one (so a
    negative prompt such as "a red circle" means something), sometimes with filler words."""
    roll = rng.random()
    if roll < 0.10:
        return ""  # unconditional, for classifier-free guidance
    if roll < 0.55:
        words = ["a", scene.colour, scene.shape, "on", "a", scene.background, "background"]
    elif roll < 0.70:
        words = [scene.colour, scene.shape, "on", scene.background, "background"]
    elif roll < 0.80:
        words = ["a", scene.colour, scene.shape]
    elif roll < 0.88:
        words = ["a", scene.shape, "on", "a", scene.background, "background"]
    elif roll < 0.94:
        words = ["a", scene.background, "background", "with", "a", scene.colour, scene.shape]
    else:
        words = ["a", scene.colour, scene.shape, ",", scene.background, "background"]
    for _ in range(rng.choice((0, 0, 0, 1, 2, 3))):
        if rng.random() < 0.5:
            filler = rng.choice(FILLER_WORDS)
        else:  # a word the tokenizer does not know: it arrives as letter pieces
            filler = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7)))
        words.insert(rng.randrange(len(words) + 1), filler)
    return " ".join(words)


def draw(scene: Scene, rng: random.Random, size: int = SIZE, outline: bool = False) -> Image.Image:
    """The scene near the middle, its size and position varying a little (a demo model this small
    learns shapes far faster when they do not wander); 4× supersampled so edges are smooth.

    `outline=True` draws the same shape (same size and place for the same `rng` state) hollow:
    a stroke `OUTLINE_STROKE` of its size wide in the shape's colour around the background colour
    (the look the demo LoRA, `training.demo_lora`, teaches)."""
    scale = 4
    big = size * scale
    half = rng.uniform(0.20, 0.32) * big
    cx = big / 2 + rng.uniform(-0.12, 0.12) * big
    cy = big / 2 + rng.uniform(-0.12, 0.12) * big
    ys, xs = np.mgrid[0:big, 0:big] + 0.5
    inside = _shape_mask(scene.shape, xs, ys, cx, cy, half)
    if outline:
        inside &= ~_shape_mask(scene.shape, xs, ys, cx, cy, half, inset=OUTLINE_STROKE * _INRADIUS[scene.shape] * half)
    pixels = np.where(inside[..., None], PALETTE[scene.colour], PALETTE[scene.background]).astype(np.float32)
    pixels = pixels.reshape(size, scale, size, scale, 3).mean(axis=(1, 3))
    return Image.fromarray(pixels.round().astype(np.uint8))


def _shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, half: float, inset: float = 0.0) -> np.ndarray:
    """Points inside the shape centred at (cx, cy) with half-size `half`, at least `inset` from its edges."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= (half - inset) ** 2
    if shape == "square":
        return (np.abs(xs - cx) <= half - inset) & (np.abs(ys - cy) <= half - inset)
    # An upright triangle: apex at the top centre, base the box's full width. Its slanted edges
    # are the lines 2·|x - cx| = y - top, whose distance from a point divides by √5.
    top, bottom = cy - half, cy + half
    return (bottom - ys >= inset) & ((ys - top) - 2 * np.abs(xs - cx) >= inset * 5**0.5)


# The radius of the largest circle inside each shape, in units of its half-size: a triangle with
# base and height 2 (sides 2, √5, √5) has inradius area / semi-perimeter = 2 / (1 + √5).
_INRADIUS = {"circle": 1.0, "square": 1.0, "triangle": 2 / (1 + 5**0.5)}


@dataclass(frozen=True)
class Verdict:
    colour: str | None
    shape: str | None
    background: str

    def score(self, scene: Scene) -> dict[str, bool]:
        return {
            "colour": self.colour == scene.colour,
            "background": self.background == scene.background,
            "shape": self.shape == scene.shape,
        }


_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.float32)


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Index into the palette of the nearest named colour for each RGB pixel."""
    distances = ((pixels[..., None, :].astype(np.float32) - _PALETTE_ARRAY) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1)


def judge(image: Image.Image) -> Verdict:
    """Read a picture back: background = the named colour most of the border has; shape pixels =
    those whose nearest named colour differs from it; shape colour = their most common named
    colour; shape = from the mask's geometry (`shape_of`)."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    labels = nearest_colours(pixels)
    border = np.concatenate([labels[:3].ravel(), labels[-3:].ravel(), labels[:, :3].ravel(), labels[:, -3:].ravel()])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    mask = labels != background
    if mask.sum() < 12:
        return Verdict(None, None, COLOURS[background])
    colour = int(np.bincount(labels[mask], minlength=len(COLOURS)).argmax())
    return Verdict(COLOURS[colour], shape_of(labels == colour), COLOURS[background])


def shape_of(mask: np.ndarray) -> str | None:
    """Circle, square or triangle from the mask's geometry: a triangle (apex up) is much
    narrower a quarter of the way down its box than three quarters down; a square fills its box
    (≈ 1), a circle less (π/4 ≈ 0.79)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 12:
        return None
    # Percentiles rather than extremes, so a few stray pixels do not stretch the box.
    top, bottom = (int(round(v)) for v in np.percentile(ys, [1, 99]))
    left, right = (int(round(v)) for v in np.percentile(xs, [1, 99]))
    box = mask[top : bottom + 1, left : right + 1]
    height = box.shape[0]
    upper = box[height // 4].sum()
    lower = box[(3 * height) // 4].sum()
    if lower > 0 and upper / lower < 0.7:
        return "triangle"
    return "square" if box.mean() > 0.88 else "circle"



@dataclass(frozen=True)
class FillVerdict:
    """How the shape is drawn: `fill` is "outline" (hollow) or "filled", None when there is no
    shape; `shape` is read from its silhouette (the shape together with what it encloses), so a
    ring reads as a circle."""

    fill: str | None
    shape: str | None


def judge_fill(image: Image.Image) -> FillVerdict:
    """Whether the shape `judge` finds is an outline or filled.

    The hole is the background the shape encloses: background-coloured pixels that cannot reach
    the picture's border without crossing the shape (every pixel of another colour, so blended
    edges count as shape), the shape first thickened by one pixel so a ring with a gap of a pixel
    or two still encloses its middle. A shape is an outline when its hole is at least `MIN_HOLE`
    of the area the shape covers together with the hole.
    """
    verdict = judge(image)
    if verdict.colour is None:
        return FillVerdict(None, None)
    labels = nearest_colours(np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32))
    thickened = _dilate(labels != COLOURS.index(verdict.background))
    outside = _reachable_from_border(~thickened)
    hole = ~thickened & ~outside
    silhouette = ~_dilate(outside)  # what the shape covers with its hole, less the thickening
    fill = "outline" if hole.sum() >= MIN_HOLE * (~outside).sum() else "filled"
    return FillVerdict(fill, shape_of(silhouette))


# TODO-measure
MIN_HOLE = 0.05


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in all eight directions."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    grown = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            grown |= padded[dy : dy + height, dx : dx + width]
    return grown


def _reachable_from_border(free: np.ndarray) -> np.ndarray:
    """The `free` pixels connected (4-neighbourhood) to the picture's border through free pixels."""
    reached = np.zeros_like(free)
    reached[0], reached[-1], reached[:, 0], reached[:, -1] = free[0], free[-1], free[:, 0], free[:, -1]
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= free
        if np.array_equal(grown, reached):
            return reached
        reached = grown

"""The synthetic world HyperGen's demo model draws, and the judge that scores its pictures.

A picture is one flat shape (circle, square or triangle) in a named colour on a background of
another named colour, 64×64, described by prompts such as "a red circle on a blue background";
`draw(..., outline=True)` draws the shape hollow, and `judge_fill` tells hollow from filled.
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
# 86 % at 0.4 (where `judge_fill` read 96 % of them as outlines).
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
    a stroke in the shape's colour, `OUTLINE_STROKE` of its inradius wide, around the background
    colour (the look the demo LoRA, `training.demo_lora`, teaches)."""
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
    """How the shape is drawn.

    `fill`: "outline" when its middle shows the background and the shape surrounds that middle;
    "filled" when its middle has the shape's colour (or any colour but the background's); "open"
    when its middle shows the background but the shape does not surround it (broken pieces, a
    wide-open "U"); None when there is no shape. `closed`: the stricter reading of an outline,
    the shape encloses background with no gap wider than about two pixels. `shape` is read from
    the silhouette (the shape with what it encloses), so a ring reads as a circle.
    """

    fill: str | None
    closed: bool
    shape: str | None


def judge_fill(image: Image.Image) -> FillVerdict:
    """Whether the shape `judge` finds is an outline or filled, from its middle and its ring.

    The shape is every pixel whose nearest named colour is not the background's (so edges the
    model blends count). Its middle is a disc around the shape's centroid, of radius `CORE_RADIUS`
    times the shape's smaller side; it shows the background when most of the disc does. The shape
    surrounds the middle when at least `MIN_SURROUNDED` of `RAYS` rays cast from the centroid
    meet it. It is closed when, thickened by one pixel, it encloses background pixels (ones that
    cannot reach the picture's border without crossing it) of at least `MIN_HOLE` of its area.
    """
    verdict = judge(image)
    if verdict.colour is None:
        return FillVerdict(None, False, None)
    labels = nearest_colours(np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32))
    background = labels == COLOURS.index(verdict.background)
    shape = ~background
    ys, xs = np.nonzero(shape)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5  # pixel (y, x) covers [y, y + 1) × [x, x + 1)
    height, width = (np.percentile(coords, 99) - np.percentile(coords, 1) + 1 for coords in (ys, xs))
    grid_y, grid_x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    middle = (grid_y - cy) ** 2 + (grid_x - cx) ** 2 <= (CORE_RADIUS * min(height, width)) ** 2
    see_through = background[middle].mean() >= 0.5 if middle.any() else False

    angles = np.arange(RAYS) * 2 * np.pi / RAYS
    distances = np.arange(0, 2 * SIZE, 0.5)
    ray_y = cy + np.outer(np.sin(angles), distances)
    ray_x = cx + np.outer(np.cos(angles), distances)
    on_picture = (ray_y >= 0) & (ray_y < SIZE) & (ray_x >= 0) & (ray_x < SIZE)
    meets = np.zeros_like(on_picture)
    meets[on_picture] = shape[ray_y[on_picture].astype(int), ray_x[on_picture].astype(int)]
    surrounded = meets.any(axis=1).mean() >= MIN_SURROUNDED

    thickened = _dilate(shape)
    outside = _reachable_from_border(~thickened)
    hole = ~thickened & ~outside
    closed = bool(hole.sum() >= MIN_HOLE * (~outside).sum())
    silhouette = ~_dilate(outside)  # what the shape covers with its hole, less the thickening
    fill = ("outline" if surrounded else "open") if see_through else "filled"
    return FillVerdict(fill, closed, shape_of(silhouette))


# The middle: a disc 0.15 × the shape's smaller side in radius. The hole of the thinnest-walled
# outline `draw` makes (a triangle's) has an inradius of 0.37 × its half-size, 0.185 × its side.
CORE_RADIUS = 0.15
RAYS = 16
MIN_SURROUNDED = 0.75  # a ring may have a gap a quarter of the way round and still be an outline
# An outline `draw` makes encloses at least 12 % of its area even thickened by a pixel; a filled
# shape encloses nothing.
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

"""The judge that scores the demo model's pictures reads drawn pictures right, so the benchmarks
and end-to-end tests that rely on it measure the model, not the judge."""

from __future__ import annotations

import random

import numpy as np
import pytest

from training.shapes import PALETTE, draw, judge, judge_fill, random_scene


@pytest.mark.parametrize("outline", [False, True], ids=["filled", "outline"])
def test_drawn_pictures_are_read_back_as_drawn(outline):
    rng = random.Random(3)
    for _ in range(60):
        scene = random_scene(rng)
        picture = draw(scene, rng, outline=outline)
        verdict, fill = judge(picture), judge_fill(picture)
        assert (verdict.colour, verdict.background) == (scene.colour, scene.background), scene
        assert (fill.fill, fill.closed, fill.shape) == ("outline" if outline else "filled", outline, scene.shape), scene


def test_an_outline_is_the_filled_shape_with_its_middle_showing_the_background():
    scene = random_scene(random.Random(4))
    filled = np.asarray(draw(scene, random.Random(5)))
    hollow = np.asarray(draw(scene, random.Random(5), outline=True))
    background = np.array(PALETTE[scene.background])
    outside = (filled == background).all(axis=-1)
    assert (hollow[outside] == background).all()  # nothing drawn outside the filled shape
    hole = (hollow == background).all(axis=-1) & ~outside
    assert hole.sum() > 0.15 * (~outside).sum()

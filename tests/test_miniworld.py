"""The miniature world: deterministic renders, a judge that reads them, mini-CoBSAT's prompt rule."""

from __future__ import annotations

import numpy as np
import pytest

from thinkdiff.evaluation.cobsat.protocol import prompts_list
from thinkdiff.miniworld.judge import pixel_background, pixel_color
from thinkdiff.miniworld.minicobsat import MINI_TASKS, build_prompt, build_prompts, cell_scene
from thinkdiff.miniworld.world import (
    ATTRIBUTES,
    HELD_OUT,
    IMAGE_SIZE,
    Scene,
    caption,
    full_caption,
    is_held_out,
    parse_caption,
    render,
    sample_scene,
    scene_rng,
    theme_caption,
)


def test_renders_are_deterministic():
    scenes_a = [sample_scene(scene_rng("t", 1)) for _ in range(3)]
    scenes_b = [sample_scene(scene_rng("t", 1)) for _ in range(3)]
    assert scenes_a == scenes_b
    rng = scene_rng("t", 2)
    for scene in [sample_scene(rng) for _ in range(20)]:
        image = render(scene)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
        assert np.array_equal(image, render(scene))
    other = Scene(**{**scenes_a[0].__dict__, "noise_seed": scenes_a[0].noise_seed + 1})
    assert not np.array_equal(render(scenes_a[0]), render(other))


def test_held_out_cells_are_never_sampled_by_default():
    assert all(len(cells) == 10 for cells in HELD_OUT.values())
    for theme, cells in HELD_OUT.items():  # one per detail and one per shape
        assert len({d for d, _ in cells}) == 10 and len({s for _, s in cells}) == 10, theme
    rng = scene_rng("held", 0)
    assert not any(
        is_held_out(s.shape, s.color, s.background, s.texture)
        for s in (sample_scene(rng) for _ in range(2000))
    )
    detail, shape = sorted(HELD_OUT["texture_shape"])[0]
    with pytest.raises(ValueError, match="held-out"):
        sample_scene(rng, shape=shape, texture=detail)
    assert sample_scene(rng, shape=shape, texture=detail, allow_held_out=True).texture == detail


def test_captions_round_trip():
    rng = scene_rng("captions", 0)
    for scene in (sample_scene(rng, allow_held_out=True) for _ in range(200)):
        read = parse_caption(full_caption(scene))
        assert read == {k: scene.value(k) for k in ATTRIBUTES}
    assert caption("arrow", color="orange") == "an orange arrow"
    assert theme_caption("background_shape", "star", "red") == "a star on a red background"
    assert parse_caption("a star on a red background") == {"shape": "star", "background": "red"}


def test_pixel_statistics_read_every_render():
    """The judge's colour read-out is exact on renders (the CNN is checked by the build test)."""
    rng = scene_rng("pixels", 0)
    scenes = [sample_scene(rng, allow_held_out=True) for _ in range(400)]
    for scene in scenes:
        image = render(scene)
        assert pixel_background(image) == scene.background
        assert pixel_color(image) == scene.color, scene
    smeared = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)  # grey is no palette colour
    assert pixel_background(smeared) == "?"


def test_mini_cobsat_follows_the_benchmark_rule():
    plist = prompts_list()
    for task_id, task in MINI_TASKS.items():
        for shot in (2, 4):
            x_idxs, theta_idxs = plist[7]
            prompt = build_prompt(task_id, shot, 7, x_idxs, theta_idxs)
            assert prompt.theta == task.theta_items[theta_idxs[shot + 1]]
            assert prompt.x_items == tuple(task.x_items[x_idxs[i]] for i in range(shot + 1))
            scenes = prompt.context_scenes
            assert len(scenes) == shot
            for x, scene in zip(prompt.x_items, scenes):
                assert scene.value(task.x_category) == x
                assert scene.value(task.theta_category) == prompt.theta
            assert prompt.target[task.x_category] == prompt.x_items[-1]
            items = prompt.items()
            assert (
                items[1] == f"Word 1: {prompt.x_items[0]}, "
                and items[-1] == f"\n\nWord {shot + 1}: {prompt.x_items[-1]}, "
            )
            assert sum(not isinstance(i, str) for i in items) == shot
    # Color-I and Background-I share their words: only the images differ.
    a, b = build_prompt(1, 2, 0, *plist[0]), build_prompt(3, 2, 0, *plist[0])
    assert a.x_items == b.x_items and a.theta == b.theta
    assert a.context_scenes[0].color == a.x_items[0] and b.context_scenes[0].background == b.x_items[0]
    assert len(list(build_prompts([1, 2], [2, 4], range(3)))) == 12
    assert cell_scene("color_shape", "red", "star") == cell_scene("color_shape", "red", "star")


def test_paired_test_counts_discordant_prompts():
    from thinkdiff.miniworld.stats import cell, paired_test

    a = [True] * 30 + [False] * 10
    b = [False] * 25 + [True] * 5 + [False] * 10
    test = paired_test(a, b)
    assert (test.a_only, test.b_only) == (25, 0) and test.p_value < 1e-6
    assert paired_test(a, a).p_value == 1.0
    c = cell(a)
    assert (c.correct, c.n) == (30, 40) and c.interval[0] < 0.75 < c.interval[1]

"""A pool of rendered training scenes shared by the component trainers (rendered once per build)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thinkdiff.miniworld.world import IMAGE_SIZE, Scene, canonical, render, sample_scene, scene_rng

__all__ = ["ScenePool", "render_pool"]


@dataclass
class ScenePool:
    """Scenes, their uint8 renders [N, H, W, 3] and the decoder's canonical renders of them."""

    scenes: list[Scene]
    images: np.ndarray
    canonical_images: np.ndarray

    def __len__(self) -> int:
        return len(self.scenes)

    def subset(self, n: int) -> ScenePool:
        return ScenePool(self.scenes[:n], self.images[:n], self.canonical_images[:n])


def render_pool(n: int, seed: int, *, allow_held_out: bool = False, progress: bool = True) -> ScenePool:
    """Render ``n`` random scenes (outside the held-out cells unless ``allow_held_out``)."""
    from tqdm.auto import tqdm

    rng = scene_rng("pool", seed, allow_held_out)
    scenes = [sample_scene(rng, allow_held_out=allow_held_out) for _ in range(n)]
    shape = (n, IMAGE_SIZE, IMAGE_SIZE, 3)
    images, canonical_images = np.empty(shape, np.uint8), np.empty(shape, np.uint8)
    for i, scene in enumerate(tqdm(scenes, desc="render", disable=not progress, dynamic_ncols=True)):
        images[i] = render(scene)
        canonical_images[i] = render(canonical(scene), noise=False)
    return ScenePool(scenes, images, canonical_images)

"""Mini-CoBSAT: the CoBSAT benchmark's task structure, rendered from the miniature world.

The same definitions as the benchmark (:mod:`thinkdiff.evaluation.cobsat.protocol`), with the
world's three themes in place of CoBSAT's five: for each theme a ``-I`` task (the words name the
detail, the latent shape is shown only by the images) and a ``-II`` task (the words name shapes,
the latent detail is shown only by the images). Prompts come from the benchmark's own 1000-prompt
list (seed 123, :func:`~thinkdiff.evaluation.cobsat.protocol.prompts_list`) and are built by the
same rule: ``theta = theta_space[theta_idxs[k + 1]]``, words ``x_space[x_idxs[i]]`` for
``i = 0..k``, images of ``(x_i, theta)`` for ``i < k``, target ``(x_k, theta)``.

Like CoBSAT's 100 images per theme, every theme has one fixed image per (detail, shape) cell: its
other attributes (position, size, the attributes the theme does not ask about, specks, noise) are
drawn once from the cell's name. ``Color-I`` and ``Background-I`` both give colour words: only the
images tell whether the words describe the object or the background.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from thinkdiff.evaluation.cobsat.protocol import (
    COBSAT_INSTRUCTION,
    NUM_PROMPTS,
    PROMPT_SEED,
    CobsatTask,
    prompts_list,
)
from thinkdiff.miniworld.world import (
    ATTRIBUTES,
    HELD_OUT,
    THEMES,
    Scene,
    render,
    sample_scene,
    scene_rng,
    theme_caption,
    to_pil,
)

__all__ = [
    "MINI_TASKS",
    "SHOTS",
    "TASK_COLUMN_ORDER",
    "MiniPrompt",
    "MiniTask",
    "build_prompt",
    "build_prompts",
    "cell_scene",
    "write_dataset",
]

SHOTS: tuple[int, ...] = (2, 4)
"""The shot settings reported (the papers' 2 and 4)."""


MiniTask = CobsatTask
"""A mini-CoBSAT task is the benchmark's own task type with the world's vocabulary
(:data:`~thinkdiff.miniworld.world.ATTRIBUTES`): one task type for both."""


def _task(task_id: int, name: str, theme: str, x: str, theta: str) -> CobsatTask:
    return CobsatTask(task_id, name, theme, x, theta, vocabulary=MappingProxyType(ATTRIBUTES))


MINI_TASKS: dict[int, MiniTask] = {
    t.task_id: t
    for t in (
        _task(1, "Color-I", "color_shape", "color", "shape"),
        _task(2, "Color-II", "color_shape", "shape", "color"),
        _task(3, "Background-I", "background_shape", "background", "shape"),
        _task(4, "Background-II", "background_shape", "shape", "background"),
        _task(5, "Texture-I", "texture_shape", "texture", "shape"),
        _task(6, "Texture-II", "texture_shape", "shape", "texture"),
    )
}
"""The six tasks by id (the benchmark's numbering pattern: odd -I, even -II)."""

TASK_COLUMN_ORDER: tuple[int, ...] = (1, 3, 5, 2, 4, 6)
"""Column order as the papers print it: the -I tasks, then the -II tasks."""


@functools.lru_cache(maxsize=512)
def cell_scene(theme: str, detail: str, shape: str) -> Scene:
    """The one fixed image of a theme's (detail, shape) cell (held-out cells included)."""
    if theme not in THEMES:
        raise ValueError(f"unknown theme {theme!r}; choose one of {', '.join(THEMES)}")
    rng = scene_rng("mini-cobsat", theme, detail, shape)
    return sample_scene(rng, shape=shape, **{theme.split("_")[0]: detail}, allow_held_out=True)


@dataclass(frozen=True)
class MiniPrompt:
    """One k-shot query of one task."""

    task_id: int
    shot: int
    index: int
    """Position in the 1000-prompt list."""
    x_items: tuple[str, ...]
    """The k + 1 words."""
    theta: str

    @property
    def task(self) -> MiniTask:
        return MINI_TASKS[self.task_id]

    def _cell(self, x: str) -> tuple[str, str]:
        """(detail, shape) of the image for word ``x``."""
        return (x, self.theta) if self.task.x_category != "shape" else (self.theta, x)

    @property
    def context_scenes(self) -> tuple[Scene, ...]:
        return tuple(cell_scene(self.task.theme, *self._cell(x)) for x in self.x_items[: self.shot])

    @property
    def target_detail(self) -> str:
        return self._cell(self.x_items[-1])[0]

    @property
    def target_shape(self) -> str:
        return self._cell(self.x_items[-1])[1]

    @property
    def target(self) -> dict[str, str]:
        """What the output must show: ``{"shape": ..., detail_category: ...}``."""
        return {"shape": self.target_shape, self.task.detail_category: self.target_detail}

    @property
    def target_caption(self) -> str:
        """The ideal text answer, e.g. ``a red star``."""
        return theme_caption(self.task.theme, self.target_shape, self.target_detail)

    @property
    def held_out_target(self) -> bool:
        """The target is a held-out cell: no component trained on this combination."""
        return (self.target_detail, self.target_shape) in HELD_OUT[self.task.theme]

    def context_images(self) -> list[np.ndarray]:
        """uint8 [H, W, 3] renders of the k context images."""
        return [render(s) for s in self.context_scenes]

    def items(self, instruction: str | None = COBSAT_INSTRUCTION) -> list:
        """ThinkDiff's interleaved input: instruction, ``"Word 1: red, "``, image, ``"\\n\\nWord 2: ..."``.

        The same layout as :meth:`thinkdiff.evaluation.cobsat.protocol.CobsatPrompt.thinkdiff_items`,
        with PIL images.
        """
        from thinkdiff.data.task_prompts import interleaved_items

        return interleaved_items(self.x_items, [to_pil(im) for im in self.context_images()], instruction)

    @property
    def stem(self) -> str:
        """File stem in the benchmark's pattern: ``{index}_{theta}_{x_0}_..._{x_k}``."""
        return f"{self.index}_{self.theta}_{'_'.join(self.x_items)}"


def build_prompt(task_id: int, shot: int, index: int, x_idxs: list[int], theta_idxs: list[int]) -> MiniPrompt:
    """The ``shot``-shot prompt of one pair of permutations, by the benchmark's rule."""
    if task_id not in MINI_TASKS:
        raise ValueError(f"task_id={task_id} is not a mini-CoBSAT task (1..{len(MINI_TASKS)})")
    if not 1 <= shot <= 8:
        raise ValueError(f"shot={shot} is outside 1..8 (theta is read at position shot + 1 of 10)")
    task = MINI_TASKS[task_id]
    theta = task.theta_items[theta_idxs[shot + 1]]
    x_items = tuple(task.x_items[x_idxs[i]] for i in range(shot + 1))
    return MiniPrompt(task_id=task_id, shot=shot, index=index, x_items=x_items, theta=theta)


def build_prompts(
    task_ids: Iterable[int], shots: Iterable[int], indices: Iterable[int], seed: int = PROMPT_SEED
) -> Iterator[MiniPrompt]:
    """Prompts for tasks x shots x prompt indices (0..999), in (shot, task, index) order."""
    indices = list(indices)
    if indices and (min(indices) < 0 or max(indices) >= NUM_PROMPTS):
        raise ValueError(f"prompt indices must lie in 0..{NUM_PROMPTS - 1}")
    plist = prompts_list(seed)
    for shot in shots:
        for task_id in task_ids:
            for i in indices:
                yield build_prompt(task_id, shot, i, *plist[i])


def write_dataset(folder: Path) -> Path:
    """Write the 300 cell images in CoBSAT's layout: ``{detail}_{shape}/{detail_item}_{shape_item}.png``."""
    folder = Path(folder)
    for theme in THEMES:
        detail = theme.split("_")[0]
        for d in ATTRIBUTES[detail]:
            for s in ATTRIBUTES["shape"]:
                path = folder / f"{detail}_{s}" / f"{d}_{s}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                to_pil(render(cell_scene(theme, d, s))).save(path)
    return folder

"""The CoBSAT benchmark's protocol as data and pure functions (no torch, no I/O).

Everything here follows ``shared/reference/cobsat.md`` to the letter: the vocabulary and its order
(the judge answers with option numbers, so order is part of the protocol), the ten tasks, the
1000-prompt list regenerated from seed 123, how a k-shot prompt is built from a pair of
permutations, the two judge questions character for character, and the reply-parsing rule.

Words come in two spellings: the *item* (as in the dataset's file names, e.g. ``3d``, ``park``) and
the *shown* word (what any text shows, e.g. ``wireframe``, ``amusement park``). File names and the
CLIP metric's bare word lists use items; text items and judge options use shown words.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from thinkdiff.pipelines.constants import DEFAULT_INSTRUCTION

__all__ = [
    "COBSAT_INSTRUCTION",
    "ITEMS",
    "NUM_PROMPTS",
    "PROMPT_SEED",
    "SHOWN_AS",
    "TASKS",
    "TASK_COLUMN_ORDER",
    "THEMES",
    "CobsatPrompt",
    "CobsatTask",
    "build_prompt",
    "build_prompts",
    "judge_questions",
    "parse_answer",
    "prompts_list",
    "shown",
]

# Option order matters: the judge answers "(3)" for the third word of these lists.
ITEMS: dict[str, tuple[str, ...]] = {
    "color": ("yellow", "white", "red", "purple", "pink", "orange", "green", "brown", "blue", "black"),
    "object": ("leaf", "hat", "cup", "chair", "car", "box", "book", "ball", "bag", "apple"),
    "animal": ("zebra", "tiger", "sheep", "pig", "monkey", "lion", "dog", "cow", "cat", "bird"),
    "style": (
        "watercolor",
        "sketch",
        "pixel",
        "origami",
        "lego",
        "icon",
        "graffiti",
        "futuristic",
        "3d",
        "old",
    ),
    "action": ("swim", "sleep", "sing", "run", "read", "fly", "eat", "drink", "cry", "angry"),
    "background": (
        "beach",
        "desert",
        "glacier",
        "volcano",
        "park",
        "gym",
        "waterfall",
        "space",
        "cave",
        "seafloor",
    ),
    "texture": (
        "wood",
        "wicker",
        "sequined",
        "plastic",
        "paper",
        "metal",
        "leather",
        "lace",
        "denim",
        "ceramic",
    ),
}
"""The vocabulary in the benchmark's order, spelled as in the dataset's file names."""

SHOWN_AS: dict[str, str] = {"3d": "wireframe", "park": "amusement park"}
"""Items whose text form differs from their file-name form."""

THEMES: tuple[str, ...] = (
    "color_object",
    "background_animal",
    "style_object",
    "action_animal",
    "texture_object",
)
"""The five ``{detail}_{object}`` themes; each has 10 x 10 = 100 images."""

PROMPT_SEED = 123
"""Seed of the prompt list, and the per-sample seed of generation (reseeded for every sample)."""

NUM_PROMPTS = 1000
"""Prompts per task and shot in a full run."""

COBSAT_INSTRUCTION = DEFAULT_INSTRUCTION
"""ThinkDiff's instruction prompt for CoBSAT (paper appendix B and the released code, with its
closing blank line); the pipeline's :data:`~thinkdiff.pipelines.constants.DEFAULT_INSTRUCTION`."""

_QUESTION_END = ". Answer the number only and do not include any other texts (e.g., 1)."


def shown(item: str) -> str:
    """The text form of a vocabulary item (``3d`` -> ``wireframe``, ``park`` -> ``amusement park``)."""
    return SHOWN_AS.get(item, item)


@dataclass(frozen=True)
class CobsatTask:
    """One of the ten tasks: ``x`` is given as text, ``theta`` is shown only in the images."""

    task_id: int
    """1..10, the benchmark's numbering."""
    name: str
    """Column name in the papers, e.g. ``Color-I``."""
    theme: str
    """``{detail}_{object}`` theme, e.g. ``color_object``; names the image folders."""
    x_category: str
    """Category of the word given as text, e.g. ``color`` for Color-I."""
    theta_category: str
    """Category of the latent attribute shown only by the images."""
    vocabulary: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType(ITEMS), compare=False, hash=False, repr=False
    )
    """Category -> items in option order: the benchmark's :data:`ITEMS`, or another world's (the
    miniature world's mini-CoBSAT tasks are this type with its own vocabulary)."""

    @property
    def detail_category(self) -> str:
        """The non-object category of the theme (``color``, ``background``, ...)."""
        return self.theme.split("_")[0]

    @property
    def obj_category(self) -> str:
        """The object category of the theme (``object`` or ``animal``)."""
        return self.theme.split("_")[1]

    @property
    def short_name(self) -> str:
        """Compact column label, e.g. ``C-I``."""
        head, roman = self.name.split("-")
        return f"{head[0]}-{roman}"

    @property
    def x_items(self) -> tuple[str, ...]:
        """The possible text words (items), in option order."""
        return tuple(self.vocabulary[self.x_category])

    @property
    def theta_items(self) -> tuple[str, ...]:
        """The possible latent attributes (items), in option order."""
        return tuple(self.vocabulary[self.theta_category])


def _task(task_id: int, name: str, theme: str, x: str, theta: str) -> CobsatTask:
    return CobsatTask(task_id=task_id, name=name, theme=theme, x_category=x, theta_category=theta)


TASKS: dict[int, CobsatTask] = {
    t.task_id: t
    for t in (
        _task(1, "Color-I", "color_object", "color", "object"),
        _task(2, "Color-II", "color_object", "object", "color"),
        _task(3, "Background-I", "background_animal", "background", "animal"),
        _task(4, "Background-II", "background_animal", "animal", "background"),
        _task(5, "Style-I", "style_object", "style", "object"),
        _task(6, "Style-II", "style_object", "object", "style"),
        _task(7, "Action-I", "action_animal", "action", "animal"),
        _task(8, "Action-II", "action_animal", "animal", "action"),
        _task(9, "Texture-I", "texture_object", "texture", "object"),
        _task(10, "Texture-II", "texture_object", "object", "texture"),
    )
}
"""The ten tasks by id."""

TASK_COLUMN_ORDER: tuple[int, ...] = (1, 3, 5, 7, 9, 2, 4, 6, 8, 10)
"""The papers' column order: the five -I tasks, then the five -II tasks."""


def prompts_list(seed: int = PROMPT_SEED, num: int = NUM_PROMPTS) -> list[tuple[list[int], list[int]]]:
    """Regenerate the benchmark's prompt list: ``num`` pairs ``(x_list, theta_list)`` of permutations.

    Equal to ``prompts_list_default.json`` for the defaults. A private ``random.Random`` draws the
    same stream as the benchmark's ``random.seed(123)`` without touching global state. The two
    lists are shuffled in place and copied after each step, so each pair continues the last one.
    """
    rng = random.Random(seed)
    x, theta = list(range(10)), list(range(10))
    out = []
    for _ in range(num):
        rng.shuffle(x)
        rng.shuffle(theta)
        out.append((list(x), list(theta)))
    return out


@dataclass(frozen=True)
class CobsatPrompt:
    """One k-shot query of one task, in the benchmark's terms.

    ``text_inputs`` has k + 1 entries (``"red: "``), ``image_inputs`` k dataset-relative paths
    (``"color_car/red_car.jpg"``); the last text has no image and ``(x_items[-1], theta)`` is the
    target the generated image must show.
    """

    task_id: int
    shot: int
    index: int
    """Position in the prompt list (0..999)."""
    x_items: tuple[str, ...]
    """The k + 1 words given as text, as items."""
    theta: str
    """The latent attribute shared by all demonstrations, as an item."""
    text_inputs: tuple[str, ...]
    image_inputs: tuple[str, ...]

    @property
    def task(self) -> CobsatTask:
        return TASKS[self.task_id]

    @property
    def target_detail(self) -> str:
        """The detail item (color, style, ...) the output must show."""
        t = self.task
        return self.x_items[-1] if t.x_category == t.detail_category else self.theta

    @property
    def target_obj(self) -> str:
        """The object or animal item the output must show."""
        t = self.task
        return self.theta if t.x_category == t.detail_category else self.x_items[-1]

    @property
    def true_labels(self) -> dict[str, int]:
        """1-based option numbers of the target for the judge's ``detail`` and ``obj`` questions."""
        t = self.task
        return {
            "detail": ITEMS[t.detail_category].index(self.target_detail) + 1,
            "obj": ITEMS[t.obj_category].index(self.target_obj) + 1,
        }

    @property
    def stem(self) -> str:
        """Output file stem, the benchmark's own: ``{index}_{theta}_{x_0}_..._{x_k}`` (items)."""
        return f"{self.index}_{self.theta}_{'_'.join(self.x_items)}"

    def thinkdiff_items(
        self, dataset_root: str | Path | None = None, instruction: str | None = COBSAT_INSTRUCTION
    ) -> list[str | Path]:
        """The interleaved sequence ThinkDiff's released code gave the LVLM.

        ``[instruction, "Word 1: white, ", img, "\\n\\nWord 2: blue, ", img, "\\n\\nWord 3: red, "]``:
        the instruction (omitted when ``None``) is its own text item, so a chat template
        concatenates it with the first word item as the pipeline sees fit. Images are ``Path``
        objects (joined to ``dataset_root`` when given), texts are ``str``.
        """
        from thinkdiff.pipelines.requests import cobsat_items  # here: the protocol itself needs no PIL

        images = [Path(rel) if dataset_root is None else Path(dataset_root) / rel for rel in self.image_inputs]
        return cobsat_items([shown(x) for x in self.x_items], images, instruction)  # type: ignore[return-value]

    def benchmark_items(self, dataset_root: str | Path | None = None) -> list[str | Path]:
        """The benchmark's own interleaving: ``["red: ", img, "blue: ", img, "green: "]``."""
        items: list[str | Path] = []
        for i, text in enumerate(self.text_inputs):
            items.append(text)
            if i < self.shot:
                rel = Path(self.image_inputs[i])
                items.append(Path(dataset_root) / rel if dataset_root is not None else rel)
        return items

    def to_dict(self) -> dict:
        """A JSON-ready record (what ``thinkdiff eval cobsat prompts`` prints)."""
        t = self.task
        return {
            "task_id": self.task_id,
            "task": t.name,
            "shot": self.shot,
            "index": self.index,
            "stem": self.stem,
            "x_items": list(self.x_items),
            "theta": self.theta,
            "text_inputs": list(self.text_inputs),
            "image_inputs": list(self.image_inputs),
            "target_detail": self.target_detail,
            "target_obj": self.target_obj,
            "true_labels": self.true_labels,
        }


def image_relpath(task: CobsatTask, detail_item: str, obj_item: str) -> str:
    """Dataset-relative image path: ``{detail}_{obj_item}/{detail_item}_{obj_item}.jpg``."""
    return f"{task.detail_category}_{obj_item}/{detail_item}_{obj_item}.jpg"


def _check_shot(shot: int) -> None:
    # theta is read at position shot + 1 of a 10-long permutation, so shot + 1 <= 9.
    if not 1 <= shot <= 8:
        raise ValueError(f"shot={shot} is outside 1..8 (CoBSAT reads theta_list[shot + 1] of 10)")


def build_prompt(
    task_id: int, shot: int, index: int, x_idxs: Sequence[int], theta_idxs: Sequence[int]
) -> CobsatPrompt:
    """Build the ``shot``-shot prompt for one pair of permutations, exactly as the benchmark does.

    theta = theta_space[theta_idxs[shot + 1]]; for i = 0..shot the text is ``f"{shown(x_i)}: "``
    with x_i = x_space[x_idxs[i]]; images i < shot show (x_i, theta); (x_shot, theta) is the target.
    """
    if task_id not in TASKS:
        raise ValueError(f"task_id={task_id} is not a CoBSAT task (1..10)")
    _check_shot(shot)
    task = TASKS[task_id]
    theta = task.theta_items[theta_idxs[shot + 1]]
    x_items = tuple(task.x_items[x_idxs[i]] for i in range(shot + 1))
    texts = tuple(f"{shown(x)}: " for x in x_items)
    images = []
    for x in x_items[:shot]:
        detail, obj = (x, theta) if task.x_category == task.detail_category else (theta, x)
        images.append(image_relpath(task, detail, obj))
    return CobsatPrompt(
        task_id=task_id,
        shot=shot,
        index=index,
        x_items=x_items,
        theta=theta,
        text_inputs=texts,
        image_inputs=tuple(images),
    )


def build_prompts(
    task_ids: Iterable[int], shots: Iterable[int], indices: Iterable[int], seed: int = PROMPT_SEED
) -> Iterator[CobsatPrompt]:
    """All prompts for the given tasks, shots and prompt indices, in (shot, task, index) order."""
    indices = list(indices)
    if indices and (min(indices) < 0 or max(indices) >= NUM_PROMPTS):
        raise ValueError(
            f"prompt indices must lie in 0..{NUM_PROMPTS - 1}, got {min(indices)}..{max(indices)}"
        )
    plist = prompts_list(seed)
    for shot in shots:
        for task_id in task_ids:
            for i in indices:
                x_idxs, theta_idxs = plist[i]
                yield build_prompt(task_id, shot, i, x_idxs, theta_idxs)


def judge_questions(theme: str) -> dict[str, str]:
    """The two judge questions of a theme, character for character.

    Note the double space after "options:" (the base ends in a space and every option starts with
    one) and the period right after the last option.
    """
    if theme not in THEMES:
        raise ValueError(f"theme={theme!r} is not one of {THEMES}")
    detail_cat, obj_cat = theme.split("_")
    questions = {
        "detail": f"What is the {detail_cat} (of the main object) in this image? Answer from the following options: ",
        "obj": "What is the main object in this image? Answer from the following options: ",
    }
    for kind, cat in (("detail", detail_cat), ("obj", obj_cat)):
        questions[kind] += "".join(f" ({i + 1}){shown(w)}" for i, w in enumerate(ITEMS[cat]))
        questions[kind] += _QUESTION_END
    return questions


def parse_answer(reply: str) -> int:
    """The benchmark's parsing rule: concatenate every digit of the reply; valid if 1..10, else -1.

    ``"3"`` -> 3, ``"Answer: 10"`` -> 10, ``"1 and 2"`` -> 12 -> -1, ``"none"`` -> -1. Only ASCII
    digits count (the original's ``str.isdigit`` would crash ``int()`` on e.g. a superscript two).
    """
    digits = "".join(c for c in reply if "0" <= c <= "9")
    if not digits:
        return -1
    value = int(digits)
    return value if 1 <= value <= 10 else -1

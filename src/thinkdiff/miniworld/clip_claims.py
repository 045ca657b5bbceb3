"""The paper's ThinkDiff-CLIP claims as measurements: every task run from several sources of
conditioning (rows) on the same input renders and the same sampling seeds, read by the judge.

Rows (each maps input renders to FLUX conditioning, [L, D] T5-space tokens per image):

- ``ground-truth caption``: T5 states of each input's full caption (the ceiling);
- ``captioning text bridge``: the mini VLM describes each input image (greedy), its answer -> T5
  (the training-free baseline a user would try first);
- ``ThinkDiff-CLIP ...``: the vision tower's pooled tokens through an aligner.

Tasks (``n`` inputs, half from held-out cells; partners drawn from every cell):

- ``preservation``: one image in; success when all four attributes read back equal the input's;
- ``image + text``: the image's conditioning followed by the T5 states of "on a {colour}
  background" with a new background colour; success when the background is the new one and the
  shape, object colour and texture are the input's;
- ``composition``: the conditioning of image A followed by that of image B; success when every
  attribute of the output is A's or B's and at least one comes from each (which of them comes
  from where is left to the decoder: the world has no rule for it).

Outcomes are per input, so rows are compared input by input (:func:`thinkdiff.miniworld.stats.paired_test`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from thinkdiff.miniworld.stats import cell, paired_test
from thinkdiff.miniworld.world import (
    ATTRIBUTES,
    Scene,
    caption,
    full_caption,
    render,
    sample_scene,
    scene_rng,
    to_pil,
)

if TYPE_CHECKING:
    from thinkdiff.miniworld.models import MiniWorld

__all__ = ["CEILING", "TASKS", "TEXT_BRIDGE", "clip_claims", "describe_images"]

CEILING = "ground-truth caption"
TEXT_BRIDGE = "captioning text bridge"
TASKS = ("preservation", "image + text", "composition")

Source = Callable[[Sequence[Scene], np.ndarray], list[torch.Tensor]]
"""Conditioning of each input: (scenes, their renders uint8 [B, H, W, 3]) -> [L, D] per input."""


@torch.no_grad()
def describe_images(world: MiniWorld, images_BHWC: np.ndarray) -> list[str]:
    """The mini VLM's greedy description of each image (the describe prompts in turn)."""
    from thinkdiff.data.extraction import DESCRIPTION_PROMPTS
    from thinkdiff.miniworld.components.vlm import max_answer_tokens
    from thinkdiff.models.lvlm import SamplingSettings

    settings = SamplingSettings(
        max_new_tokens=max_answer_tokens(world.vlm.processor.tokenizer), do_sample=False
    )
    prompts = [
        [to_pil(im), DESCRIPTION_PROMPTS[i % len(DESCRIPTION_PROMPTS)]] for i, im in enumerate(images_BHWC)
    ]
    texts: list[str] = []
    for start in range(0, len(prompts), 64):
        texts += world.vlm.generate(prompts[start : start + 64], settings).texts
    return texts


def ceiling_source(world: MiniWorld) -> Source:
    """T5 states of the ground-truth full captions."""
    return lambda scenes, images: world.text_embeds([full_caption(s) for s in scenes])


def text_bridge_source(world: MiniWorld) -> Source:
    """T5 states of the mini VLM's description of each image (empty answers as a blank)."""
    return lambda scenes, images: world.text_embeds([t or " " for t in describe_images(world, images)])


def aligner_source(world: MiniWorld, aligner: torch.nn.Module) -> Source:
    """ThinkDiff-CLIP: the vision tower's pooled tokens through ``aligner``."""
    from thinkdiff.miniworld.experiments import clip_tokens

    def source(scenes: Sequence[Scene], images: np.ndarray) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(aligner(clip_tokens(world, images)).float())

    return source


def _composed(output: Any, a: Scene, b: Scene) -> bool:
    sources = [
        ({"a"} if output.value(k) == a.value(k) else set())
        | ({"b"} if output.value(k) == b.value(k) else set())
        for k in ATTRIBUTES
    ]
    return all(sources) and any(s == {"a"} for s in sources) and any(s == {"b"} for s in sources)


@torch.no_grad()
def clip_claims(
    world: MiniWorld,
    rows: dict[str, Source],
    n: int,
    seed: int,
    *,
    compare: Sequence[tuple[str, str]] = (),
    **sampling: Any,
) -> dict[str, Any]:
    """Every task of the module docstring for every row: ``{"tasks": {task: {row: {accuracy,
    correct, n, ci95}}}, "paired": {task: {"a vs b": {a_only, b_only, p_value}}},
    "preservation_by_attribute": {row: {attribute: {accuracy, ...}}},
    "preservation_by_attribute_paired": {"a vs b": {attribute: {a_only, b_only, p_value}}},
    "outcomes": {task: {row: [bool per input]}}}``, with a paired test for each pair of row names
    in ``compare``."""
    from thinkdiff.miniworld.experiments import clip_test_scenes

    scenes = clip_test_scenes(n, seed)
    rng = scene_rng("clip-claims-partner", seed)
    partners = [sample_scene(rng, allow_held_out=True) for _ in scenes]
    new_bg = [
        rng.choice([c for c in ATTRIBUTES["background"] if c not in (s.background, s.color)]) for s in scenes
    ]
    images_a = np.stack([render(s) for s in scenes])
    images_b = np.stack([render(s) for s in partners])
    # "on a blue background": the caption's background part alone.
    text_states = world.text_embeds(
        [caption(s.shape, background=b).split(" ", 2)[2] for s, b in zip(scenes, new_bg)]
    )
    seeds = [seed * 10_000 + i for i in range(len(scenes))]
    outcomes: dict[str, dict[str, list[bool]]] = {task: {} for task in TASKS}
    kept: dict[str, dict[str, list[bool]]] = {}  # preservation, row -> attribute -> per input
    for row, source in rows.items():
        cond_a, cond_b = source(scenes, images_a), source(partners, images_b)
        read = world.judge.read(world.images_from_embeds(cond_a, seeds, **sampling))
        outcomes["preservation"][row] = [
            v.matches({k: s.value(k) for k in ATTRIBUTES}) for v, s in zip(read, scenes)
        ]
        kept[row] = {k: [v.value(k) == s.value(k) for v, s in zip(read, scenes)] for k in ATTRIBUTES}
        read = world.judge.read(
            world.images_from_embeds(
                [torch.cat([c, t]) for c, t in zip(cond_a, text_states)], seeds, **sampling
            )
        )
        outcomes["image + text"][row] = [
            v.matches({"shape": s.shape, "color": s.color, "texture": s.texture, "background": b})
            for v, s, b in zip(read, scenes, new_bg)
        ]
        read = world.judge.read(
            world.images_from_embeds([torch.cat([a, b]) for a, b in zip(cond_a, cond_b)], seeds, **sampling)
        )
        outcomes["composition"][row] = [_composed(v, a, b) for v, a, b in zip(read, scenes, partners)]
    paired = {
        task: {
            f"{a} vs {b}": vars(paired_test(outcomes[task][a], outcomes[task][b]))
            for a, b in compare
            if a in rows and b in rows
        }
        for task in TASKS
    }
    pairs = [(a, b) for a, b in compare if a in rows and b in rows]
    return {
        "tasks": {
            task: {row: cell(o).to_dict() for row, o in by_row.items()} for task, by_row in outcomes.items()
        },
        "paired": paired,
        # "All four" hides a lever that moves one attribute: preservation per attribute, paired too.
        "preservation_by_attribute": {
            row: {k: cell(o).to_dict() for k, o in by_attribute.items()} for row, by_attribute in kept.items()
        },
        "preservation_by_attribute_paired": {
            f"{a} vs {b}": {k: vars(paired_test(kept[a][k], kept[b][k])) for k in ATTRIBUTES}
            for a, b in pairs
        },
        "outcomes": outcomes,
    }

"""Examples the page loads in one click: mini-CoBSAT prompts rendered by the miniature world, and
ThinkDiff-CLIP's one image in, one image out."""

import random
from pathlib import Path
from typing import Any


def mini_cobsat_example(
    folder: Path, task: str = "Color-II", shot: int = 2, index: int | None = None
) -> dict[str, Any]:
    """A mini-CoBSAT prompt as editor rows: ``{"items": [str | Path], "target": {...},
    "target_caption": str, "caption": str, "seed": int}``; its images are written into ``folder``,
    an existing folder the caller has confined (:meth:`thinkdiff.app.Backend.examples_dir`).

    ``index`` ``None`` draws a prompt at random; the seed is the one the mini-world report uses for it.
    """
    from thinkdiff.evaluation.cobsat.protocol import NUM_PROMPTS, prompts_list
    from thinkdiff.miniworld.experiments import prompt_seed
    from thinkdiff.miniworld.minicobsat import MINI_TASKS, build_prompt

    names = {t.name: t.task_id for t in MINI_TASKS.values()}
    if task not in names:
        raise ValueError(f"unknown example task {task!r}; choose one of {', '.join(names)}")
    if index is None:
        index = random.randrange(NUM_PROMPTS)
    prompt = build_prompt(names[task], int(shot), int(index), *prompts_list()[int(index)])
    items: list[str | Path] = []
    for n, item in enumerate(prompt.items(instruction=None)):
        if isinstance(item, str):
            items.append(item)
        else:
            path = folder / f"{prompt.stem}-{n}.png"
            if not path.is_file():
                item.save(path)
            items.append(path)
    return {
        "items": items,
        "target": prompt.target,
        "target_caption": prompt.target_caption,
        "caption": f"{task}, {shot}-shot, prompt {index}: the answer should show {prompt.target_caption}",
        "seed": prompt_seed(prompt),
    }


CLIP_EXAMPLE_MODEL = "clip-calibrated"
"""The mini world's aligner the ThinkDiff-CLIP example runs with (its folder under ``thinkdiff/``)."""


def clip_example(folder: Path) -> dict[str, Any]:
    """ThinkDiff-CLIP's example (:data:`thinkdiff.miniworld.demo.CLIP_RULE`): one render as the only
    row, the input's four attributes as the target (the judge checks what was kept), ``caption``
    one honest line on what the committed report measured; like :func:`mini_cobsat_example`."""
    from thinkdiff.miniworld.demo import CLIP_SEED, clip_example_scene, clip_measured_line
    from thinkdiff.miniworld.world import ATTRIBUTES, full_caption, render, to_pil

    scene = clip_example_scene()
    path = folder / "clip-example.png"
    if not path.is_file():
        to_pil(render(scene)).save(path)
    measured = clip_measured_line()
    return {
        "items": [path],
        "target": {k: getattr(scene, k) for k in ATTRIBUTES},
        "target_caption": full_caption(scene),
        "caption": "ThinkDiff-CLIP: one image in, an image out (the judge checks which of its four attributes "
        "are kept)" + (f"; {measured}" if measured else ""),
        "seed": CLIP_SEED,
    }


EXAMPLE_TASKS = ("Color-I", "Color-II", "Background-I", "Background-II", "Texture-I", "Texture-II")
"""The mini-CoBSAT tasks the page offers examples of (the six of the world, in the report's order)."""


def example_thumbnails(folder: Path, shot: int = 2) -> list[tuple[str, str, str, int]]:
    """One thumbnail a task (the n-th task's prompt n): its example images side by side, then a
    "?" cell; ``(path, caption, task, index)``, the images written once into ``folder``, an existing
    folder the caller has confined (:meth:`thinkdiff.app.Backend.examples_dir`)."""
    from PIL import Image, ImageDraw

    from thinkdiff.evaluation.cobsat.protocol import prompts_list
    from thinkdiff.miniworld.minicobsat import MINI_TASKS, build_prompt

    ids = {t.name: t.task_id for t in MINI_TASKS.values()}
    out = []
    for index, task in enumerate(EXAMPLE_TASKS):
        prompt = build_prompt(ids[task], shot, index, *prompts_list()[index])
        path = folder / f"thumbnail-{task}-{shot}-{index}.png"
        if not path.is_file():
            images = [
                Image.fromarray(a) if not isinstance(a, Image.Image) else a for a in prompt.context_images()
            ]
            side = images[0].height
            sheet = Image.new("RGB", (side * (len(images) + 1), side), (255, 255, 255))
            for n, image in enumerate(images):
                sheet.paste(image.convert("RGB"), (n * side, 0))
            ImageDraw.Draw(sheet).text((len(images) * side + side // 3, side // 3), "?", fill=(0, 0, 0))
            sheet.resize((sheet.width * 3, sheet.height * 3), Image.NEAREST).save(path)
        caption = f"{task}: {' · '.join(prompt.x_items[: prompt.shot])} → {prompt.x_items[-1]}?"
        out.append((str(path), caption, task, index))
    return out

"""Examples the page loads in one click: mini-CoBSAT prompts rendered by the miniature world."""

import random
from pathlib import Path
from typing import Any


def mini_cobsat_example(
    folder: Path, task: str = "Color-II", shot: int = 2, index: int | None = None
) -> dict[str, Any]:
    """A mini-CoBSAT prompt as editor rows: ``{"items": [str | Path], "target": {...},
    "target_caption": str, "caption": str, "seed": int}``; its images are written into ``folder``.

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
    folder.mkdir(parents=True, exist_ok=True)
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

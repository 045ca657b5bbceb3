"""The miniature world's demo: a grid of mini-CoBSAT prompts in, ThinkDiff's and the text bridge's images out, judged.

Runs from the committed weights in seconds on a CPU, through the project's general inference code
(:class:`~thinkdiff.pipelines.ThinkDiffPipeline`, as ``thinkdiff generate`` runs it): the mini VLM
reads each prompt (words and images) and answers greedily up to its EOS; the calibrated
ThinkDiff-LVLM aligner maps the answer's token features into the mini FLUX's T5 prompt space; the
stock FluxPipeline draws (the settings come from the FLUX folder's ``thinkdiff_decoder.json``); the
judge reads the image. The text bridge (the answer re-encoded by the T5) is drawn beside it.

The prompts are chosen by a fixed rule, not by hand (:data:`GRID_RULE`): the first prompt of each of
the six tasks at two shots, each with the seed the measured report uses for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CLIP_RULE", "GRID_RULE", "DemoRow", "clip_example_scene", "clip_measured_line", "grid_prompts", "run_clip_example",
    "run_demo",
]  # fmt: skip

GRID_SHOT = 2
GRID_INDEX = 0
GRID_RULE = (
    f"prompt {GRID_INDEX} of each of the six mini-CoBSAT tasks at {GRID_SHOT} shots, the report's seeds"
)
"""How the demo's prompts are chosen: a rule, so that nobody picks the pictures."""


@dataclass
class DemoRow:
    """One prompt of the demo: what went in, what came out, what the judge read."""

    prompt: Any
    """The :class:`~thinkdiff.miniworld.minicobsat.MiniPrompt`."""
    answer: str
    """The VLM's answer (greedy, up to its EOS)."""
    image: np.ndarray
    bridge: np.ndarray
    verdict: Any
    bridge_verdict: Any

    @property
    def correct(self) -> bool:
        return self.verdict.matches(self.prompt.target)

    @property
    def bridge_correct(self) -> bool:
        return self.bridge_verdict.matches(self.prompt.target)


def grid_prompts() -> list[tuple[str, int, int]]:
    """``(task, shot, index)`` of the demo's prompts, by :data:`GRID_RULE`."""
    from thinkdiff.miniworld.minicobsat import MINI_TASKS

    return [(t.name, GRID_SHOT, GRID_INDEX) for t in sorted(MINI_TASKS.values(), key=lambda t: t.task_id)]


def run_demo(
    models_dir: Path | None = None,
    out_dir: Path = Path("demo-out"),
    *,
    task: str | None = None,
    shot: int = GRID_SHOT,
    index: int = GRID_INDEX,
    seed: int | None = None,
    figure: Path | None = None,
) -> dict[str, Any]:
    """Generate and judge the grid (or the one prompt ``task``/``shot``/``index``); writes
    ``out_dir/demo.png`` (or ``figure``) and returns what happened: ``rows``, ``path``, ``summary``
    and, for one prompt, ``answer``, ``verdict`` and ``correct``.

    ``models_dir`` defaults to :func:`~thinkdiff.miniworld.models.default_weights_dir`.
    """
    from thinkdiff.evaluation.cobsat.protocol import prompts_list
    from thinkdiff.miniworld.build import DEMO_CALIBRATED, calibrated_dir
    from thinkdiff.miniworld.experiments import prompt_seed
    from thinkdiff.miniworld.minicobsat import MINI_TASKS, build_prompt
    from thinkdiff.miniworld.models import MiniWorld, default_weights_dir
    from thinkdiff.pipelines import Request

    started = time.perf_counter()
    # One thread: the models are too small for a second to help, and on a busy 2-core machine
    # waiting for a descheduled OpenMP thread made this demo ~10x slower (measured 3.6 s on one
    # thread, 31-39 s on two, at a load of 4).
    torch.set_num_threads(1)
    names = {t.name: t.task_id for t in MINI_TASKS.values()}
    if task is not None and task not in names:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(names)}")
    chosen = grid_prompts() if task is None else [(task, shot, index)]
    root = Path(models_dir or default_weights_dir())
    world = MiniWorld(root)
    # The calibrated aligner (the method) when the world has one; else the proxy-only one.
    calibrated = calibrated_dir(root, DEMO_CALIBRATED)
    aligner = str(calibrated) if calibrated.is_dir() else "lvlm"
    pipe = world.thinkdiff_pipeline(aligner)
    rows = []
    for name, k, i in chosen:
        prompt = build_prompt(names[name], k, i, *prompts_list()[i])
        prompt_seed_ = seed if seed is not None else prompt_seed(prompt)
        out = pipe(Request(prompt.items(), seed=prompt_seed_))
        answer = (out.lvlm_texts[0] or "").strip()
        # The bridge stays the world's own text-to-image: the answer's T5 states at its exact
        # length, as the report's text-bridge row measures it (the pipeline's text-bridge mode pads
        # the T5 to the descriptor's max_sequence_length, and would run the VLM a second time).
        with torch.no_grad():
            bridge = world.images_from_text([answer], [prompt_seed_])[0]
        image = np.asarray(out.images[0])
        verdict, bridge_verdict = world.judge.read([image, bridge])
        rows.append(DemoRow(prompt, answer, image, bridge, verdict, bridge_verdict))

    path = Path(figure) if figure is not None else Path(out_dir) / "demo.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    method = Path(aligner).name if aligner != "lvlm" else "lvlm (proxy only)"
    _grid(rows, method, path)
    thinkdiff_ok, bridge_ok = sum(r.correct for r in rows), sum(r.bridge_correct for r in rows)
    what = (
        f"{len(rows)} mini-CoBSAT prompt(s) ({GRID_RULE if task is None else f'{task}, {shot}-shot, prompt {index}'}): "
        f"ThinkDiff-LVLM draws {thinkdiff_ok}/{len(rows)} right, the text bridge {bridge_ok}/{len(rows)}"
    )
    lines = [f"the grid shows {what}" if task is None else what]
    for r in rows:
        p = r.prompt
        words = " ".join(f"[{x}: image]" for x in p.x_items[: p.shot]) + f" [{p.x_items[-1]}: ?]"
        lines.append(
            f"  {p.task.name} {p.shot}-shot prompt {p.index}: {words} -> target {p.target_caption}; "
            f"VLM answer {r.answer!r}; ThinkDiff {'CORRECT' if r.correct else 'WRONG'} "
            f"({_read(r.verdict, p.target)}), text bridge {'CORRECT' if r.bridge_correct else 'WRONG'} "
            f"({_read(r.bridge_verdict, p.target)})"
        )
    lines.append(f"  aligner: {method} (thinkdiff/ of the models folder)")
    lines.append(f"  written to {path} in {time.perf_counter() - started:.1f} s")
    if models_dir is None:
        lines.append(
            _measured_context(shot, f"calibrated {DEMO_CALIBRATED}" if aligner != "lvlm" else "lvlm")
        )
    result: dict[str, Any] = {"rows": rows, "path": path, "summary": "\n".join(x for x in lines if x)}
    if len(rows) == 1:
        result.update(
            answer=rows[0].answer, verdict=rows[0].verdict, correct=rows[0].correct, prompt=rows[0].prompt
        )
    return result


CLIP_SEED = 0
CLIP_RULE = f"the first render of the ThinkDiff-CLIP checks at seed {CLIP_SEED}, a held-out cell"
"""How the ThinkDiff-CLIP example's input is chosen: a rule, so that nobody picks the picture."""


def clip_example_scene() -> Any:
    """The ThinkDiff-CLIP example's input scene, by :data:`CLIP_RULE`."""
    from thinkdiff.miniworld.experiments import clip_test_scenes

    return clip_test_scenes(2, CLIP_SEED)[0]


def clip_measured_line() -> str:
    """One line on what calibrated ThinkDiff-CLIP keeps of an input image, read from the committed
    report (attribute preservation: one render in, each attribute read back; ``""`` without it)."""
    from thinkdiff.miniworld.catalogue import committed_report

    report = committed_report()
    if report is None:
        return ""
    section = report.get("clip_calibrated") or {}
    row = section.get("image")
    if not row:
        return ""
    kept = sorted((k for k in row if k != "all"), key=lambda k: -row[k])
    return (
        f"measured over {section['n']} renders: all four attributes kept {row['all']:.3f}; it keeps mostly "
        f"the {kept[0]} ({row[kept[0]]:.3f}), then " + ", ".join(f"{k} {row[k]:.3f}" for k in kept[1:])
        + " (src/thinkdiff/miniworld/measured/report.md)"
    )


def run_clip_example(models_dir: Path | None = None, out_dir: Path = Path("demo-out")) -> dict[str, Any]:
    """ThinkDiff-CLIP on one image (:data:`CLIP_RULE`): the committed calibrated CLIP aligner through
    the project's pipeline in clip mode, the judge reading the input and the output. Writes
    ``out_dir/clip.png`` (input | output) and returns ``path``, ``verdict``, ``kept`` (attribute ->
    whether the output shows the input's value) and ``summary``."""
    from PIL import Image

    from thinkdiff.miniworld.build import calibrated_dir
    from thinkdiff.miniworld.models import MiniWorld, default_weights_dir
    from thinkdiff.miniworld.world import ATTRIBUTES, render, to_pil
    from thinkdiff.pipelines import Request

    started = time.perf_counter()
    torch.set_num_threads(1)  # see run_demo
    root = Path(models_dir or default_weights_dir())
    world = MiniWorld(root)
    folder = calibrated_dir(root, "clip")
    scene = clip_example_scene()
    image = render(scene)
    out = world.thinkdiff_pipeline(str(folder))(Request([to_pil(image)], seed=CLIP_SEED))
    drawn = np.asarray(out.images[0])
    verdict = world.judge.read([drawn])[0]
    kept = {k: verdict.value(k) == getattr(scene, k) for k in ATTRIBUTES}
    path = Path(out_dir) / "clip.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    pair = np.concatenate([image, drawn], axis=1)
    Image.fromarray(pair).resize((pair.shape[1] * 4, pair.shape[0] * 4), Image.NEAREST).save(path)
    lines = [
        f"ThinkDiff-CLIP ({folder.name}): one image in ({CLIP_RULE}), an image out, no text",
        "  input: " + " ".join(f"{k} {getattr(scene, k)}" for k in ATTRIBUTES)
        + "; the judge reads the output as: "
        + " ".join(f"{k} {verdict.value(k)} ({'kept' if kept[k] else 'lost'})" for k in ATTRIBUTES),
        f"  {clip_measured_line()}" if models_dir is None else "",
        f"  written to {path} (input | output) in {time.perf_counter() - started:.1f} s",
    ]
    return {"path": path, "verdict": verdict, "kept": kept, "summary": "\n".join(x for x in lines if x.strip())}


def _read(verdict: Any, target: dict[str, str]) -> str:
    """What the judge read of the attributes the target names."""
    return " ".join(verdict.value(k) for k in target)


def _measured_context(shot: int, method: str) -> str:
    """One line on how the committed weights score over mini-CoBSAT, read from the committed report."""
    from thinkdiff.miniworld.catalogue import committed_report

    report = committed_report()
    if report is None:
        return ""
    tables = report["lvlm"]["tables"]
    if method not in tables:
        method = "lvlm"
    row = str(shot) if str(shot) in tables[method] else next(iter(tables[method]))
    ours, bridge = (tables[name][row]["average"]["accuracy"] for name in (method, "text bridge"))
    proxy_only = tables["lvlm"][row]["average"]["accuracy"]
    n = tables[method][row]["average"]["n"]
    return (
        f"  measured over all of mini-CoBSAT ({row}-shot, {n} prompts): ThinkDiff-LVLM ({method}) {ours:.3f}, "
        f"text bridge {bridge:.3f}, proxy-only ThinkDiff-LVLM {proxy_only:.3f} "
        "(src/thinkdiff/miniworld/measured/report.md)"
    )


def _grid(rows: list[DemoRow], method: str, path: Path) -> None:
    """One row a prompt: its example images, the query, ThinkDiff's image, the bridge's, judged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = max(r.prompt.shot for r in rows)
    cols = shots + 3
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.75 * cols, 1.75 * len(rows) + 0.6), squeeze=False)
    for axes_row, r in zip(axes, rows, strict=True):
        p = r.prompt
        context = p.context_images()
        for i in range(shots):
            if i < p.shot:
                axes_row[i].imshow(context[i])
                axes_row[i].set_title(f"{p.x_items[i]}", fontsize=7)
        query = axes_row[shots]
        query.text(
            0.5,
            0.5,
            f"{p.task.name}\n{p.x_items[-1]} -> ?\n\ntarget:\n{p.target_caption}\n\nVLM: {r.answer}",
            ha="center",
            va="center",
            fontsize=6,
            wrap=True,
        )
        for ax, im, name, v, ok in (
            (axes_row[-2], r.image, "ThinkDiff", r.verdict, r.correct),
            (axes_row[-1], r.bridge, "text bridge", r.bridge_verdict, r.bridge_correct),
        ):
            ax.imshow(im)
            ax.set_title(f"{name}: {'right' if ok else 'wrong'}\njudge: {_read(v, p.target)}", fontsize=7,
                         color="green" if ok else "firebrick")  # fmt: skip
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"mini world, {GRID_RULE}; ThinkDiff = calibrated aligner {method}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

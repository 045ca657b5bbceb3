"""The miniature world's demo: one mini-CoBSAT prompt in, the generated image out, judged.

Runs from the committed weights in a few seconds on a CPU, through the project's general inference
code (:class:`~thinkdiff.pipelines.ThinkDiffPipeline`, as ``thinkdiff generate`` runs it): the mini
VLM reads the prompt (words and images) and answers greedily up to its EOS; ThinkDiff-LVLM's
aligner maps the answer's token features into the mini FLUX's T5 prompt space; the stock
FluxPipeline draws (the settings come from the FLUX folder's ``thinkdiff_decoder.json``); the judge
reads the image. The text bridge (the answer re-encoded by the T5) is drawn beside it for comparison.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["run_demo"]


def run_demo(
    models_dir: Path | None = None,
    out_dir: Path = Path("demo-out"),
    *,
    task: str = "Color-II",
    shot: int = 2,
    index: int = 0,
    seed: int | None = None,
) -> dict[str, Any]:
    """Generate and judge one prompt; writes ``out_dir/demo.png`` and returns what happened.

    ``models_dir`` defaults to :func:`~thinkdiff.miniworld.models.default_weights_dir`.
    """
    from thinkdiff.evaluation.cobsat.protocol import prompts_list
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
    if task not in names:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(names)}")
    root = Path(models_dir or default_weights_dir())
    world = MiniWorld(root)
    prompt = build_prompt(names[task], shot, index, *prompts_list()[index])
    # Greedy, EOS-terminated answers, as the aligner was trained (see the README's divergences).
    # The calibrated aligner (issue 17) when the world has one; else the proxy-only one.
    from thinkdiff.miniworld.build import DEMO_CALIBRATED, calibrated_dir

    calibrated = calibrated_dir(root, DEMO_CALIBRATED)
    aligner = str(calibrated) if calibrated.is_dir() else "lvlm"
    pipe = world.thinkdiff_pipeline(aligner)
    seeds = [seed if seed is not None else prompt_seed(prompt)]
    out = pipe(Request(prompt.items(), seed=seeds[0]))
    image = np.asarray(out.images[0])
    answer = (out.lvlm_texts[0] or "").strip()
    # The bridge stays the world's own text-to-image: the answer's T5 states at its exact length, as
    # the report's text-bridge row measures it. The pipeline's text-bridge mode pads the T5 to the
    # descriptor's max_sequence_length (16), the other layout the mini FLUX was trained on, and
    # would run the VLM a second time.
    with torch.no_grad():
        bridge = world.images_from_text([answer], seeds)[0]
    verdict, bridge_verdict = world.judge.read([image, bridge])
    ok = verdict.matches(prompt.target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo.png"
    _panel(prompt, answer, image, bridge, verdict, bridge_verdict, path)
    words = " ".join(f"[{x}: image]" for x in prompt.x_items[: prompt.shot]) + f" [{prompt.x_items[-1]}: ?]"
    summary = (
        f"{task}, {shot}-shot, prompt {index}: {words}\n"
        f"  target: {prompt.target_caption}\n"
        f"  VLM answer: {answer!r}\n"
        f"  aligner: {Path(aligner).name if aligner != 'lvlm' else 'lvlm'} (thinkdiff/ of the models folder)\n"
        f"  ThinkDiff-LVLM image, judged: {verdict.to_dict()} -> {'CORRECT' if ok else 'WRONG'}\n"
        f"  text-bridge image, judged: {bridge_verdict.to_dict()}\n"
        f"  written to {path} in {time.perf_counter() - started:.1f} s"
    )
    if models_dir is None:
        summary += _measured_context(shot, f"calibrated {DEMO_CALIBRATED}" if aligner != "lvlm" else "lvlm")
    return {
        "prompt": prompt,
        "answer": answer,
        "verdict": verdict,
        "correct": ok,
        "path": path,
        "summary": summary,
    }


def _measured_context(shot: int, method: str = "lvlm") -> str:
    """One line on how the committed weights score over mini-CoBSAT, read from the committed report."""
    import json

    path = Path(__file__).resolve().parent / "measured" / "report.json"
    if not path.is_file():
        return ""
    tables = json.loads(path.read_text())["lvlm"]["tables"]
    if method not in tables:
        method = "lvlm"
    row = str(shot) if str(shot) in tables[method] else next(iter(tables[method]))
    lvlm, bridge = (tables[name][row]["average"]["accuracy"] for name in (method, "text bridge"))
    proxy_only = tables["lvlm"][row]["average"]["accuracy"]
    return (
        f"\n  measured over mini-CoBSAT ({row}-shot): ThinkDiff-LVLM ({method}) {lvlm:.3f}, text bridge "
        f"{bridge:.3f}, proxy-only ThinkDiff-LVLM {proxy_only:.3f} (src/thinkdiff/miniworld/measured/report.md)"
    )


def _panel(prompt, answer, image, bridge, verdict, bridge_verdict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    context = prompt.context_images()
    cols = prompt.shot + 2
    fig, axes = plt.subplots(1, cols, figsize=(2.2 * cols, 2.9))
    for i in range(prompt.shot):
        axes[i].imshow(context[i])
        axes[i].set_title(f"Word {i + 1}: {prompt.x_items[i]}", fontsize=8)
    for ax, im, name, v in (
        (axes[-2], image, "ThinkDiff-LVLM", verdict),
        (axes[-1], bridge, "text bridge", bridge_verdict),
    ):
        ax.imshow(im)
        mark = "correct" if v.matches(prompt.target) else "wrong"
        read = " ".join(v.value(k) for k in prompt.target)
        ax.set_title(f"{name}\njudge: {read} ({mark})", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(
        f"{prompt.task.name}: Word {prompt.shot + 1}: {prompt.x_items[-1]} -> ?   target: {prompt.target_caption}   "
        f"VLM: {answer!r}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

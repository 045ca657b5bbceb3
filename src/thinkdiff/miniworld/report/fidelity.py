"""Fidelity of each component: how well each one does its own job, the ceiling of everything downstream.

The judge on fresh renders; caption reconstruction by the mini T5; the decoder's images from
ground-truth captions; the VLM's captions of single images; a linear probe of the vision encoder's
tokens. (The VLM's text answers on mini-CoBSAT, the reasoning ceiling, come from the LVLM section.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from thinkdiff.miniworld.report.common import SectionContext, pct
from thinkdiff.miniworld.stats import cell
from thinkdiff.miniworld.world import (
    ATTRIBUTES,
    HELD_OUT,
    THEMES,
    full_caption,
    parse_caption,
    render,
    sample_scene,
    scene_rng,
    theme_caption,
    to_pil,
)

__all__ = ["fidelity_markdown", "measure_fidelity", "run_fidelity"]


def run_fidelity(ctx: SectionContext) -> dict[str, Any]:
    """The fidelity section: ``{"fidelity": ...}``."""
    return {"fidelity": measure_fidelity(ctx.world, ctx.config.fidelity_n, ctx.config.sampling)}


def measure_fidelity(world, n: int, sampling: dict[str, Any]) -> dict[str, Any]:
    """Each component on ``n`` samples (see the module docstring)."""
    from thinkdiff.miniworld.components.t5 import reconstruction_accuracy
    from thinkdiff.miniworld.judge import attribute_accuracy, held_out_scenes, judge_accuracy
    from thinkdiff.models.lvlm import SamplingSettings

    out: dict[str, Any] = {}
    rng = scene_rng("report-fidelity", 0)
    fresh = [sample_scene(rng, allow_held_out=True) for _ in range(max(n, 1000))]
    held = held_out_scenes(n, 99)
    out["judge"] = {
        "fresh_renders": judge_accuracy(world.judge, fresh),
        "held_out_cells": judge_accuracy(world.judge, held),
    }

    from transformers import T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration.from_pretrained(world.root / "t5").eval()
    out["t5_reconstruction"] = {
        "full_captions": reconstruction_accuracy(
            t5, world.t5_tokenizer, [full_caption(s) for s in fresh[:n]]
        ),
        "full_captions_held_out_cells": reconstruction_accuracy(
            t5, world.t5_tokenizer, [full_caption(s) for s in held]
        ),
        "theme_captions": reconstruction_accuracy(
            t5,
            world.t5_tokenizer,
            [
                theme_caption(THEMES[i % 3], s.shape, s.value(THEMES[i % 3].split("_")[0]))
                for i, s in enumerate(fresh[:n])
            ],
        ),
        "n": n,
    }

    # The decoder from ground-truth captions: every cell of every theme, twice.
    decoder: dict[str, Any] = {}
    for theme in THEMES:
        detail = theme.split("_")[0]
        cells = [(d, s) for d in ATTRIBUTES[detail] for s in ATTRIBUTES["shape"]]
        texts = [theme_caption(theme, s, d) for d, s in cells] * 2
        seeds = list(range(len(texts)))
        images = world.images_from_text(texts, seeds, **sampling)
        verdicts = world.judge.read(images)
        targets = [{"shape": s, detail: d} for d, s in cells] * 2
        ok = [v.matches(t) for v, t in zip(verdicts, targets)]
        held_mask = [(d, s) in HELD_OUT[theme] for d, s in cells] * 2
        decoder[theme] = {
            "all_cells": cell(ok).to_dict(),
            "held_out_cells": cell([o for o, h in zip(ok, held_mask) if h]).to_dict(),
            "shape": float(np.mean([v.shape == t["shape"] for v, t in zip(verdicts, targets)])),
            detail: float(np.mean([v.value(detail) == t[detail] for v, t in zip(verdicts, targets)])),
        }
    texts = [full_caption(s) for s in fresh[:n]]
    verdicts = world.judge.read(world.images_from_text(texts, list(range(n)), **sampling))
    decoder["full_caption"] = attribute_accuracy(verdicts, fresh[:n])
    out["decoder"] = decoder

    # The VLM describing single images (greedy), held-out cells half of them.
    from thinkdiff.data.extraction import DESCRIPTION_PROMPTS
    from thinkdiff.miniworld.components.vlm import max_answer_tokens

    scenes = held[: n // 2] + fresh[: n - n // 2]
    prompts = [
        [to_pil(render(s)), DESCRIPTION_PROMPTS[i % len(DESCRIPTION_PROMPTS)]] for i, s in enumerate(scenes)
    ]
    sampling_vlm = SamplingSettings(
        max_new_tokens=max_answer_tokens(world.vlm.processor.tokenizer), do_sample=False
    )
    texts = []
    for start in range(0, len(prompts), 64):
        texts += world.vlm.generate(prompts[start : start + 64], sampling_vlm).texts
    parsed = [parse_caption(t) for t in texts]
    out["vlm_describe"] = {
        k: float(np.mean([p.get(k) == s.value(k) for p, s in zip(parsed, scenes)])) for k in ATTRIBUTES
    }
    out["vlm_describe"]["all"] = float(
        np.mean([all(p.get(k) == s.value(k) for k in ATTRIBUTES) for p, s in zip(parsed, scenes)])
    )
    out["vlm_describe"]["n"] = len(scenes)

    from thinkdiff.miniworld.components.vision import probe_accuracy
    from thinkdiff.miniworld.pool import render_pool

    train = render_pool(5 * n, 1234, progress=False)
    test = render_pool(2 * n, 4321, allow_held_out=True, progress=False)
    out["vision_probe"] = probe_accuracy(world.root / "vision", train, test)
    return out


def fidelity_markdown(report: dict[str, Any]) -> list[str]:
    """The fidelity table."""
    f = report["fidelity"]
    lines = [
        "## Fidelity of each component",
        "",
        "| component | measurement | value |",
        "|---|---|---|",
    ]
    j = f["judge"]
    for key in ("fresh_renders", "held_out_cells"):
        lines.append(
            f"| judge | {key.replace('_', ' ')} (n={j[key]['n']}): shape / colour / background / texture / all | "
            + " / ".join(pct(j[key][k]) for k in ("shape", "color", "background", "texture", "all"))
            + " |"
        )
    t = f["t5_reconstruction"]
    lines.append(
        f"| mini T5 | exact caption reconstruction (n={t['n']}): full / full, held-out cells / theme captions | "
        f"{pct(t['full_captions'])} / {pct(t['full_captions_held_out_cells'])} / {pct(t['theme_captions'])} |"
    )
    for theme in THEMES:
        d = f["decoder"][theme]
        lines.append(
            f"| mini FLUX | {theme} from the ground-truth caption, all 100 cells x 2 seeds / held-out cells | "
            f"{pct(d['all_cells']['accuracy'])} / {pct(d['held_out_cells']['accuracy'])} |"
        )
    fc = f["decoder"]["full_caption"]
    lines.append(
        "| mini FLUX | full caption: shape / colour / background / texture / all | "
        + " / ".join(pct(fc[k]) for k in ("shape", "color", "background", "texture", "all"))
        + " |"
    )
    vd = f["vlm_describe"]
    lines.append(
        f"| mini VLM | describe one image (n={vd['n']}, half held-out cells): shape / colour / background / texture / all | "
        + " / ".join(pct(vd[k]) for k in ("shape", "color", "background", "texture", "all"))
        + " |"
    )
    for shot, row in f.get("vlm_cobsat_text", {}).items():
        lines.append(
            f"| mini VLM | mini-CoBSAT text answers, {shot}-shot average (the reasoning ceiling) | {pct(row['average']['accuracy'])} |"
        )
    vp = f["vision_probe"]
    lines.append(
        "| mini EVA ViT | linear probe on pooled tokens: shape / colour / background / texture | "
        + " / ".join(pct(vp[k]) for k in ("shape", "color", "background", "texture"))
        + " |"
    )
    return lines

"""Calibration, the decoder in the loop: what each calibrated aligner cost in the build, and its table."""

from __future__ import annotations

from typing import Any

from thinkdiff.miniworld.build import CALIBRATION_RUNS
from thinkdiff.miniworld.premise import TRANSFER_CALIBRATED, TRANSFER_CEILING, TRANSFER_SOURCES
from thinkdiff.miniworld.report.common import pct
from thinkdiff.miniworld.world import ATTRIBUTES

__all__ = ["calibration_cost", "calibration_markdown"]


def calibration_cost(build_record: dict[str, Any]) -> dict[str, Any]:
    """Wall seconds of the calibration stage per step of the build, and its budgets."""
    config = build_record["config"]
    return {
        "seconds": build_record.get("calibration_seconds", {}),
        "steps": config.get("calib_steps"),
        "lever_steps": config.get("calib_lever_steps", config.get("calib_steps")),
        "batch": config.get("calib_batch"),
        "clip_steps": config.get("clip_calib_steps"),
        "clip_noise": config.get("clip_calib_noise", config.get("calib_noise")),
        "prompts": config.get("calib_prompts"),
        "proxy_weight": config.get("calib_proxy_weight"),
        "noise": config.get("calib_noise"),
    }


def calibration_markdown(report: dict[str, Any]) -> list[str]:
    """The calibrated aligners beside the proxy-only ones, the premise and CLIP after calibration, the cost."""
    cost = report.get("calibration_cost", {})
    if not cost.get("seconds"):
        return []
    tables = report["lvlm"]["tables"]
    shots = report["config"]["shots"]
    lines = [
        "",
        "## Calibration: the decoder in the loop",
        "",
        "Each calibrated aligner starts from a proxy-trained one and trains with batch "
        f"{cost['batch']} on {cost['prompts']} task-format prompts built from training cells only (2 and 4 "
        "shots, fresh renders; the VLM answers greedily, `extract-features --task-shots 2 4 --greedy`). "
        f"Default recipe: velocity distillation + {cost['proxy_weight']} x the no-split proxy loss, noisy "
        f"inputs '{cost['noise']}'"
        + (" (here: the target image's latents, noised)" if cost["noise"] == "auto" else "")
        + f", {cost['steps']} steps. Every lever tried is a row, trained for "
        f"{cost['lever_steps']} steps beside the default recipe at that budget ('lever budget'); "
        "mini-CoBSAT average, n per cell below:",
        "",
        "| aligner | data | start | loss | noise | steps | "
        + " | ".join(f"{k}-shot" for k in shots)
        + " | wall s |",
        "|---|---|---|---|---|---|" + "---|" * len(shots) + "---|",
    ]
    for proxy_only in ("lvlm", "no split", "input tokens"):
        if proxy_only in tables:
            accs = " | ".join(pct(tables[proxy_only][str(k)]["average"]["accuracy"]) for k in shots)
            lines.append(f"| {proxy_only} (proxy only) | describe | - | proxy | - | 0 | {accs} | - |")
    for name, (start, lever, overrides) in CALIBRATION_RUNS.items():
        key = f"calibrated {name}"
        if key not in tables:
            continue
        loss = overrides.get("calibration_loss", "distill")
        weight = overrides.get("proxy_weight", cost["proxy_weight"])
        loss_text = loss + (f" + {weight} x proxy" if weight else "")
        accs = " | ".join(pct(tables[key][str(k)]["average"]["accuracy"]) for k in shots)
        secs = cost["seconds"].get(f"calibrate {name}", "-")
        noise = overrides.get("noise_source", cost["noise"])
        noise = {"regress": "-", "flow": "target image"}.get(
            loss, "target image" if noise in ("auto", "source") else noise
        )
        steps = cost["lever_steps"] if lever else cost["steps"]
        lines.append(f"| {key} | task format | {start} | {loss_text} | {noise} | {steps} | {accs} | {secs} |")
    if "text bridge" in tables:
        accs = " | ".join(pct(tables["text bridge"][str(k)]["average"]["accuracy"]) for k in shots)
        lines.append(f"| text bridge (reference) | - | - | - | - | - | {accs} | - |")
    rows = report["premise"]["rows"]
    calibrated = rows.get(TRANSFER_CALIBRATED.format(source=TRANSFER_SOURCES[0]))
    if calibrated is not None:
        ceiling = rows[TRANSFER_CEILING]["all"]
        ratio = f"{calibrated['all'] / ceiling:.2f}" if ceiling else "-"  # a quick world's ceiling can be 0
        lines += [
            "",
            f"Premise test after calibration ({calibrated['calibration_steps']} steps, "
            f"{calibrated['calibration_seconds']} s): FLUX draws {pct(calibrated['all'])} of the held-out captions "
            f"fully right from the calibrated aligner's features (ceiling {pct(ceiling)}: ratio "
            f"{ratio}; target 0.9), and the proxy decoder still writes "
            f"{pct(calibrated['proxy_exact'])} of them exactly.",
        ]
    if "clip_calibrated" in report:
        before, after = report["clip"], report["clip_calibrated"]
        lines += [
            "",
            f"ThinkDiff-CLIP after calibration ({cost['clip_steps']} steps, '{cost['clip_noise']}' noise; "
            f"n = {after['n']}): attribute "
            f"preservation (all four) {pct(after['image']['all'])} (proxy only {pct(before['image']['all'])}); "
            "per attribute "
            + " / ".join(pct(after["image"][k]) for k in ATTRIBUTES)
            + "; image + text all three "
            f"{pct(after['image_text']['all'])} (proxy only {pct(before['image_text']['all'])}); composed "
            f"{pct(after['composition']['composed'])} (proxy only {pct(before['composition']['composed'])}).",
        ]
    secs = cost["seconds"]
    lines += [
        "",
        "Cost of the stage (wall seconds on this machine, two runs at a time): "
        + ", ".join(f"{k} {v}" for k, v in secs.items())
        + ".",
    ]
    return lines

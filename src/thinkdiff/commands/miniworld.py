"""``thinkdiff miniworld build|report|demo``: the miniature world, trained and measured on a CPU."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "miniworld",
        help="train a miniature world from scratch and measure ThinkDiff's claims in it",
        description=(
            "A miniature world in which every component (T5, FLUX.1 transformer, Qwen2-VL, EVA ViT) is "
            "the real architecture at a tiny size, trained from scratch on CPU, and ThinkDiff runs "
            "through the project's own extraction, training and inference code."
        ),
    )
    sub = parser.add_subparsers(dest="miniworld_command", metavar="STEP", required=True)

    b = sub.add_parser(
        "build",
        help="train every component (1940 s on an idle 2-core CPU before the vision encoder's steps doubled; --quick: 22 s)",
    )
    b.add_argument("out_dir", type=Path, help="models folder to write")
    b.add_argument("--seed", type=int, default=0, help="seed of everything (scenes, inits, data order)")
    b.add_argument("--quick", action="store_true", help="a reduced world: every step, a few dozen iterations")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2)")
    b.add_argument(
        "--only-calibration",
        action="store_true",
        help="run only the calibration steps (the decoder in the loop) on top of the models already in OUT_DIR, e.g. "
        "the committed weights; the other components are kept as they are",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=run_build)

    r = sub.add_parser(
        "report",
        help="measure components and claims; write Markdown, JSON and PNGs",
        description=(
            "Measure every section of the report. report.json is written as each section finishes; "
            "rerunning the same command into the same folder resumes at the unfinished sections "
            "(other settings are refused)."
        ),
    )
    r.add_argument("models_dir", type=Path, help="a folder written by `thinkdiff miniworld build`")
    r.add_argument("out_dir", type=Path, help="report folder to write")
    r.add_argument(
        "--quick",
        action="store_true",
        help="small counts for a --quick world: every section runs (the test suite's report); the "
        "options below override them",
    )
    r.add_argument(
        "--num-prompts", type=int, help="first N prompts per task and shot (max 1000; default 100)"
    )
    r.add_argument("--shots", type=int, nargs="+", help="shot settings (default: 2 4)")
    r.add_argument("--steps", type=int, help="Euler steps of the mini FLUX sampler (default 20)")
    r.add_argument("--cfg", type=float, help="true classifier-free guidance scale (default 3.0)")
    r.add_argument("--fidelity-n", type=int, help="samples per fidelity measurement (default 300)")
    r.add_argument("--clip-n", type=int, help="renders for the ThinkDiff-CLIP checks (default 200)")
    r.add_argument("--no-retrain", action="store_true", help="skip training the ablation aligners")
    r.add_argument(
        "--transfer-steps", type=int, help="training steps of each premise-test aligner (default 400)"
    )
    r.add_argument("--transfer-n", type=int, help="held-out captions of the premise test (default 200)")
    r.add_argument(
        "--transfer-train", type=int, help="captions the premise test's aligners learn from (default 3000)"
    )
    r.add_argument(
        "--transfer-calibration-steps",
        type=int,
        help="calibration steps of the premise test's T5-states aligner (0: none; default 600)",
    )
    r.add_argument("--no-qcd", action="store_true", help="skip the query-contrastive baseline's rows")
    r.add_argument(
        "--redo",
        nargs="+",
        default=(),
        metavar="SECTION",
        help="measure these sections of the report in OUT_DIR again (e.g. clip after retraining the "
        "vision tower); allowed even if the models' build.json changed, which the report then records",
    )
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=run_report)

    d = sub.add_parser(
        "demo",
        help="a grid of mini-CoBSAT prompts in (a fixed rule), ThinkDiff's and the text bridge's images out, judged",
    )
    d.add_argument("--models", type=Path, default=None, help="models folder (default: the committed weights)")
    d.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for demo.png")
    d.add_argument("--task", help="one prompt of this mini-CoBSAT task (e.g. Color-I) instead of the grid")
    d.add_argument("--shot", type=int, default=2, help="number of example images")
    d.add_argument("--index", type=int, default=0, help="prompt index in the 1000-prompt list")
    d.set_defaults(func=run_demo)


def run_build(args: argparse.Namespace) -> int:
    from thinkdiff.miniworld.build import build, full_config, quick_config

    config = quick_config(args.seed) if args.quick else full_config(args.seed)
    if args.threads is not None:
        config.threads = args.threads
    if args.only_calibration:
        import json

        from thinkdiff.miniworld.build import BuildConfig, build_calibration

        record_file = args.out_dir / "build.json"
        if not record_file.is_file():
            raise FileNotFoundError(f"{args.out_dir} holds no build.json: build the world first")
        # The world's own budgets and seed; the calibration budgets of this preset.
        built = BuildConfig(**json.loads(record_file.read_text())["config"])
        calib = {k: v for k, v in dataclasses.asdict(config).items() if k.startswith(("calib", "clip_calib"))}
        config = dataclasses.replace(built, threads=config.threads, **calib)
        record = build_calibration(args.out_dir, config, progress=not args.no_progress)
        for name, seconds in record["calibration_seconds"].items():
            print(f"{name:28s} {seconds:8.1f} s")
        return 0
    record = build(args.out_dir, config, progress=not args.no_progress)
    for name, seconds in record["seconds"].items():
        print(f"{name:16s} {seconds:8.1f} s")
    judge = record["results"]["judge_fresh_renders"]
    print(
        f"judge on fresh renders: shape {judge['shape']:.3f} texture {judge['texture']:.3f} all {judge['all']:.3f}"
    )
    return 0


def run_report(args: argparse.Namespace) -> int:
    from thinkdiff.miniworld.report import ReportConfig, quick_report_config, write_report

    config = quick_report_config() if args.quick else ReportConfig()
    given = {
        name: getattr(args, name)
        for name in ("num_prompts", "steps", "cfg", "fidelity_n", "clip_n", "transfer_steps", "transfer_n",
                     "transfer_train", "transfer_calibration_steps")
        if getattr(args, name) is not None
    }  # fmt: skip
    if args.shots is not None:
        given["shots"] = tuple(args.shots)
    if args.no_retrain:
        given["retrain"] = False
    config = dataclasses.replace(
        config, **given, qcd=not args.no_qcd, threads=args.threads, progress=not args.no_progress
    )
    if not 1 <= config.num_prompts <= 1000:
        raise ValueError(f"--num-prompts must be in 1..1000, got {config.num_prompts}")
    report = write_report(args.models_dir, args.out_dir, config, redo=args.redo)
    from thinkdiff.miniworld.premise import TRANSFER_CEILING, TRANSFER_SOURCES

    rows = report["premise"]["rows"]
    print(
        f"premise: FLUX from proxy-aligned T5 states {rows[TRANSFER_SOURCES[0]]['all']:.3f} "
        f"vs from the states {rows[TRANSFER_CEILING]['all']:.3f}"
    )
    for c in report["claims"]:
        print(f"{c['verdict']:14s} {c['claim']}: {c['accuracy_a']:.3f} vs {c['accuracy_b']:.3f}")
    print(f"report: {args.out_dir / 'report.md'}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from thinkdiff.miniworld.demo import run_demo as demo

    result = demo(args.models, args.out, task=args.task, shot=args.shot, index=args.index)
    print(result["summary"])
    return 0

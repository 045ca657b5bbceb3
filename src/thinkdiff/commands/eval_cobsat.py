"""``thinkdiff eval cobsat ...``: the CoBSAT benchmark (prompts, generation, judging, results).

Subcommands (``thinkdiff eval cobsat SUBCOMMAND --help`` for each):

- ``prompts``: print or export the built k-shot prompts as JSONL.
- ``check-dataset``: check an unpacked ``datasets/`` folder or ``datasets.zip``.
- ``generate``: generate images with one of our inference modes, from a published row's settings
  (``--preset release|tbdn``) or the protocol's.
- ``score``: judge a folder of images from any system that follows the file-name scheme, then
  write the results.
- ``report``: rebuild the results from the judge logs (e.g. after several GPUs judged shards).
- ``compare``: put several runs' results side by side (ablations, text-bridge vs lvlm), each
  published row with the settings that produced it and where a run's differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinkdiff.limits import seed_argument

if TYPE_CHECKING:
    from thinkdiff.evaluation.cobsat import CobsatResults, ImageGenerator

DEFAULT_SHOTS = [2, 4]


def register(subparsers: argparse._SubParsersAction) -> None:
    from thinkdiff.commands.generate import add_qcd_and_hint

    # ``eval`` is a group so other benchmarks can join it as ``thinkdiff eval NAME``.
    eval_parser = subparsers.add_parser(
        "eval", help="run a benchmark", description="Run a benchmark. See `thinkdiff eval cobsat --help`."
    )
    eval_parser.set_defaults(func=lambda args: _print_help(eval_parser))
    benchmarks = eval_parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    cobsat = benchmarks.add_parser(
        "cobsat",
        help="CoBSAT in-context text-to-image benchmark",
        description=__doc__.split("\n\n", 1)[1].replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cobsat.set_defaults(func=lambda args: _print_help(cobsat))
    sub = cobsat.add_subparsers(dest="cobsat_command", metavar="SUBCOMMAND")

    p = sub.add_parser(
        "prompts", help="print/export the built prompts as JSONL", description=run_prompts.__doc__
    )
    _add_selection(p)
    p.add_argument(
        "--dataset", type=Path, help="dataset folder or zip: checked, and image paths made absolute"
    )
    p.add_argument(
        "--format",
        choices=["benchmark", "thinkdiff"],
        default="benchmark",
        help="benchmark: the record with text_inputs/image_inputs; thinkdiff: a `thinkdiff generate` job, "
        "the interleaved sequence ThinkDiff's LVLM gets (instruction + 'Word i: x, ' items) with the "
        "record as its meta",
    )
    p.add_argument("--out", type=Path, help="write JSONL here instead of stdout")
    p.set_defaults(func=run_prompts)

    p = sub.add_parser("check-dataset", help="check the 500 images", description=run_check_dataset.__doc__)
    p.add_argument("dataset", type=Path, help="unpacked datasets/ folder (or its parent) or datasets.zip")
    p.set_defaults(func=run_check_dataset)

    from thinkdiff.evaluation.cobsat.presets import PRESETS

    p = sub.add_parser(
        "generate",
        help="generate images with a ThinkDiff mode",
        description=run_generate.__doc__,
        epilog="presets (published configurations; flags given beside one override it, and the "
        "override is recorded):\n"
        + "\n".join(f"  {name}: {preset.summary}" for name, preset in PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_selection(p)
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="start from a published row's settings (see below; default: the protocol's, mode required)",
    )
    p.add_argument("--mode", choices=["lvlm", "clip", "text-bridge"], help="inference mode (or from --preset)")
    p.add_argument("--model", type=Path, help="trained ThinkDiff model folder (not needed for text-bridge)")
    p.add_argument("--decoder", help="FLUX folder or hub id (default: the model folder's decoder)")
    p.add_argument("--lvlm", help="LVLM for text-bridge without --model (default Qwen/Qwen2-VL-7B-Instruct)")
    p.add_argument("--steps", type=int, help="denoising steps (protocol and presets: 28)")
    p.add_argument("--guidance", type=float, help="FLUX guidance (protocol and presets: 3.5)")
    p.add_argument("--size", type=int, help="image side in pixels (protocol, release: 512; tbdn: 256)")
    p.add_argument(
        "--num-tokens", type=int, help="LVLM tokens: lvlm exactly N, text-bridge at most N (default 128)"
    )
    p.add_argument(
        "--greedy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode the LVLM greedily (default: sample; tbdn: greedy)",
    )
    p.add_argument("--temperature", type=float, help="LVLM sampling temperature (release: 0.6)")
    p.add_argument("--top-p", type=float, help="LVLM nucleus sampling mass (release: 0.9)")
    p.add_argument("--dataset", type=Path, help="dataset folder or datasets.zip (required unless --dry-run)")
    p.add_argument("--out", type=Path, help="images folder shot_{k}/task_{id}/... (required unless --dry-run)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generator call")
    p.add_argument("--seed", type=seed_argument, help="seed, reset for every sample (protocol: 123)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    add_qcd_and_hint(p)
    p.set_defaults(qcd_alpha=None)  # None: not given, so a preset's weight stands
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved settings as one JSON object and exit (loads no model)",
    )
    p.set_defaults(func=run_generate)

    p = sub.add_parser(
        "score", help="judge a folder of images and write results", description=run_score.__doc__
    )
    _add_selection(p)
    _add_judge_args(p)
    p.add_argument("--images", type=Path, required=True, help="images folder following the file-name scheme")
    p.add_argument("--dataset", type=Path, help="dataset folder or zip (optional: only checked)")
    p.add_argument("--out", type=Path, help="results folder (default: IMAGES/eval-JUDGE)")
    p.add_argument("--shard", help="name of this process's judge log (default: built from the selection)")
    p.add_argument("--label", default="this run", help="row label of this run in the tables")
    p.add_argument("--no-report", action="store_true", help="judge only (e.g. one shard of several)")
    p.set_defaults(func=run_score)

    p = sub.add_parser("report", help="rebuild results from judge logs", description=run_report.__doc__)
    _add_selection(p)
    p.add_argument("--results", type=Path, required=True, help="results folder holding judgements/")
    p.add_argument("--images", type=Path, help="images folder (to tell missing images from unjudged ones)")
    p.add_argument("--judge", help="judge name or slug, when several judged into this folder")
    p.add_argument("--label", default="this run", help="row label of this run in the tables")
    p.set_defaults(func=run_report)

    from thinkdiff.commands import ablation

    ablation.add_parser(sub)

    p = sub.add_parser("compare", help="side-by-side table of several runs", description=run_compare.__doc__)
    p.add_argument("results", type=Path, nargs="+", help="cobsat-results.json files")
    p.add_argument("--labels", nargs="+", help="row labels, one per file (default: each run's label)")
    p.add_argument("--out", type=Path, required=True, help="folder for cobsat-compare.{md,csv,json,png}")
    p.add_argument("--no-published", action="store_true", help="leave out the published rows")
    p.set_defaults(func=run_compare)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks", nargs="+", default=None, help="task ids 1..10 or names like Color-I (default: all)"
    )
    p.add_argument("--shots", type=int, nargs="+", default=None, help="shots (default: 2 4)")
    p.add_argument(
        "--num-prompts", type=int, default=None, help="first N of the 1000 prompts (default: 1000)"
    )
    p.add_argument("--prompt-range", help="prompt indices START:STOP, e.g. 0:500 (for sharding)")


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    from thinkdiff.evaluation.cobsat.judge import DEFAULT_CLIP, DEFAULT_JUDGE

    p.add_argument(
        "--judge", default=DEFAULT_JUDGE, help=f"judge hub id or folder (default: {DEFAULT_JUDGE})"
    )
    p.add_argument(
        "--judge-kind",
        choices=["llava", "chat-vlm", "qwen2-vl"],
        help="llava (the benchmark's) or chat-vlm/qwen2-vl (default: from the folder's config, else llava)",
    )
    p.add_argument("--no-judge", action="store_true", help="skip the VLM judge (e.g. only --clip)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per judge call")
    p.add_argument("--max-new-tokens", type=int, default=512, help="judge reply limit (protocol: 512)")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], help="default: fp16 on GPU, fp32 on CPU"
    )
    p.add_argument(
        "--clip",
        nargs="?",
        const=DEFAULT_CLIP,
        help=f"also run the secondary CLIP metric (model id or folder; bare flag: {DEFAULT_CLIP})",
    )


def _selection(args: argparse.Namespace) -> tuple[list[int], list[int], list[int]]:
    """(tasks, shots, prompt indices) from the common options; ValueError on bad values."""
    from thinkdiff.evaluation.cobsat.protocol import NUM_PROMPTS, TASKS

    shots_given = args.shots or DEFAULT_SHOTS
    by_name = {t.name.lower(): t.task_id for t in TASKS.values()}
    tasks: list[int] = []
    for raw in args.tasks or [str(t) for t in TASKS]:
        if raw.isdigit() and int(raw) in TASKS:
            tasks.append(int(raw))
        elif raw.lower() in by_name:
            tasks.append(by_name[raw.lower()])
        else:
            raise ValueError(f"--tasks {raw!r} is not a task id 1..10 or name like Color-I")
    for shot in shots_given:
        if not 1 <= shot <= 8:
            raise ValueError(f"--shots {shot} is outside 1..8")
    if args.prompt_range:
        try:
            start, stop = (int(x) for x in args.prompt_range.split(":"))
        except ValueError:
            raise ValueError(f"--prompt-range {args.prompt_range!r} is not START:STOP") from None
    else:
        start, stop = 0, NUM_PROMPTS if args.num_prompts is None else args.num_prompts
        if args.num_prompts is not None and args.num_prompts < 1:
            raise ValueError(f"--num-prompts {args.num_prompts} must be >= 1")
    if not 0 <= start < stop <= NUM_PROMPTS:
        raise ValueError(f"prompt range {start}:{stop} is not within 0:{NUM_PROMPTS}")
    return list(dict.fromkeys(tasks)), list(dict.fromkeys(shots_given)), list(range(start, stop))


def run_prompts(args: argparse.Namespace) -> int:
    """Print (or write with --out) one JSON line per built prompt, in (shot, task, index) order."""
    from thinkdiff.evaluation.cobsat import CobsatDataset, build_prompts

    tasks, shots, indices = _selection(args)
    root = CobsatDataset.load(args.dataset).root if args.dataset else None
    lines = []
    for p in build_prompts(tasks, shots, indices):
        record = p.to_dict()
        if root is not None:
            record["image_inputs"] = [str(root / rel) for rel in p.image_inputs]
        if args.format == "thinkdiff":
            items = [{"image": str(it)} if isinstance(it, Path) else {"text": it} for it in p.thinkdiff_items(root)]
            record = {"items": items, "meta": record}  # generate refuses keys it does not know
        lines.append(json.dumps(record) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(lines), encoding="utf-8")
    else:
        sys.stdout.writelines(lines)
    return 0


def run_check_dataset(args: argparse.Namespace) -> int:
    """Check that the 500 CoBSAT images are all there; list what is missing otherwise."""
    from thinkdiff.evaluation.cobsat import CobsatDataset

    dataset = CobsatDataset.load(args.dataset)
    print(f"CoBSAT dataset OK: 500 images under {dataset.root}")
    return 0


def resolved_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--preset`` with the flags given beside it (see
    :func:`~thinkdiff.evaluation.cobsat.presets.resolve_settings`), checked; ``ValueError`` names
    the bad flag."""
    from thinkdiff.commands.generate import hint_of
    from thinkdiff.evaluation.cobsat.presets import implied_settings, resolve_settings

    given = {
        "mode": args.mode,
        "lvlm": args.lvlm,
        "decoder": args.decoder,
        "hint": hint_of(args),
        "num_tokens": args.num_tokens,
        "greedy": args.greedy,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "qcd_alpha": args.qcd_alpha,
        "size": args.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
    }
    resolved = resolve_settings(args.preset, given)
    # Without a preset, a model folder's own decoding (thinkdiff.json "inference") comes before the
    # protocol's, as in generate; a preset is a published row's settings and keeps them.
    if args.preset is None and args.model is not None and Path(args.model).is_dir():
        from thinkdiff.models.bundle import load_info

        own = load_info(args.model).inference
        names = ("num_tokens", "stop_at_eos", "greedy", "temperature", "top_p")
        taken = {k: own[k] for k in names if k in own and given.get(k) is None}
        resolved["settings"].update(taken)
        resolved["settings"].update(implied_settings(resolved["settings"]))
        resolved["from_model_folder"] = sorted(taken) or None
    s = resolved["settings"]
    if s["mode"] is None:
        raise ValueError("give --mode or --preset")
    if s["mode"] == "clip" and (s["qcd_alpha"] > 0 or s["hint"] is not None):
        raise ValueError("--qcd-alpha and --hint apply to the LVLM (lvlm and text-bridge modes); clip uses none")
    for flag, name, low in (("--steps", "steps", 1), ("--size", "size", 16), ("--num-tokens", "num_tokens", 1)):
        if s[name] < low:
            raise ValueError(f"{flag} {s[name]} must be >= {low}")
    if s["guidance"] < 0:
        raise ValueError(f"--guidance {s['guidance']} must be >= 0")
    if not s["greedy"] and s["temperature"] <= 0:
        raise ValueError(f"--temperature {s['temperature']} must be > 0 when sampling")
    if not 0 < s["top_p"] <= 1:
        raise ValueError(f"--top-p {s['top_p']} must be in (0, 1]")
    if s["qcd_alpha"] < 0:
        raise ValueError(f"--qcd-alpha {s['qcd_alpha']} must be >= 0")
    return resolved


def _load_generator(args: argparse.Namespace, s: dict[str, Any]) -> ImageGenerator:
    """The ThinkDiff pipeline for the resolved settings ``s``, kept loaded across batches."""
    from thinkdiff.evaluation.cobsat.presets import pooled_of
    from thinkdiff.limits import check_pipeline_bounds
    from thinkdiff.pipelines import InferenceSettings, SeededImageGenerator, ThinkDiffPipeline

    if args.model is None and s["mode"] != "text-bridge":
        raise ValueError(f"--mode {s['mode']} needs --model (a trained ThinkDiff model folder)")
    settings = InferenceSettings(
        instruction=s["instruction"],
        num_tokens=s["num_tokens"],
        stop_at_eos=bool(s["stop_at_eos"]),
        greedy=s["greedy"],
        temperature=s["temperature"],
        top_p=s["top_p"],
        qcd_alpha=s["qcd_alpha"],
        hint=s["hint"],
    )
    # Only LVLM and decoder the user named are passed: otherwise the model folder's (or the paper's).
    pipeline = ThinkDiffPipeline.from_pretrained(
        args.model,
        decoder=args.decoder,
        mode=s["mode"],
        lvlm=args.lvlm,
        device=args.device,
        keep_loaded=True,
        settings=settings,
    )
    check_pipeline_bounds(pipeline, [(s["steps"], "")])  # before any model loads
    s["lvlm"] = None if s["mode"] == "clip" else str(pipeline.source_model)
    s["decoder"] = pipeline.decoder_spec.name
    # What the loaded decoder does with the text (implied_settings knows FLUX.1-dev by name only).
    s["pooled"] = pooled_of(s["mode"]) if "pooled" in pipeline.decoder.empty_roles else None
    s["t5_max_length"] = pipeline.decoder.text_bridge_length() if s["mode"] == "text-bridge" else None
    return SeededImageGenerator(
        pipeline,
        height=s["size"],
        width=s["size"],
        num_inference_steps=s["steps"],
        guidance_scale=s["guidance"],
    )


def run_generate(args: argparse.Namespace) -> int:
    """Generate the selected prompts' images into --out (resumable: existing images are kept).

    Files: OUT/shot_{k}/task_{id}/{index}_{theta}_{x_0}_..._{x_k}.jpg plus a .json sidecar that
    records every setting (preset, overrides). Split work over GPUs with --tasks, --shots and
    --prompt-range; every process may share OUT. --dry-run prints the settings and loads nothing.
    """
    from thinkdiff.evaluation.cobsat import CobsatDataset, generate_cobsat

    tasks, shots, indices = _selection(args)
    resolved = resolved_settings(args)
    if args.dry_run:
        print(json.dumps(resolved))
        return 0
    for flag, value in (("--dataset", args.dataset), ("--out", args.out)):
        if value is None:
            raise ValueError(f"{flag} is required (unless --dry-run)")
    dataset = CobsatDataset.load(args.dataset)
    s = resolved["settings"]
    generator = _load_generator(args, s)
    report = generate_cobsat(
        generator,
        dataset,
        args.out,
        tasks=tasks,
        shots=shots,
        indices=indices,
        seed=s["seed"],
        batch_size=args.batch_size,
        metadata={
            "model": None if args.model is None else str(args.model),
            **s,
            "preset": resolved["preset"],
            "overrides": resolved["overrides"] or None,
            "from_model_folder": resolved.get("from_model_folder"),
        },
    )
    print(
        f"generated {report.written}, kept {report.skipped} existing, of {report.total} ({report.seconds:.0f} s)"
    )
    return 0


def run_score(args: argparse.Namespace) -> int:
    """Judge every selected image in --images (resumable, batched), then write the results.

    Each question and reply goes to OUT/judgements/JUDGE/SHARD.jsonl; results go to
    OUT/cobsat-results.{md,csv,json,png}. A missing image counts as wrong.
    """
    from thinkdiff.evaluation.cobsat import (
        ClipScorer,
        CobsatDataset,
        judge_cobsat,
        judge_slug,
        load_judge,
        load_results,
        write_results,
    )

    tasks, shots, indices = _selection(args)
    if not args.images.is_dir():
        raise FileNotFoundError(f"--images folder not found: {args.images}")
    if args.dataset:
        CobsatDataset.load(args.dataset)
    if args.no_judge and not args.clip:
        raise ValueError("--no-judge needs --clip (nothing to do otherwise)")
    out = args.out or args.images / f"eval-{judge_slug(args.clip if args.no_judge else args.judge)}"
    judge = None
    if not args.no_judge:
        judge = load_judge(
            args.judge,
            kind=args.judge_kind,
            device=args.device,
            dtype=args.dtype,
            max_new_tokens=args.max_new_tokens,
        )
    clip = ClipScorer.from_pretrained(args.clip, device=args.device) if args.clip else None
    report = judge_cobsat(
        judge,
        args.images,
        out,
        tasks=tasks,
        shots=shots,
        indices=indices,
        batch_size=args.batch_size,
        clip=clip,
        shard=args.shard,
    )
    print(
        f"{report.prompts} prompts: {report.missing_images} images missing, {report.asked} questions asked, "
        f"{report.reused} reused, {report.clip_scored} CLIP-scored ({report.seconds:.0f} s)"
    )
    if args.no_report or judge is None:
        return 0
    results = load_results(
        out, args.images, args.label, tasks=tasks, shots=shots, indices=indices, judge_name=judge.info.name
    )
    _print_summary(results, write_results(results, out))
    return 0


def run_report(args: argparse.Namespace) -> int:
    """Merge every judge log under --results into cobsat-results.{md,csv,json,png} there.

    Selection options left out default to the union of what the judging processes covered.
    """
    from thinkdiff.evaluation.cobsat import load_results, write_results

    tasks, shots, indices = _selection(args)
    if not args.results.is_dir():
        raise FileNotFoundError(f"--results folder not found: {args.results}")
    # Options left out default to what the judging processes recorded they covered.
    prompts_given = args.num_prompts is not None or args.prompt_range is not None
    results = load_results(
        args.results,
        args.images,
        args.label,
        tasks=tasks if args.tasks else None,
        shots=shots if args.shots else None,
        indices=indices if prompts_given else None,
        judge_name=args.judge,
    )
    _print_summary(results, write_results(results, args.results))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """Write cobsat-compare.{md,csv,json,png}: several runs' results side by side, each published
    row with the settings that produced it and where each run's settings differ (printed too)."""
    from thinkdiff.evaluation.cobsat import read_compared, settings_lines, write_results

    runs = read_compared(args.results, args.labels)
    paths = write_results(runs, args.out, stem="cobsat-compare", with_published=not args.no_published)
    if not args.no_published:
        for line in settings_lines(runs):
            print(line)
    for path in paths.values():
        print(path)
    return 0


def _print_summary(results: CobsatResults, paths: dict[str, Path]) -> None:
    for shot in results.shots:
        mean, lo, hi, n = results.average(shot)
        print(f"{shot}-shot avg accuracy {mean:.3f} [95% CI {lo:.3f}, {hi:.3f}] over {n} prompts")
    for note in results.notes()[1:]:
        print(f"note: {note}")
    for path in paths.values():
        print(path)

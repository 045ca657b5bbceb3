"""``thinkdiff eval cobsat ablation NAME``: one of the paper's ablations as one command.

Each ablation is a set of variants. For every variant the command trains an aligner (unless its
run folder already holds a finished model), generates the selected CoBSAT images, judges them, and
finally puts all variants side by side with the published rows (``compare``) and draws the
variants' training-loss curves in one plot (the paper's Figure 7 for the norm ablation). Every
stage is the project's own command, so the outputs are the same files those commands write, and a
rerun resumes: finished models, images and judgements are kept.

    OUT/runs/VARIANT/          thinkdiff train run (model/, metrics.jsonl, loss.png, ...)
    OUT/images/VARIANT/        thinkdiff eval cobsat generate
    OUT/results/VARIANT/       thinkdiff eval cobsat score
    OUT/compare/               the side-by-side table, CSV, JSON and bar chart
    OUT/loss-curves.png        training loss of every trained variant
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    """One arm of an ablation: how it is trained (None: not trained, the method's model is used),
    the inference mode, extra ``eval cobsat generate`` flags, and whether it decodes with QCD."""

    name: str
    mode: str = "lvlm"
    train_args: tuple[str, ...] | None = field(default=())
    generate_args: tuple[str, ...] = ()
    qcd: bool | None = None
    """``True``: the ablation's ``--qcd-alpha``; ``False``: none, whatever ``--generate-preset`` says
    (the variant is the arm without QCD); ``None``: not the ablation's subject (the preset's)."""

    def qcd_args(self, alpha: float) -> list[str]:
        """The ``--qcd-alpha`` flag that gives this variant its own QCD weight (given explicitly, so it
        wins over a preset's and is recorded as an override of it)."""
        return [] if self.qcd is None else [f"--qcd-alpha={alpha if self.qcd else 0.0}"]


METHOD = Variant("lvlm")
ABLATIONS: dict[str, tuple[Variant, ...]] = {
    # The paper's Table 3 rows: random masked training vs none; generated vs input-token features.
    "no-split": (METHOD, Variant("no-split", train_args=("--split", "false"))),
    "input-tokens": (METHOD, Variant("input-tokens", train_args=("--features", "prompt"))),
    # Figure 7: the aligner's RMSNorm initialised from T5 (the method), ones, or absent.
    "norm": (
        METHOD,
        Variant("norm-default", train_args=("--aligner-norm", "default")),
        Variant("norm-none", train_args=("--aligner-norm", "none")),
    ),
    # The strongest published baseline: the LVLM writes a prompt, FLUX's own encoders read it.
    "text-bridge": (METHOD, Variant("text-bridge", mode="text-bridge", train_args=None)),
    # The 2026 follow-up's training-free method: the text bridge with a hint and query-contrastive
    # decoding (--qcd-alpha A of this command, 0.5 by default), and ThinkDiff-LVLM with QCD. Each
    # variant states its QCD weight, so a --generate-preset with QCD (tbdn) does not give it to all.
    "qcd": (
        replace(METHOD, qcd=False),
        Variant("text-bridge", mode="text-bridge", train_args=None, qcd=False),
        Variant("text-bridge-hint", mode="text-bridge", train_args=None, generate_args=("--hint",), qcd=False),
        Variant("text-bridge-qcd", mode="text-bridge", train_args=None, qcd=True),
        Variant("text-bridge-hint-qcd", mode="text-bridge", train_args=None, generate_args=("--hint",), qcd=True),
        Variant("lvlm-qcd", train_args=None, qcd=True),
    ),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from thinkdiff.pipelines.constants import DEFAULT_QCD_ALPHA

    p = sub.add_parser(
        "ablation",
        help="train, generate, judge and compare the variants of one ablation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=list(ABLATIONS), help="which ablation")
    p.add_argument(
        "--features", type=Path, required=True, help="feature folder to train on (extract-features)"
    )
    p.add_argument("--val-features", type=Path, help="held-out feature folder (validation loss and samples)")
    p.add_argument("--preset", default="lvlm-qwen2vl-flant5xxl", help="training preset of every variant")
    p.add_argument(
        "--train-args", default="", help="more `thinkdiff train` flags for every variant, one string"
    )
    p.add_argument("--dataset", type=Path, required=True, help="CoBSAT datasets folder or datasets.zip")
    p.add_argument("--out", type=Path, required=True, help="folder of the whole ablation")
    p.add_argument("--tasks", nargs="+", help="task ids or names (default: all)")
    p.add_argument("--shots", nargs="+", help="shots (default: 2 4)")
    p.add_argument("--num-prompts", help="first N prompts per task (default: 1000)")
    p.add_argument("--decoder", help="FLUX folder or hub id (default: each model folder's decoder)")
    p.add_argument(
        "--generate-preset",
        choices=["release", "tbdn"],
        help="published generation settings of every variant (eval cobsat generate --preset)",
    )
    p.add_argument("--steps", help="denoising steps (protocol: 28)")
    p.add_argument("--size", help="image side (protocol: 512)")
    p.add_argument("--judge", help="judge hub id or folder (default: llava-hf/llava-1.5-13b-hf)")
    p.add_argument("--max-new-tokens", help="judge reply limit (protocol: 512)")
    p.add_argument("--device", help="torch device for generation and judging")
    p.add_argument(
        "--qcd-alpha",
        type=float,
        default=DEFAULT_QCD_ALPHA,
        help=f"QCD weight of the qcd ablation's variants (default {DEFAULT_QCD_ALPHA}; images are kept on "
        "a rerun, so another weight needs another --out)",
    )
    p.set_defaults(func=run)


def _pairs(args: argparse.Namespace, *names: str) -> list[str]:
    """``--flag value`` pairs for the options that were given."""
    out: list[str] = []
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is None:
            continue
        out += [f"--{name}", *(value if isinstance(value, list) else [str(value)])]
    return out


def generate_argv(args: argparse.Namespace, variant: Variant, model: Path, images: Path) -> list[str]:
    """The ``eval cobsat generate`` command line of one variant: the ablation's selection and
    generation flags, the preset, then the variant's own flags and QCD weight (which win)."""
    return [
        "eval",
        "cobsat",
        "generate",
        "--mode",
        variant.mode,
        "--model",
        str(model),
        "--dataset",
        str(args.dataset),
        "--out",
        str(images),
        *_pairs(args, "tasks", "shots", "num-prompts"),
        *_pairs(args, "steps", "size", "decoder", "device"),
        *(["--preset", args.generate_preset] if args.generate_preset else []),
        *variant.generate_args,
        *variant.qcd_args(args.qcd_alpha),
    ]


def run(args: argparse.Namespace) -> int:
    from thinkdiff.cli import main

    if not args.features.is_dir():
        raise FileNotFoundError(f"--features folder not found: {args.features}")
    out: Path = args.out
    selection = _pairs(args, "tasks", "shots", "num-prompts")
    variants = ABLATIONS[args.name]

    def call(argv: list[str]) -> None:
        print(f"\n== thinkdiff {' '.join(argv)}", flush=True)
        if main(argv) != 0:
            raise ValueError(f"ablation stage failed: thinkdiff {' '.join(argv)}")

    results = []
    for variant in variants:
        run_dir = out / "runs" / (variant.name if variant.train_args is not None else METHOD.name)
        if variant.train_args is not None and not (run_dir / "model" / "thinkdiff.json").is_file():
            val = ["--val-data", str(args.val_features)] if args.val_features else []
            call(
                [
                    "train",
                    "--preset",
                    args.preset,
                    "--data",
                    str(args.features),
                    *val,
                    "--output-dir",
                    str(run_dir),
                    *shlex.split(args.train_args),
                    *variant.train_args,
                ]
            )
        images = out / "images" / variant.name
        call(generate_argv(args, variant, run_dir / "model", images))
        result_dir = out / "results" / variant.name
        call(
            [
                "eval",
                "cobsat",
                "score",
                "--images",
                str(images),
                "--out",
                str(result_dir),
                "--label",
                variant.name,
                *selection,
                *_pairs(args, "judge", "max-new-tokens", "device"),
            ]
        )
        results.append(result_dir / "cobsat-results.json")
    call(
        [
            "eval",
            "cobsat",
            "compare",
            *map(str, results),
            "--labels",
            *[v.name for v in variants],
            "--out",
            str(out / "compare"),
        ]
    )
    trained = {v.name: out / "runs" / v.name / "metrics.jsonl" for v in variants if v.train_args is not None}
    plot_loss_curves(trained, out / "loss-curves.png", title=f"ablation: {args.name}")
    print(f"\nablation {args.name}: {out / 'compare'} and {out / 'loss-curves.png'}")
    return 0


def plot_loss_curves(metrics: dict[str, Path], path: Path, title: str) -> None:
    """One PNG with the training loss of each run (``metrics.jsonl`` of ``thinkdiff train``)."""
    from thinkdiff.plotting import plot_curves

    curves = {}
    for label, file in metrics.items():
        rows = [json.loads(line) for line in file.read_text().splitlines() if line]
        curves[label] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    plot_curves(curves, path, xlabel="step", ylabel="proxy T5 cross-entropy", title=title)

"""``thinkdiff demo``: the method on the built-in defaults, with no downloads.

Part 1, the miniature world (``thinkdiff miniworld demo``): six mini-CoBSAT prompts (words and
images; prompt 0 of each task at 2 shots, a fixed rule) go through the committed mini VLM, the
calibrated aligner and the stock FluxPipeline with the mini FLUX.1 decoder, and through the text
bridge; a grid shows the inputs, both images and the judge's verdict on each. These models were
trained from scratch on CPU by ``thinkdiff miniworld build``, so the pictures mean something.
``thinkdiff demo --figure docs/figure-miniworld.png`` draws only this grid (the README's figure).

Part 2, the pipeline walk-through on the offline tiny random kit (``tiny:*``), running the
project's own commands one after another, exactly as a user would:

1. draw a small image-caption set (coloured shapes, captions in a folder);
2. ``extract-features``: the LVLM describes each image; its generated-token features are stored;
3. ``train``: the aligner learns against the frozen proxy T5 decoder (decoded samples are shown);
4. ``generate``: interleaved images and words in, an image out through a stock FluxPipeline.

The tiny models are random, so part 2 shows that every stage works, not that pictures are good:
its text is random tokens and its image noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run extract-features, train and generate end to end on the built-in default",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="folder for everything the demo writes"
    )
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument(
        "--figure",
        type=Path,
        help="draw only the mini world's grid, to this PNG (the README's figure), from the committed weights",
    )
    parser.set_defaults(func=run)


def draw_images(folder: Path) -> list[tuple[Path, str]]:
    """Coloured shapes on white, each with a ``.txt`` caption (a folder source)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            image = Image.new("RGB", (64, 64), (255, 255, 255))
            draw = ImageDraw.Draw(image)
            box = (14, 14, 50, 50)
            if shape == "square":
                draw.rectangle(box, fill=rgb)
            elif shape == "circle":
                draw.ellipse(box, fill=rgb)
            else:
                draw.polygon([(32, 12), (52, 52), (12, 52)], fill=rgb)
            path = folder / f"{colour}_{shape}.png"
            image.save(path)
            caption = f"a {colour} {shape} on a white background"
            path.with_suffix(".txt").write_text(caption + "\n")
            written.append((path, caption))
    return written


TINY_KIT_NOTE = (
    "Part 2: the tiny random kit (random weights, no downloads). Its text is random tokens and its "
    "image is noise, as expected: this part shows that every command runs, not that it draws well."
)


def run(args: argparse.Namespace) -> int:
    from thinkdiff.cli import main

    if args.figure is not None:
        from thinkdiff.miniworld.demo import run_demo

        if args.figure.suffix.lower() != ".png":
            raise ValueError(f"--figure {args.figure}: give a .png path")
        print(run_demo(figure=args.figure)["summary"])
        return 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # The tiny kit is built once into the demo folder, so the demo needs nothing else.
    os.environ.setdefault("THINKDIFF_TINY_DIR", str((out / "tiny-models").resolve()))
    timings: dict[str, float] = {}

    def stage(name: str, argv: list[str]) -> None:
        # Each stage is a whole command line that sets up its own logging: pass -v on.
        argv = ["-v", *argv] if getattr(args, "verbose", False) else argv
        print(f"\n== {name}: thinkdiff {shlex.join(argv)}", flush=True)
        start = time.perf_counter()
        if main(argv) != 0:
            raise SystemExit(f"demo stage {name!r} failed")
        timings[name] = time.perf_counter() - start

    from thinkdiff.miniworld.models import default_weights_dir

    if (default_weights_dir() / "build.json").is_file():
        print("Part 1: the method in the miniature world (models trained on a CPU; the grid is demo.png)")
        stage("miniworld", ["miniworld", "demo", "--out", str(out / "miniworld")])
        from thinkdiff.miniworld.demo import run_clip_example

        print("\n== ThinkDiff-CLIP beside it: one image in, an image out", flush=True)
        start = time.perf_counter()
        print(run_clip_example(out_dir=out / "miniworld")["summary"], flush=True)
        timings["clip example"] = time.perf_counter() - start
    else:
        print(
            f"(no miniature-world weights in {default_weights_dir()}: run `thinkdiff miniworld build` for part 1)"
        )

    print(f"\n{TINY_KIT_NOTE}", flush=True)
    images = draw_images(out / "images")
    stage(
        "extract-features",
        [
            "extract-features",
            "--model",
            "tiny:qwen2-vl",
            "--source",
            str(out / "images"),
            "--out",
            str(out / "features"),
            "--max-new-tokens",
            "24",
            "--batch-size",
            "4",
            "--samples-per-shard",
            "6",
            "--no-progress",
        ],
    )
    stage(
        "train",
        [
            "train",
            "--preset",
            "debug-lvlm",
            "--data",
            str(out / "features"),
            "--val-data",
            str(out / "features"),
            "--output-dir",
            str(out / "run"),
            "--max-steps",
            str(args.steps),
            "--resume",
            "never",
        ],
    )
    (red_square, _), (blue_square, _) = images[0], images[len(SHAPES)]
    stage(
        "generate",
        [
            "generate",
            "--model",
            str(out / "run" / "model"),
            "--text",
            "Word 1: red, ",
            "--image",
            str(red_square),
            "--text",
            "\n\nWord 2: blue, ",
            "--image",
            str(blue_square),
            "--text",
            "\n\nWord 3: green, ",
            "--num-tokens",
            "16",
            "--steps",
            "4",
            "--height",
            "64",
            "--width",
            "64",
            "--seed",
            "0",
            "--out",
            str(out / "generated.png"),
        ],
    )

    samples = [json.loads(line) for line in (out / "run" / "samples.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    sidecar = json.loads((out / "generated.json").read_text())
    print("\n== summary")
    print(f"images drawn: {len(images)}; features: {out / 'features'}")
    print(
        f"proxy T5 loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps (curve: {out / 'run' / 'loss.png'})"
    )
    last = samples[-1]
    print(
        f"decoded from aligned features at step {last['step']} (random weights: random tokens): "
        f"{last['decoded']!r} (target {last['target']!r})"
    )
    print(
        f"LVLM text for the generation (random weights: random tokens): "
        f"{sidecar.get('lvlm_text', sidecar.get('lvlm_texts'))!r}"
    )
    print(f"generated image (random weights: noise): {out / 'generated.png'} (+ generated.json)")
    print("stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return 0

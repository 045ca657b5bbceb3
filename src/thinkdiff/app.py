"""``thinkdiff app``: a web page for interleaved images and text (Gradio, ``pip install thinkdiff[app]``).

A thin layer over the same :class:`~thinkdiff.pipelines.ThinkDiffPipeline` that ``thinkdiff
generate`` runs, writing the same outputs through the same writer
(:func:`thinkdiff.pipelines.outputs.write_output`): an image (or video) and its JSON sidecar.

Two parts:

- :class:`Backend`: no Gradio in it. It holds the server's choices of models (the page picks among
  them; it never names a server path itself), checks uploads against the limits, runs one job at a
  time on the device, writes every job into its own folder under ``--out``, and, on the miniature
  world, has the world's judge read every image.
- :func:`build_app`: the page. A sequence editor (image and text rows: add, move, remove; one click
  loads a mini-CoBSAT example), the settings, Generate / Cancel, the outputs (image, the LVLM's
  text, seed, stage timings, peak memory, the judge's reading), the text bridge beside it when
  asked, a history gallery and the PNG + sidecar to download. An API endpoint ``/generate`` takes
  the sequence as JSON plus uploaded images (for ``gradio_client``).

Without ``--model`` the models are the miniature world's committed weights: the app starts offline
on a CPU in seconds. Bad input of any kind is a one-line message in the page; the server keeps
serving and no traceback reaches the client.
"""

import dataclasses
import itertools
import logging
import os
import random
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from thinkdiff.miniworld.models import MiniWorld
    from thinkdiff.pipelines import ThinkDiffPipeline

__all__ = [
    "MAX_ROWS",
    "AppConfig",
    "Backend",
    "Cancelled",
    "GenerateOptions",
    "JobResult",
    "build_app",
    "launch",
]

logger = logging.getLogger(__name__)

MAX_ROWS = 12
"""Rows of the page's sequence editor (images and texts together)."""
MODEL_DEFAULT = "(the model's own)"
"""Decoder choice meaning: the decoder the model folder names."""
CSS = """
#output-image img, #bridge-image img, #history img { image-rendering: pixelated; }
#output-image img, #bridge-image img { width: 100%; height: 100%; object-fit: contain; }
"""
"""The mini world draws 32-pixel images: shown enlarged, pixels kept sharp."""
_IMAGE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


class Cancelled(Exception):
    """The job's owner pressed Cancel; raised at the next point where the job can stop."""


@dataclass
class AppConfig:
    """What the server offers; the page chooses among these and names nothing else.

    ``models`` empty means the miniature world (``miniworld``, default: the committed weights).
    """

    models: list[str] = field(default_factory=list)
    """ThinkDiff model folders or hub ids the page may pick (first: the default)."""
    decoders: list[str] = field(default_factory=list)
    """Extra decoder folders or hub ids the page may pick besides each model's own."""
    lvlm: str | None = None
    """LVLM for lvlm / text-bridge (default: each model's)."""
    vision: str | None = None
    """BLIP-2 vision model for clip mode (default: each model's)."""
    miniworld: Path | None = None
    """The miniature world's folder, used when ``models`` is empty."""
    device: str | None = None
    dtype: str = "auto"
    offload: str = "none"
    quantize: str = "none"
    """Real models: the LVLM's and the decoder transformer's quantization (see ``--quantize``)."""
    transformer_file: str | None = None
    """Real models: a GGUF file for the decoder transformer."""
    keep_loaded: bool = False
    """Real models: keep every stage's weights between jobs (fast, needs memory for all of them)."""
    out_dir: Path = Path("thinkdiff-app-out")
    max_images: int = 8
    """Most images in one sequence."""
    max_upload_mb: float = 20.0
    """Largest uploaded file (the server refuses bigger ones before they arrive)."""
    max_image_pixels: int = 4096 * 4096
    """Largest image (width x height) accepted."""


@dataclass
class GenerateOptions:
    """The page's settings for one job (``None``: the decoder's own default)."""

    model: str | None = None
    """A label of :meth:`Backend.model_choices` (default: the first)."""
    mode: str | None = None
    """lvlm, clip or text-bridge (default: the model's variant)."""
    decoder: str = MODEL_DEFAULT
    seed: int = 0
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    true_cfg: float | None = None
    num_tokens: int | None = None
    """LVLM tokens (default: the server's setting: the mini world's longest answer, else 128)."""
    qcd_alpha: float | None = None
    """lvlm / text-bridge: query-contrastive decoding weight (``None``: off)."""
    hint: bool = False
    """lvlm / text-bridge: append the pipeline's hint sentence to the instruction."""
    text_bridge: bool = False
    """Also run the text bridge on the same inputs and seed."""
    target: dict[str, str] | None = None
    """Mini world: what a loaded example's answer must show (the judge says whether it does)."""


@dataclass
class JobResult:
    """One generated output of a job, as written (``path`` and its ``.json`` sidecar)."""

    mode: str
    path: Path
    sidecar: dict[str, Any]
    verdict: dict[str, str] | None = None
    """Mini world: what the judge reads in the image."""
    correct: bool | None = None
    """Mini world with a known target: whether the judge's reading matches it."""

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_suffix(".json")

    def summary(self) -> dict[str, Any]:
        """What the API returns for this output."""
        return {
            "mode": self.mode,
            "output": self.path.name,
            "seed": self.sidecar["seed"],
            "lvlm_text": self.sidecar["lvlm_text"],
            "timings": self.sidecar["timings"],
            "peak_memory_bytes": self.sidecar.get("peak_memory_bytes", {}),
            "judge": self.verdict,
            "correct": self.correct,
        }


# ---- backend ------------------------------------------------------------------------------------


class Backend:
    """Models, limits, the device lock and the outputs; everything the page does but draw.

    Args:
        config: what the server offers (see :class:`AppConfig`).
    """

    def __init__(self, config: AppConfig) -> None:
        import torch

        self.config = config
        self.out_dir = Path(config.out_dir).resolve()
        _check_out_dir(self.out_dir)
        self.world: MiniWorld | None = None  # the mini world, when it supplies the models
        self._models: dict[str, str] = {}  # label -> folder or hub id
        self._variants: dict[str, str] = {}
        if config.models:
            from thinkdiff.models.bundle import load_info

            for model in config.models:
                self._models[model] = model
                try:
                    self._variants[model] = load_info(model).variant
                except (OSError, ValueError) as error:  # reported in the page when it is picked
                    logger.warning("model %s: %s", model, error)
        else:
            from thinkdiff.miniworld import models as miniworld
            from thinkdiff.models.bundle import load_info

            self.world = miniworld.MiniWorld(Path(config.miniworld or miniworld.default_weights_dir()))

            # Every aligner the world has: the calibrated one the demo draws with first (when the
            # world has it), then lvlm, then the others (clip, other calibrated ones).
            from thinkdiff.miniworld.build import DEMO_CALIBRATED, calibrated_dir

            first = [calibrated_dir(self.world.root, DEMO_CALIBRATED).name, "lvlm"]
            folders = sorted(
                (self.world.root / "thinkdiff").iterdir(),
                key=lambda f: (first.index(f.name) if f.name in first else len(first), f.name),
            )
            for folder in folders:
                if (folder / "thinkdiff.json").is_file():
                    label = f"mini world: {folder.name}"
                    self._models[label] = str(folder)
                    self._variants[label] = load_info(folder).variant
            if not self._models:
                raise FileNotFoundError(f"{self.world.root / 'thinkdiff'} holds no ThinkDiff model folder")
        self._decoders = [MODEL_DEFAULT, *config.decoders]
        self._dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
        self._pipelines: dict[tuple[str, str, str], ThinkDiffPipeline] = {}
        self._device_lock = threading.Lock()
        self._jobs = itertools.count()
        self._base_settings = self.world.inference_settings() if self.world is not None else None

    # ---- choices --------------------------------------------------------------------------------

    def model_choices(self) -> list[str]:
        return list(self._models)

    def decoder_choices(self) -> list[str]:
        return list(self._decoders)

    def mode_choices(self) -> list[str]:
        from thinkdiff.pipelines.constants import MODES

        return list(MODES)

    def variant(self, model: str) -> str | None:
        """The model's own mode (``None`` when its folder could not be read)."""
        return self._variants.get(model)

    def default_num_tokens(self) -> int:
        return (self._base_settings.num_tokens if self._base_settings is not None else None) or 128

    # ---- inputs ---------------------------------------------------------------------------------

    def check_image(self, path: str | os.PathLike, where: str) -> str:
        """Raise ``ValueError`` naming ``where`` unless ``path`` (an upload) is an image within the
        limits; returns the file suffix of its format."""
        from PIL import Image

        path = Path(path)
        limit = self.config.max_upload_mb * 2**20
        if not path.is_file():
            raise ValueError(f"{where}: the upload did not arrive; upload it again")
        if path.stat().st_size > limit:
            raise ValueError(
                f"{where}: {path.stat().st_size / 2**20:.1f} MB, over the {self.config.max_upload_mb:g} MB limit"
            )
        try:
            with Image.open(path) as image:
                pixels = image.width * image.height
                if pixels > self.config.max_image_pixels:
                    raise ValueError(
                        f"{where}: {image.width}x{image.height} pixels, more than the "
                        f"{self.config.max_image_pixels:,} accepted"
                    )
                image.load()  # decodes it all: a truncated file fails here
                return _IMAGE_SUFFIXES.get(image.format or "", ".png")
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
            reason = str(error).replace(str(path), path.name)  # the server's upload folder is no one's business
            raise ValueError(f"{where}: not a readable image ({type(error).__name__}: {reason})") from error

    def example(self, task: str = "Color-II", shot: int = 2, index: int | None = None) -> dict[str, Any]:
        """A mini-CoBSAT prompt as editor rows: ``{"items": [str | Path], "target": {...},
        "target_caption": str, "caption": str, "seed": int}``; the images are written under
        ``out_dir/examples``."""
        from thinkdiff.evaluation.cobsat.protocol import NUM_PROMPTS, prompts_list
        from thinkdiff.miniworld.experiments import prompt_seed
        from thinkdiff.miniworld.minicobsat import MINI_TASKS, build_prompt

        names = {t.name: t.task_id for t in MINI_TASKS.values()}
        if task not in names:
            raise ValueError(f"unknown example task {task!r}; choose one of {', '.join(names)}")
        if index is None:
            index = random.randrange(NUM_PROMPTS)
        prompt = build_prompt(names[task], int(shot), int(index), *prompts_list()[int(index)])
        folder = self.out_dir / "examples"
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

    # ---- generation -----------------------------------------------------------------------------

    def _pipeline(self, model: str, mode: str, decoder: str) -> "ThinkDiffPipeline":
        key = (model, mode, decoder)
        if key in self._pipelines:
            return self._pipelines[key]
        from thinkdiff.pipelines import ThinkDiffPipeline

        folder = self._models[model]
        if self.world is not None:
            if mode == "text-bridge":
                # The bridge reads with the world's VLM, whichever aligner is picked.
                pipe = self.world.thinkdiff_pipeline(folder, mode=mode, lvlm=self.world.root / "vlm", vision=None)
            else:
                pipe = self.world.thinkdiff_pipeline(folder, mode=mode)
        else:
            pipe = ThinkDiffPipeline.from_pretrained(
                folder,
                decoder=None if decoder == MODEL_DEFAULT else decoder,
                mode=mode,
                lvlm=self.config.lvlm if mode != "clip" else None,
                vision=self.config.vision if mode == "clip" else None,
                device=self.config.device,
                dtype=self._dtype,
                offload=self.config.offload,  # type: ignore[arg-type]
                quantize=self.config.quantize,  # type: ignore[arg-type]
                transformer_file=self.config.transformer_file,
                keep_loaded=self.config.keep_loaded,
            )
        self._base_settings = self._base_settings or pipe.settings
        self._pipelines[key] = pipe
        return pipe

    def generate(
        self,
        items: Sequence[str | os.PathLike],
        options: GenerateOptions,
        *,
        cancelled: threading.Event | None = None,
        progress: Callable[[float, str], None] | None = None,
    ) -> list[JobResult]:
        """Run one job: the chosen mode, then the text bridge when asked; one device at a time.

        ``items`` are texts and uploaded image files in order. Raises ``ValueError`` /
        ``FileNotFoundError`` / ``OSError`` with a message for the page, :class:`Cancelled` when
        ``cancelled`` is set before the job ends.
        """
        from thinkdiff.pipelines import Request
        from thinkdiff.pipelines.outputs import write_output

        report = progress or (lambda fraction, text: None)
        cancelled = cancelled or threading.Event()
        # 1. Everything the page sent, checked before any model loads.
        model = options.model or self.model_choices()[0]
        if model not in self._models:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(self._models)}")
        mode = options.mode or self.variant(model) or "text-bridge"
        if mode not in self.mode_choices():
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(self.mode_choices())}")
        variant = self.variant(model)
        if mode != "text-bridge" and variant is not None and variant != mode:
            raise ValueError(
                f"{model} is a ThinkDiff-{variant.upper()} model: mode {mode} needs a {mode} model "
                f"(pick mode {variant} or text-bridge)"
            )
        if options.decoder not in self._decoders:
            raise ValueError(f"unknown decoder {options.decoder!r}; choose one of {', '.join(self._decoders)}")
        if self.world is not None and options.decoder != MODEL_DEFAULT:
            raise ValueError("the miniature world has one decoder: its own")
        texts = [item for item in items if isinstance(item, str)]
        images = [Path(item) for item in items if not isinstance(item, str)]
        if not images and not any(t.strip() for t in texts):
            raise ValueError("the sequence is empty: add an image or a text")
        if len(images) > self.config.max_images:
            raise ValueError(f"{len(images)} images: this server takes at most {self.config.max_images}")
        suffixes = [self.check_image(path, f"image {n + 1} ({path.name})") for n, path in enumerate(images)]
        num_tokens = options.num_tokens or self.default_num_tokens()
        if num_tokens < 1:
            raise ValueError(f"number of tokens must be >= 1, got {num_tokens}")
        for name in ("height", "width", "steps"):
            value = getattr(options, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        modes = [mode, "text-bridge"] if options.text_bridge and mode != "text-bridge" else [mode]

        report(0.0, "waiting for the device")
        with self._device_lock:  # one job at a time per device, whatever the queue does
            if cancelled.is_set():
                raise Cancelled
            # Gradio serves this folder to the job's owner by its path: a random part keeps other
            # clients (who learn the naming from their own jobs) from fetching its uploads.
            job = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._jobs):04d}-{secrets.token_hex(8)}"
            job.mkdir(parents=True, exist_ok=True)
            # The sidecar names the inputs as kept beside it, not the server's upload cache.
            kept = iter([job / f"input-{n + 1}{suffix}" for n, suffix in enumerate(suffixes)])
            sequence: list[str | Path] = []
            for item in items:
                if isinstance(item, str):
                    sequence.append(item)
                else:
                    copy = next(kept)
                    shutil.copyfile(item, copy)
                    sequence.append(copy)
            request = Request(
                items=sequence,
                seed=int(options.seed),
                height=options.height,
                width=options.width,
                num_inference_steps=options.steps,
                guidance_scale=options.guidance,
                true_cfg_scale=options.true_cfg,
                qcd_alpha=options.qcd_alpha or None,
                hint=True if options.hint else None,
            )
            results = []
            for n, run_mode in enumerate(modes):
                if cancelled.is_set():
                    raise Cancelled
                pipe = self._pipeline(model, run_mode, options.decoder)
                if self.world is None:
                    # Real models: only this pipeline's weights on the device (with --keep-loaded
                    # every other cached pipeline would still hold all of its own).
                    for other in self._pipelines.values():
                        if other is not pipe:
                            other.release()
                pipe.settings = dataclasses.replace(pipe.settings, num_tokens=num_tokens)
                stage = "the LVLM reads the sequence" if run_mode != "clip" else "the vision tower reads the images"
                report(n / len(modes), f"{run_mode}: {stage}, then denoising")
                output = pipe(request)
                suffix = ".mp4" if pipe.decoder_spec.kind == "video" else ".png"
                path = job / f"thinkdiff-{run_mode}-{request.seed}{suffix}"
                record = write_output(pipe, request, 0, output, path)
                results.append(self._judged(JobResult(run_mode, path, record), output, options.target))
            report(1.0, "done")
            return results

    def _judged(self, result: JobResult, output: Any, target: dict[str, str] | None) -> JobResult:
        if self.world is None or not output.images:
            return result
        import numpy as np

        verdict = self.world.judge.read([np.asarray(output.images[0])])[0]
        result.verdict = verdict.to_dict()
        result.correct = None if target is None else verdict.matches(target)
        return result


def describe(result: JobResult, target_caption: str | None = None) -> str:
    """Markdown lines for one output: mode, seed, the judge's reading, timings, memory."""
    record = result.sidecar
    lines = [f"**{result.mode}** · seed {record['seed']} · `{result.path.name}`"]
    if result.verdict is not None:
        read = ", ".join(f"{k} {v}" for k, v in result.verdict.items())
        judged = f"judge reads: {read}"
        if result.correct is not None:
            judged += f" → {'CORRECT' if result.correct else 'WRONG'}"
            if target_caption:
                judged += f" (target: {target_caption})"
        lines.append(judged)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in record["timings"].items())
    lines.append(f"stage times: {timings}")
    memory = record.get("peak_memory_bytes")
    if memory:
        lines.append("peak GPU memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items()))
    else:
        import resource  # POSIX only, like the CPU-memory reading it gives

        # ru_maxrss is KiB on Linux, bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        lines.append(f"peak memory: {rss / 2**30:.2f} GiB (the server process, CPU)")
    return "  \n".join(lines)


# ---- the page -----------------------------------------------------------------------------------


def _upload_path(value: Any) -> str | None:
    """The server path of an image slot's upload, as Gradio hands it over unprocessed.

    Events reading the image slots skip Gradio's preprocessing: stock ``gr.Image`` opens every
    input with PIL there, so a broken upload failed outside the app with a bare "Error". Gradio
    still checks, before this, that the path is an upload to this server; the backend then checks
    the image and says what is wrong with it.
    """
    if isinstance(value, dict):
        return value.get("path")
    return value or None


def _rows(kinds: Sequence[str], images: Sequence[Any], texts: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"kind": kind, "image": _upload_path(images[i]), "text": texts[i] or ""}
        for i, kind in enumerate(kinds)
        if kind
    ]


def _items(rows: Sequence[dict[str, Any]]) -> list[str | Path]:
    items: list[str | Path] = []
    for n, row in enumerate(rows):
        if row["kind"] == "image":
            if not row["image"]:
                raise ValueError(f"row {n + 1} is an image row without an image: upload one or remove the row")
            items.append(Path(row["image"]))
        elif row["text"]:
            items.append(str(row["text"]))
    return items


def _number(value: Any, name: str, kind: type[int] | type[float]) -> Any:
    """A setting typed in the page: blank is ``None`` (the decoder's default)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if kind is int:
        if number != int(number):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number


def build_app(backend: Backend) -> "gr.Blocks":
    """The page over ``backend`` (see the module docstring)."""
    import gradio as gr

    models = backend.model_choices()
    first = models[0]

    def page_error(error: BaseException) -> gr.Error:
        """The one-line message the page shows; a real bug is logged here, never sent."""
        if isinstance(error, ValueError | FileNotFoundError | OSError):
            return gr.Error(str(error).splitlines()[0] if str(error) else type(error).__name__)
        if type(error).__name__ == "OutOfMemoryError":  # torch.cuda's
            logger.warning("job ran out of GPU memory: %s", str(error).splitlines()[0])
            return gr.Error("out of GPU memory: a smaller size, or start the app with --offload model or --quantize")
        logger.exception("job failed")
        return gr.Error(f"internal error ({type(error).__name__}); the server log has the details")

    with gr.Blocks(title="ThinkDiff", analytics_enabled=False) as demo:
        gr.Markdown(
            "# ThinkDiff\nInterleaved images and text in, an image out: the LVLM reads the sequence, "
            "ThinkDiff's aligner turns its answer into the diffusion decoder's prompt."
            + (
                "  \nModels: the **miniature world** (trained from scratch on CPU; 32-pixel images, "
                "its judge reads each one)."
                if backend.world is not None
                else ""
            )
        )
        kinds = gr.State([""] * MAX_ROWS)
        target = gr.State(None)
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                gr.Markdown("### Sequence")
                groups, images, texts, ups, downs, removes = [], [], [], [], [], []
                for i in range(MAX_ROWS):
                    with gr.Group(visible=False, elem_id=f"row-{i}") as group, gr.Row(equal_height=True):
                        images.append(
                            gr.Image(
                                type="filepath",
                                sources=["upload", "clipboard"],
                                label=f"image (row {i + 1})",
                                height=140,
                                visible=False,
                                elem_id=f"row-{i}-image",
                                scale=3,
                            )
                        )
                        texts.append(
                            gr.Textbox(
                                label=f"text (row {i + 1})",
                                lines=2,
                                visible=False,
                                elem_id=f"row-{i}-text",
                                scale=3,
                            )
                        )
                        with gr.Column(min_width=60, scale=0):
                            ups.append(gr.Button("↑", size="sm", elem_id=f"row-{i}-up"))
                            downs.append(gr.Button("↓", size="sm", elem_id=f"row-{i}-down"))
                            removes.append(gr.Button("✕", size="sm", elem_id=f"row-{i}-remove"))
                    groups.append(group)
                with gr.Row():
                    add_image = gr.Button("+ image", elem_id="add-image")
                    add_text = gr.Button("+ text", elem_id="add-text")
                    clear = gr.Button("clear", elem_id="clear")
                with gr.Row():
                    task = gr.Dropdown(
                        ["Color-I", "Color-II", "Background-I", "Background-II", "Texture-I", "Texture-II"],
                        value="Color-II",
                        label="example task (mini-CoBSAT)",
                    )
                    # The examples need only the world's renderer: real models get them too.
                    shot = gr.Dropdown([1, 2, 3, 4], value=2, label="shots")
                    load_example = gr.Button("load an example", elem_id="load-example")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                gr.Markdown("### Settings")
                model = gr.Dropdown(models, value=first, label="model", elem_id="model")
                mode = gr.Dropdown(
                    backend.mode_choices(), value=backend.variant(first) or "text-bridge", label="mode"
                )
                decoder = gr.Dropdown(backend.decoder_choices(), value=MODEL_DEFAULT, label="decoder")
                with gr.Row():
                    width = gr.Textbox("", label="width", placeholder="blank: the decoder's")
                    height = gr.Textbox("", label="height", placeholder="blank: the decoder's")
                with gr.Row():
                    steps = gr.Textbox("", label="steps", placeholder="blank: the decoder's")
                    guidance = gr.Textbox("", label="guidance", placeholder="blank: the decoder's")
                    true_cfg = gr.Textbox("", label="true CFG", placeholder="blank: the decoder's")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    reseed = gr.Button("random", size="sm", elem_id="random-seed")
                with gr.Row():
                    num_tokens = gr.Number(backend.default_num_tokens(), label="LVLM tokens", precision=0)
                    qcd = gr.Textbox("", label="QCD alpha", placeholder="blank: off")
                    hint = gr.Checkbox(False, label="hint")
                bridge = gr.Checkbox(
                    False, label="also the text bridge (same inputs and seed)", elem_id="text-bridge"
                )
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Row():
            out_image = gr.Image(
                label="ThinkDiff", type="filepath", elem_id="output-image", interactive=False, height=320
            )
            out_video = gr.Video(label="ThinkDiff (video)", visible=False, interactive=False, height=320)
            bridge_image = gr.Image(
                label="text bridge",
                type="filepath",
                visible=False,
                interactive=False,
                height=320,
                elem_id="bridge-image",
            )
        details = gr.Markdown("", elem_id="details")
        lvlm_text = gr.Textbox(label="the LVLM's text", interactive=False, elem_id="lvlm-text")
        downloads = gr.File(label="PNG + JSON sidecar", file_count="multiple", interactive=False)
        gallery = gr.Gallery(label="history", columns=6, height=220, elem_id="history")

        # Hidden API inputs: the sequence as JSON, images as uploads (see on_api).
        api_items = gr.JSON(visible=False)
        api_images = gr.File(file_count="multiple", visible=False)
        api_result = gr.JSON(visible=False)
        api_files = gr.File(file_count="multiple", visible=False)
        api_button = gr.Button(visible=False)

        # ---- editor ---------------------------------------------------------------------------
        editor = [kinds, *images, *texts]
        shown = [kinds, target, *groups, *images, *texts]

        def layout(rows: list[dict[str, Any]], note: str | None = None) -> list[Any]:
            """Updates drawing ``rows`` into the slots (+ the target, cleared by any edit)."""
            rows = rows[:MAX_ROWS]
            out: list[Any] = [[r["kind"] for r in rows] + [""] * (MAX_ROWS - len(rows)), None]
            out += [gr.update(visible=i < len(rows)) for i in range(MAX_ROWS)]
            for i in range(MAX_ROWS):
                row = rows[i] if i < len(rows) else None
                is_image = row is not None and row["kind"] == "image"
                out.append(gr.update(visible=is_image, value=row["image"] if is_image else None))
            for i in range(MAX_ROWS):
                row = rows[i] if i < len(rows) else None
                is_text = row is not None and row["kind"] == "text"
                out.append(gr.update(visible=is_text, value=row["text"] if is_text else ""))
            return out

        def split(values: Sequence[Any]) -> list[dict[str, Any]]:
            kinds_now = values[0]
            return _rows(kinds_now, values[1 : 1 + MAX_ROWS], values[1 + MAX_ROWS :])

        def add(kind: str) -> Callable[..., list[Any]]:
            def handler(*values: Any) -> list[Any]:
                rows = split(values)
                if len(rows) >= MAX_ROWS:
                    raise gr.Error(f"the editor holds {MAX_ROWS} rows")
                return layout([*rows, {"kind": kind, "image": None, "text": ""}])

            return handler

        def move(index: int, step: int) -> Callable[..., list[Any]]:
            def handler(*values: Any) -> list[Any]:
                rows = split(values)
                other = index + step
                if 0 <= other < len(rows):
                    rows[index], rows[other] = rows[other], rows[index]
                return layout(rows)

            return handler

        def remove(index: int) -> Callable[..., list[Any]]:
            def handler(*values: Any) -> list[Any]:
                rows = split(values)
                return layout([r for n, r in enumerate(rows) if n != index])

            return handler

        ui = {"concurrency_limit": None, "api_visibility": "private", "show_progress": "hidden"}
        raw = {**ui, "preprocess": False}  # image slots are read unprocessed (see _upload_path)
        add_image.click(add("image"), editor, shown, **raw)
        add_text.click(add("text"), editor, shown, **raw)
        clear.click(lambda *values: layout([]), editor, shown, **raw)
        for i in range(MAX_ROWS):
            ups[i].click(move(i, -1), editor, shown, **raw)
            downs[i].click(move(i, +1), editor, shown, **raw)
            removes[i].click(remove(i), editor, shown, **raw)

        def on_upload(value: Any, index: int) -> tuple[Any, str]:
            path = _upload_path(value)
            if not path:
                return gr.update(), ""
            try:
                backend.check_image(path, f"row {index + 1} ({Path(path).name})")
            except ValueError as error:
                gr.Warning(str(error))
                return None, f"⚠️ {error}"
            return gr.update(), ""

        for i in range(MAX_ROWS):
            images[i].upload(
                lambda value, i=i: on_upload(value, i), images[i], [images[i], status], **raw
            )

        def on_example(task_name: str, shots: int) -> list[Any]:
            try:
                example = backend.example(task_name, int(shots))
            except (ValueError, OSError) as error:
                raise page_error(error) from None
            rows = [
                {"kind": "text", "image": None, "text": item}
                if isinstance(item, str)
                else {"kind": "image", "image": str(item), "text": ""}
                for item in example["items"]
            ]
            out = layout(rows)
            out[1] = {"target": example["target"], "caption": example["target_caption"]}
            return [*out, example["seed"], example["caption"]]

        load_example.click(on_example, [task, shot], [*shown, seed, status], **ui)
        reseed.click(lambda: random.randrange(2**31), None, seed, **ui)
        model.change(
            lambda m: gr.update(value=backend.variant(m) or "text-bridge"), model, mode, **ui
        )

        # ---- generation -----------------------------------------------------------------------
        settings = [
            model, mode, decoder, seed, width, height, steps, guidance, true_cfg, num_tokens, qcd, hint, bridge,
        ]  # fmt: skip
        running: dict[str, threading.Event] = {}

        def options(values: Sequence[Any], goal: dict[str, Any] | None) -> GenerateOptions:
            """The settings' values, in the order of ``settings``."""
            m, md, dec, sd, w, h, st, g, cfg, nt, a, hn, br = values
            return GenerateOptions(
                model=m,
                mode=md,
                decoder=dec or MODEL_DEFAULT,
                seed=_number(sd, "seed", int) or 0,
                width=_number(w, "width", int),
                height=_number(h, "height", int),
                steps=_number(st, "steps", int),
                guidance=_number(g, "guidance", float),
                true_cfg=_number(cfg, "true CFG", float),
                num_tokens=_number(nt, "LVLM tokens", int),
                qcd_alpha=_number(a, "QCD alpha", float),
                hint=bool(hn),
                text_bridge=bool(br),
                target=None if goal is None else goal["target"],
            )

        def run_job(
            items: list[str | Path], opts: GenerateOptions, request: gr.Request, progress: gr.Progress
        ) -> list[JobResult]:
            session = request.session_hash or "api"
            event = running[session] = threading.Event()
            try:
                return backend.generate(
                    items, opts, cancelled=event, progress=lambda f, text: progress(f, desc=text)
                )
            except Cancelled:
                raise gr.Error("cancelled") from None
            except gr.Error:
                raise
            except Exception as error:
                raise page_error(error) from None
            finally:
                running.pop(session, None)

        def on_generate(
            data: dict[Any, Any],
            request: gr.Request,
            progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (how gradio asks for it)
        ) -> list[Any]:
            rows = split([data[c] for c in editor])
            goal, past = data[target], data[history]
            try:
                items = _items(rows)
                opts = options([data[c] for c in settings], goal)
            except ValueError as error:
                raise gr.Error(str(error)) from None
            results = run_job(items, opts, request, progress)
            main, rest = results[0], results[1:]
            caption = None if goal is None else goal["caption"]
            notes = [describe(r, caption) for r in results]
            video = main.path.suffix == ".mp4"
            past = [*past, (str(main.path), f"{main.mode} · seed {main.sidecar['seed']}")]
            past += [(str(r.path), f"{r.mode} · seed {r.sidecar['seed']}") for r in rest if r.path.suffix == ".png"]
            files = [str(p) for r in results for p in (r.path, r.sidecar_path)]
            return [
                gr.update(value=None if video else str(main.path), visible=not video),
                gr.update(value=str(main.path) if video else None, visible=video),
                gr.update(value=str(rest[0].path) if rest else None, visible=bool(rest)),
                "\n\n".join(notes),
                "\n\n".join(f"[{r.mode}] {r.sidecar['lvlm_text']}" for r in results if r.sidecar["lvlm_text"]),
                files,
                past,
                past[::-1],
            ]

        generation = run.click(
            on_generate,
            {*editor, target, history, *settings},
            [out_image, out_video, bridge_image, details, lvlm_text, downloads, history, gallery],
            api_name="generate_page",
            api_visibility="private",
            concurrency_id="device",
            concurrency_limit=1,
            preprocess=False,  # see _upload_path; options() parses the settings
        )

        def on_cancel(request: gr.Request) -> None:
            event = running.get(request.session_hash or "")
            if event is not None:
                event.set()
            gr.Info("cancelled")

        cancel.click(on_cancel, None, None, cancels=[generation], **ui)

        def on_api(
            items: Any,
            files: list[str] | None,
            model_: str,
            mode_: str,
            decoder_: str,
            seed_: float | None,
            width_: str | float | None,
            height_: str | float | None,
            steps_: str | float | None,
            guidance_: str | float | None,
            true_cfg_: str | float | None,
            num_tokens_: float | None,
            qcd_alpha_: str | float | None,
            hint_: bool,
            bridge_: bool,
            request: gr.Request,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (how gradio asks for it)
        ) -> tuple[list[str], dict[str, Any]]:
            """``items``: [{"text": str} | {"image": k}], k indexing the uploaded ``files``; then
            the settings (in the order of ``settings``)."""
            values = [
                model_, mode_, decoder_, seed_, width_, height_, steps_, guidance_, true_cfg_, num_tokens_,
                qcd_alpha_, hint_, bridge_,
            ]  # fmt: skip
            files = list(files or [])
            sequence: list[str | Path] = []
            try:
                if not isinstance(items, list):
                    raise ValueError('items must be a list of {"text": STR} and {"image": INDEX}')
                for item in items:
                    if isinstance(item, dict) and set(item) == {"text"} and isinstance(item["text"], str):
                        sequence.append(item["text"])
                    elif isinstance(item, dict) and set(item) == {"image"} and isinstance(item["image"], int):
                        if not 0 <= item["image"] < len(files):
                            raise ValueError(f"image index {item['image']} but {len(files)} images were uploaded")
                        sequence.append(Path(files[item["image"]]))
                    else:
                        raise ValueError(f'each item must be {{"text": STR}} or {{"image": INDEX}}, got {item!r}')
                opts = options(values, None)
            except ValueError as error:
                raise gr.Error(str(error)) from None
            results = run_job(sequence, opts, request, progress)
            return (
                [str(p) for r in results for p in (r.path, r.sidecar_path)],
                {"results": [r.summary() for r in results]},
            )

        api_button.click(
            on_api,
            [api_items, api_images, *settings],
            [api_files, api_result],
            api_name="generate",
            concurrency_id="device",
            concurrency_limit=1,
        )
    return demo


# What the app writes under --out: the examples folder and one folder per job (see ``run``).
_OWN_ENTRY = re.compile(r"examples|\d{8}-\d{6}-\d{4,}-[0-9a-f]{16}")


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that holds anything the app did not write.

    The page serves every file below ``--out`` to any client that names it (gradio's
    ``allowed_paths``), so that folder must hold only the app's own outputs: ``--out ~`` would
    otherwise publish the home folder.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    foreign = sorted(p.name for p in out_dir.iterdir() if not _OWN_ENTRY.fullmatch(p.name)) if out_dir.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"--out {out_dir} holds files the app did not write ({shown}); every file under --out is "
            "served to the page's clients, so give the app a folder of its own"
        )


def launch(backend: Backend, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> Any:
    """Serve the page; returns the Blocks (already serving when ``block`` is False)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app(backend)
    demo.queue(default_concurrency_limit=1, max_size=32)
    backend.out_dir.mkdir(parents=True, exist_ok=True)
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{int(backend.config.max_upload_mb * 1024)}kb",
        allowed_paths=[str(backend.out_dir)],
        show_error=False,  # only the app's own one-line messages reach the page
        prevent_thread_lock=not block,
        ssr_mode=False,
        css=CSS,
        quiet=not block,
        inbrowser=False,
        share=False,
    )
    return demo


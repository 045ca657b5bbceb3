"""The app's backend: the server's models, the upload checks, one job at a time, every job's folder.

No Gradio here: :class:`Backend` is what the page (:mod:`thinkdiff.app.layout`) and the tests drive.
"""

import dataclasses
import itertools
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinkdiff.app.outputs import JobResult, check_out_dir
from thinkdiff.limits import check_seed
from thinkdiff.paths import confined_folder

if TYPE_CHECKING:
    from thinkdiff.miniworld.catalogue import WorldModel
    from thinkdiff.miniworld.models import MiniWorld
    from thinkdiff.pipelines import ThinkDiffPipeline

logger = logging.getLogger(__name__)

MODEL_DEFAULT = "(the model's own)"
"""Decoder choice meaning: the decoder the model folder names."""
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


def display_names(paths: Sequence[str]) -> dict[str, str]:
    """Names the page shows for server-side folders or hub ids -> what they name.

    A local folder is shown by its name (with its parent's where two share one, e.g. ``lvlm/model``),
    never by its server path; a hub id is shown as it is.
    """

    def name(path: str, depth: int) -> str:
        if not Path(path).expanduser().is_dir():
            return path  # a hub id
        return "/".join(Path(path).expanduser().resolve().parts[-depth:])

    depth = 1
    while True:
        names = [name(p, depth) for p in paths]
        if len(set(names)) == len(names) or depth > 8:
            return (
                dict(zip(names, paths, strict=True))
                if len(set(names)) == len(names)
                else {p: p for p in paths}
            )
        depth += 1


class Backend:
    """Models, limits, the device lock and the outputs; everything the page does but draw.

    Args:
        config: what the server offers (see :class:`AppConfig`).
    """

    def __init__(self, config: AppConfig) -> None:
        import torch

        self.config = config
        self.out_dir = Path(config.out_dir).resolve()
        check_out_dir(self.out_dir)
        self.world: MiniWorld | None = None  # the mini world, when it supplies the models
        self._models: dict[str, str] = {}  # label -> folder or hub id (the page sees labels only)
        self._variants: dict[str, str] = {}
        self._catalogue: dict[str, WorldModel] = {}  # mini world: what each model is, its score
        if config.models:
            from thinkdiff.models.bundle import load_info

            for label, model in display_names(config.models).items():
                self._models[label] = model
                try:
                    self._variants[label] = load_info(model).variant
                except (OSError, ValueError) as error:  # reported in the page when it is picked
                    logger.warning("model %s: %s", model, error)
        else:
            from thinkdiff.miniworld import models as miniworld
            from thinkdiff.miniworld.catalogue import world_models

            self.world = miniworld.MiniWorld(Path(config.miniworld or miniworld.default_weights_dir()))
            # The method first, then the ablations, best measured score first.
            for entry in world_models(self.world.root):
                label = f"mini world: {entry.name}"
                self._models[label] = str(entry.folder)
                self._variants[label] = entry.variant
                self._catalogue[label] = entry
            if not self._models:
                raise FileNotFoundError(f"{self.world.root / 'thinkdiff'} holds no ThinkDiff model folder")
        self._decoder_paths = {MODEL_DEFAULT: MODEL_DEFAULT, **display_names(config.decoders)}
        self._decoders = list(self._decoder_paths)
        self._dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
        self._pipelines: dict[tuple[str, str, str], ThinkDiffPipeline] = {}
        self._warm: set[tuple[str, str]] = set()  # (model, mode) that ran a job with models kept loaded
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

    def model_label(self, model: str) -> str:
        """How the model list shows ``model``: the method marked, each ablation with its score."""
        entry = self._catalogue.get(model)
        if entry is None:
            return model
        if entry.role == "method":
            return f"{entry.name}: the method" + (f" ({entry.score_text})" if entry.score_text else "")
        return f"ablation: {entry.name}" + (f" ({entry.score:.3f})" if entry.score is not None else "")

    def model_note(self, model: str) -> str:
        """One line on what ``model`` is and how it measured (empty where nothing is known)."""
        entry = self._catalogue.get(model)
        if entry is None:
            return ""
        role = "**the method**" if entry.role == "method" else "an ablation"
        score = f" Measured: {entry.score_text}." if entry.score_text else ""
        return f"{role}: {entry.summary}.{score}"

    def ablations(self) -> list[tuple[str, str]]:
        """Mini world: ``(name, one line with its measured score)`` of every model but the method."""
        return [
            (e.name, e.summary + (f"; {e.score_text}" if e.score_text else ""))
            for e in self._catalogue.values()
            if e.role == "ablation"
        ]

    def text_bridge_score(self) -> float | None:
        """Mini world, committed weights: the text bridge's measured mini-CoBSAT score."""
        from thinkdiff.miniworld.catalogue import text_bridge_score

        return None if self.world is None else text_bridge_score(self.world.root)

    def decoder_defaults(self, model: str, decoder: str = MODEL_DEFAULT) -> dict[str, float]:
        """The decoder's own settings for ``model`` (``height``, ``width``, ``steps``, ``guidance``,
        ``true_cfg``; those it has), read from the decoder's folder and pipeline class without
        loading any weights; empty when they cannot be read before the first job."""
        from thinkdiff.pipelines.decoders.base import call_defaults

        names = {
            "height": "height", "width": "width", "num_inference_steps": "steps",
            "guidance_scale": "guidance", "true_cfg_scale": "true_cfg",
        }  # fmt: skip
        if self.world is None:
            # Only local folders are read here: a hub id's configs are fetched when a job loads
            # it, never while the page is drawn.
            from thinkdiff.models.bundle import load_info, recorded_model

            folder = Path(self._models[model])
            try:
                # The recorded decoder is found as generate finds it (working folder, folders above
                # the model, the installed package), so the page reads it from any working folder.
                named = (
                    recorded_model(folder, load_info(folder), "diffusion_decoder")
                    if decoder == MODEL_DEFAULT
                    else self._decoder_paths[decoder]
                )
            except (OSError, ValueError):
                return {}
            if not Path(named).is_dir():
                return {}
        try:
            pipe = self._pipeline(model, self.variant(model) or "text-bridge", decoder)
            stock = {k: p.default for k, p in call_defaults(pipe.decoder.pipeline_cls).items()}
            given = {**stock, **pipe.decoder.default_settings()}
        except Exception as error:  # a real model not yet reachable: the page says "the decoder's"
            logger.info("decoder defaults of %s: %s", model, error)
            return {}
        return {names[k]: v for k, v in given.items() if k in names and isinstance(v, int | float)}

    def is_loaded(self, model: str, mode: str) -> bool:
        """Whether a job with ``model`` in ``mode`` runs without loading models first."""
        return (model, mode) in self._warm

    def served(self, path: Path) -> str:
        """``path`` (a job's output) as handed to the page: only a regular file really inside
        ``--out`` (no symlink on the way) is served; anything else raises ``ValueError``."""
        from thinkdiff.paths import confined_file

        return str(confined_file(self.out_dir, Path(path).relative_to(self.out_dir)))

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
            reason = str(error).replace(
                str(path), path.name
            )  # the server's upload folder is no one's business
            raise ValueError(f"{where}: not a readable image ({reason})") from error

    def example(self, task: str = "Color-II", shot: int = 2, index: int | None = None) -> dict[str, Any]:
        """A mini-CoBSAT prompt as editor rows (see :func:`thinkdiff.app.examples.mini_cobsat_example`);
        its images are written under ``out_dir/examples``."""
        from thinkdiff.app.examples import mini_cobsat_example

        return mini_cobsat_example(self.examples_dir(), task, shot, index)

    def clip_example(self) -> dict[str, Any] | None:
        """Mini world with its calibrated CLIP aligner: ThinkDiff-CLIP's example (see
        :func:`thinkdiff.app.examples.clip_example`) plus ``model``, the page's name of that
        aligner; ``None`` elsewhere."""
        from thinkdiff.app.examples import CLIP_EXAMPLE_MODEL, clip_example

        label = f"mini world: {CLIP_EXAMPLE_MODEL}"
        if self.world is None or label not in self._models:
            return None
        return {**clip_example(self.examples_dir()), "model": label}

    def examples_dir(self) -> Path:
        """``out_dir/examples``, where the page's example images are written: created as, or checked
        to be, a real folder inside ``out_dir`` before anything is written into it."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return confined_folder(self.out_dir, "examples", create=True)

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
                pipe = self.world.thinkdiff_pipeline(
                    folder, mode=mode, lvlm=self.world.root / "vlm", vision=None
                )
            else:
                pipe = self.world.thinkdiff_pipeline(folder, mode=mode)
        else:
            pipe = ThinkDiffPipeline.from_pretrained(
                folder,
                decoder=None if decoder == MODEL_DEFAULT else self._decoder_paths[decoder],
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
            raise ValueError(
                f"unknown decoder {options.decoder!r}; choose one of {', '.join(self._decoders)}"
            )
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
        check_seed("seed", int(options.seed))  # the command line's bound: torch's seeds, no negatives
        modes = [mode, "text-bridge"] if options.text_bridge and mode != "text-bridge" else [mode]

        report(0.0, "waiting for the device")
        with self._device_lock:  # one job at a time per device, whatever the queue does
            if cancelled.is_set():
                raise Cancelled
            # Gradio serves this folder to the job's owner by its path: a random part keeps other
            # clients (who learn the naming from their own jobs) from fetching its uploads.
            self.out_dir.mkdir(parents=True, exist_ok=True)
            job = confined_folder(
                self.out_dir,
                f"{time.strftime('%Y%m%d-%H%M%S')}-{next(self._jobs):04d}-{secrets.token_hex(8)}",
                create=True,
            )
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
                stage = (
                    "the LVLM reads the sequence"
                    if run_mode != "clip"
                    else "the vision tower reads the images"
                )
                loading = "" if self.is_loaded(model, run_mode) else " (first job: loading the models)"
                report(n / len(modes), f"{run_mode}: {stage}, then denoising{loading}")
                output = pipe(request)
                if pipe.keep_loaded:
                    self._warm.add((model, run_mode))
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

"""ThinkDiff in the miniature world, through the project's own data, training and model code.

- :func:`write_lvlm_features`: the mini VLM describes fresh renders (one of the paper's 16
  prompts each, sampled at temperature 0.6) via :func:`thinkdiff.data.extraction.extract_features`;
  prompt-token features are stored too, for the input-token ablation.
- :func:`train_lvlm_aligner` / :func:`train_clip_aligner`: a :class:`~thinkdiff.training.config.TrainConfig`
  run through :func:`thinkdiff.training.trainer.train`, against the frozen mini T5 decoder.
- :func:`run_vlm`, :func:`score_lvlm_methods`, :func:`score_clip`: inference on mini-CoBSAT and on
  renders, judged by :class:`~thinkdiff.miniworld.judge.Judge`.

Shapes: N generated tokens, P prompt tokens, H VLM width, D T5 width.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from thinkdiff.miniworld.judge import attribute_accuracy
from thinkdiff.miniworld.minicobsat import MiniPrompt
from thinkdiff.miniworld.models import DrawnImages
from thinkdiff.miniworld.world import (
    ATTRIBUTES,
    Scene,
    caption,
    full_caption,
    parse_caption,
    render,
    sample_scene,
    scene_rng,
    to_pil,
)

if TYPE_CHECKING:
    from thinkdiff.miniworld.budgets import BuildConfig
    from thinkdiff.miniworld.models import MiniWorld

__all__ = [
    "ALIGNMENT_REFERENCE",
    "PromptRun",
    "aligner_config",
    "alignment_diagnostics",
    "calibration_config",
    "clip_test_scenes",
    "mean_cosine",
    "run_training",
    "run_vlm",
    "score_clip",
    "score_lvlm_methods",
    "train_clip_aligner",
    "train_clip_calibrated",
    "train_lvlm_aligner",
    "world_inference",
    "write_image_caption_folder",
    "write_lvlm_features",
    "write_task_features",
    "write_task_source",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- data
def write_image_caption_folder(folder: Path, n: int, seed: str) -> Path:
    """``n`` renders outside the held-out cells as ``KEY.png`` + ``KEY.txt`` (full caption): a folder
    source for :mod:`thinkdiff.data.sources`."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = scene_rng("image-caption", seed)
    for i in range(n):
        scene = sample_scene(rng)
        to_pil(render(scene)).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(full_caption(scene) + "\n")
    return folder


def write_lvlm_features(
    world_root: Path, work: Path, config: BuildConfig, *, progress: bool = True
) -> dict[str, Path]:
    """Feature folders ``work/features/{train,val}`` of the VLM describing fresh renders."""
    from thinkdiff.data.extraction import ExtractionSettings, extract_features, make_engine
    from thinkdiff.miniworld.components.vlm import max_answer_tokens
    from thinkdiff.models.lvlm import load_processor

    tokenizer = load_processor(world_root / "vlm").tokenizer
    settings = ExtractionSettings(
        max_new_tokens=max_answer_tokens(tokenizer),
        prompt_features=True,
        seed=config.seed,
        samples_per_shard=1000,
    )
    engine = make_engine("hf", str(world_root / "vlm"), settings, device="cpu", dtype=torch.float32)
    out = {}
    for split, n in (("train", config.lvlm_train), ("val", config.lvlm_val)):
        images = write_image_caption_folder(work / "describe" / split, n, f"{config.seed}:{split}")
        target = work / "features" / split
        if target.exists():
            shutil.rmtree(target)
        summary = extract_features(images, target, engine, settings, batch_size=64, progress=progress)
        logger.info("%s features: %s", split, summary)
        out[split] = target
    return out


# ----------------------------------------------------------------------------------- training
def aligner_config(world_root: Path, work: Path, config: BuildConfig, name: str, **overrides: Any):
    """The project's TrainConfig for one ThinkDiff-LVLM aligner run in the miniature world."""
    from thinkdiff.training.config import TrainConfig

    steps, lr = config.aligner_steps, config.aligner_lr
    values: dict[str, Any] = {
        "variant": "lvlm",
        "data": [str(work / "features" / "train")],
        "val_data": [str(work / "features" / "val")],
        "output_dir": str(work / "runs" / name),
        "lvlm": str(world_root / "vlm"),
        "proxy_t5": str(world_root / "t5"),
        "diffusion_decoder": str(world_root / "flux"),
        "max_split": 128,
        "max_target_tokens": 32,
        "global_batch_size": config.aligner_batch,
        "max_steps": steps,
        "lr": lr,
        "warmup_start_lr": lr / 100,
        "warmup_steps": max(1, steps // 10),
        "min_lr": lr / 10,
        "num_workers": 0,
        "shuffle_buffer": 1000,
        "log_every": max(1, min(10, steps // 10)),
        "val_every": max(1, steps // 5),
        "val_batches": 4,
        "decode_every": steps,
        "decode_samples": 4,
        "save_every": steps,
        "keep_last": 1,
        "mixed_precision": "no",
        "seed": config.seed,
    }
    values.update(overrides)
    return TrainConfig(**values)


WORLD_DECODING = ("num_tokens", "stop_at_eos", "greedy")
"""The :class:`~thinkdiff.pipelines.InferenceSettings` fields a mini-world model folder records."""


def world_inference(world_root: Path) -> dict[str, Any]:
    """The ``inference`` every aligner folder of the world at ``world_root`` records in its
    ``thinkdiff.json``: the world's VLM decoding (:meth:`MiniWorld.inference_settings
    <thinkdiff.miniworld.models.MiniWorld.inference_settings>`: greedy, EOS-terminated answers, as
    its aligners were trained on). A ThinkDiff-CLIP folder records it too: clip mode runs no LVLM,
    but the same folder in text-bridge mode (the comparison beside it) reads with the world's VLM."""
    from thinkdiff.miniworld.models import MiniWorld

    settings = MiniWorld(Path(world_root)).inference_settings()
    return {name: getattr(settings, name) for name in WORLD_DECODING}


def run_training(train_config, target: Path | None, *, progress: bool = True) -> Path:
    """Run the project's trainer afresh; copy the exported model folder to ``target`` if given.

    The exported folder records :func:`world_inference` of the world whose VLM the run names (every
    mini-world run names ``<world>/vlm``, see :func:`aligner_config`), so a bare ``thinkdiff generate
    --model`` on it runs as the world does."""
    import dataclasses
    import json

    from thinkdiff.models.bundle import INFO_FILE, load_info
    from thinkdiff.training.trainer import train
    from thinkdiff.utils import atomic_write_text

    run_dir = Path(train_config.output_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run every time: the build is deterministic from its seed
    result = train(train_config, resume="never", progress=progress)
    if result.model_dir is None:
        raise RuntimeError(f"training in {run_dir} stopped before its last step")
    info = load_info(result.model_dir)
    info.inference = world_inference(Path(train_config.lvlm).parent)
    if train_config.clip_empty_first:
        # Recorded only where set, so a default folder's thinkdiff.json stays as released.
        info.extra["clip_empty_first"] = train_config.clip_empty_first
    atomic_write_text(result.model_dir / INFO_FILE, json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    if target is not None:
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(result.model_dir, target)
        return target
    return result.model_dir


def train_lvlm_aligner(
    world_root: Path,
    work: Path,
    config: BuildConfig,
    *,
    name: str,
    target: Path | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train one ThinkDiff-LVLM aligner (``overrides``: ``split``, ``features``, ``aligner_norm`` ...)."""
    return run_training(
        aligner_config(world_root, work, config, name, **overrides), target, progress=progress
    )


def train_clip_aligner(
    world_root: Path,
    work: Path,
    config: BuildConfig,
    *,
    target: Path | None = None,
    name: str = "clip",
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Train the ThinkDiff-CLIP aligner on an image-caption folder of fresh renders (``overrides``:
    changes to its TrainConfig, e.g. ``clip_empty_first``)."""
    folder = write_image_caption_folder(work / "clip-data", config.clip_train, f"{config.seed}:clip")
    steps = config.clip_steps
    train_config = aligner_config(
        world_root,
        work,
        config,
        name,
        variant="clip",
        data=[str(folder)],
        val_data=[],
        vision_model=str(world_root / "vision"),
        global_batch_size=config.clip_batch,
        max_steps=steps,
        warmup_steps=max(1, steps // 10),
        log_every=max(1, min(10, steps // 10)),
        val_every=0,
        decode_every=0,
        save_every=steps,
        **overrides,
    )
    return run_training(train_config, target, progress=progress)


# ----------------------------------------------------------------------------------- calibration
def write_task_source(folder: Path, n_prompts: int, shots: Sequence[int], seed: str) -> Path:
    """An image-caption folder whose consecutive groups of ``k + 1`` samples are mini-CoBSAT-style
    tasks of *training* cells only (fresh renders, random task, theta and words): what
    ``extract-features --task-shots`` groups into task-format prompts. Each caption is the word
    (the short text); the last sample of a group is the target's render."""
    from thinkdiff.miniworld.minicobsat import MINI_TASKS

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = scene_rng("task-source", seed)
    tasks = [MINI_TASKS[t] for t in sorted(MINI_TASKS)]
    from thinkdiff.miniworld.world import HELD_OUT

    for j in range(n_prompts):
        k = shots[j % len(shots)]
        task = rng.choice(tasks)
        while True:
            theta = rng.choice(task.theta_items)
            xs = rng.sample(task.x_items, k + 1)
            cells = [(x, theta) if task.x_category != "shape" else (theta, x) for x in xs]
            if not any(c in HELD_OUT[task.theme] for c in cells):
                break
        for i, (x, (detail, shape)) in enumerate(zip(xs, cells)):
            scene = sample_scene(rng, shape=shape, **{task.detail_category: detail})
            stem = folder / f"{j:06d}-{i}"
            to_pil(render(scene)).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(x + "\n")
    return folder


def write_task_features(world_root: Path, work: Path, config: BuildConfig, *, progress: bool = True) -> Path:
    """Task-format calibration features ``work/features/task``: the VLM's greedy answers (and
    prompt-token features) to prompts built from training cells by ``extract-features``' task mode."""
    from thinkdiff.data.extraction import ExtractionSettings, extract_features, make_engine
    from thinkdiff.miniworld.components.vlm import max_answer_tokens
    from thinkdiff.models.lvlm import load_processor

    tokenizer = load_processor(world_root / "vlm").tokenizer
    shots = (2, 4)
    source = write_task_source(work / "task-source", config.calib_prompts, shots, f"{config.seed}:task")
    settings = ExtractionSettings(
        max_new_tokens=max_answer_tokens(tokenizer),
        prompt_features=True,
        seed=config.seed,
        samples_per_shard=(max(shots) + 1) * 1000,
        task_shots=shots,
        greedy=True,
    )
    engine = make_engine("hf", str(world_root / "vlm"), settings, device="cpu", dtype=torch.float32)
    target = work / "features" / "task"
    if target.exists():
        shutil.rmtree(target)
    summary = extract_features(source, target, engine, settings, batch_size=64, progress=progress)
    logger.info("task-format features: %s", summary)
    return target


def calibration_config(
    world_root: Path, work: Path, config: BuildConfig, name: str, init: Path, **overrides: Any
):
    """The project's TrainConfig of one ThinkDiff-LVLM calibration run in the miniature world."""
    steps, lr = overrides.get("max_steps", config.calib_steps), config.calib_lr
    values: dict[str, Any] = {
        "objective": "calibrate",
        "init_aligner": str(init),
        "split": False,
        "data": [str(work / "features" / "task")],
        "val_data": [],
        "global_batch_size": config.calib_batch,
        "max_steps": steps,
        "lr": lr,
        "warmup_start_lr": lr / 100,
        "warmup_steps": max(1, steps // 20),
        "min_lr": lr / 10,
        "val_every": 0,
        "decode_every": 0,
        "save_every": steps,
        "log_every": max(1, min(10, steps // 10)),
        "proxy_weight": config.calib_proxy_weight,
        "noise_source": config.calib_noise,
    }
    values.update(overrides)
    return aligner_config(world_root, work, config, f"calibrate-{name.replace(' ', '-')}", **values)


def train_clip_calibrated(
    world_root: Path,
    work: Path,
    config: BuildConfig,
    *,
    init: Path,
    target: Path | None = None,
    name: str = "clip",
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Calibrate the ThinkDiff-CLIP aligner: FLUX on its aligned image tokens (+ T5 of the caption's
    first part) must act as on the whole caption (:func:`calibration_config`'s recipe, CLIP's data
    and budgets; ``name`` names its run)."""
    folder = work / "clip-data"
    if not folder.is_dir():
        write_image_caption_folder(folder, config.clip_train, f"{config.seed}:clip")
    values: dict[str, Any] = {
        "variant": "clip",
        "data": [str(folder)],
        "vision_model": str(world_root / "vision"),
        "global_batch_size": config.clip_batch,
        "max_steps": config.clip_calib_steps,
        "split": True,
        "noise_source": config.clip_calib_noise,
    }
    values.update(overrides)
    return run_training(
        calibration_config(world_root, work, config, name, init, **values), target, progress=progress
    )


# ----------------------------------------------------------------------------------- inference
@dataclass
class PromptRun:
    """The VLM's greedy answer to one mini-CoBSAT prompt, with its token features."""

    prompt: MiniPrompt
    answer: str
    features_NH: torch.Tensor
    prompt_features_PH: torch.Tensor

    @property
    def text_correct(self) -> bool:
        """The text answer names the target's shape and detail (the reasoning ceiling)."""
        read = parse_caption(self.answer)
        return all(read.get(k) == v for k, v in self.prompt.target.items())


@torch.no_grad()
def run_vlm(
    world: MiniWorld,
    prompts: Sequence[MiniPrompt],
    *,
    batch_size: int = 64,
    progress: bool = True,
    qcd_alpha: float = 0.0,
    hint: str | None = None,
) -> list[PromptRun]:
    """Greedy answers and features of the VLM for every prompt (batched, left padded).

    ``qcd_alpha``: query-contrastive decoding weight (:mod:`thinkdiff.models.qcd`; the features stay
    the full prompt's); ``hint``: a sentence appended to the CoBSAT instruction.
    """
    from tqdm.auto import tqdm

    from thinkdiff.evaluation.cobsat.protocol import COBSAT_INSTRUCTION
    from thinkdiff.miniworld.components.vlm import max_answer_tokens
    from thinkdiff.models.lvlm import SamplingSettings
    from thinkdiff.pipelines.constants import hinted

    sampling = SamplingSettings(
        max_new_tokens=max_answer_tokens(world.vlm.processor.tokenizer), do_sample=False, qcd_alpha=qcd_alpha
    )
    instruction = hinted(COBSAT_INSTRUCTION, hint)
    runs: list[PromptRun] = []
    for start in tqdm(
        range(0, len(prompts), batch_size), desc="VLM", disable=not progress, dynamic_ncols=True
    ):
        chunk = prompts[start : start + batch_size]
        out = world.vlm.generate(
            [p.items(instruction) for p in chunk], sampling, teacher_forced=True, return_prompt_features=True
        )
        assert out.prompt_features is not None and out.prompt_mask is not None
        for b, prompt in enumerate(chunk):
            n, m = int(out.feature_mask[b].sum()), int(out.prompt_mask[b].sum())
            runs.append(
                PromptRun(
                    prompt,
                    out.texts[b].strip(),
                    out.features[b, :n].clone(),
                    out.prompt_features[b, :m].clone(),
                )
            )
    return runs


Method = Callable[[PromptRun], torch.Tensor]
"""Maps a VLM run to FLUX prompt embeddings [L, D]."""


def prompt_seed(prompt: MiniPrompt) -> int:
    """The sampling seed of one prompt: the same for every method (paired comparisons)."""
    return 123_000_000 + prompt.shot * 100_000 + prompt.task_id * 1000 + prompt.index


@torch.no_grad()
def score_lvlm_methods(
    world: MiniWorld,
    runs: Sequence[PromptRun],
    methods: dict[str, Method],
    *,
    progress: bool = True,
    drawn: DrawnImages | None = None,
    **sampling: Any,
) -> tuple[dict[str, list[bool]], dict[str, np.ndarray]]:
    """Generate one image per run and method and judge it against the prompt's target.

    ``drawn``: images already drawn by this measurement (:class:`DrawnImages`), shared by the
    methods of this call and by later calls given the same one. Returns, per method, a
    correctness list aligned with ``runs``, and the images.
    """
    seeds = [prompt_seed(r.prompt) for r in runs]
    drawn = DrawnImages() if drawn is None else drawn
    correct, images = {}, {}
    for name, method in methods.items():
        embeds = [method(r) for r in runs]
        images[name] = drawn.draw(world, embeds, seeds, **sampling)
        verdicts = world.judge.read(images[name])
        correct[name] = [v.matches(r.prompt.target) for v, r in zip(verdicts, runs)]
        logger.info("%s: %.3f", name, float(np.mean(correct[name])) if correct[name] else float("nan"))
    return correct, images


def aligner_method(aligner: torch.nn.Module, use_prompt: bool = False) -> Method:
    """Embeddings of a run through an aligner: generated-token features, or prompt-token ones."""

    def method(run: PromptRun) -> torch.Tensor:
        return aligner(run.prompt_features_PH if use_prompt else run.features_NH).float()

    return method


# ----------------------------------------------------------------------------------- ThinkDiff-CLIP
def clip_tokens(world: MiniWorld, images_BHWC: np.ndarray) -> torch.Tensor:
    """The vision encoder's pooled tokens [B, 17, D_vision] (BLIP-2 preprocessing)."""
    from thinkdiff.miniworld.components.vision import preprocess

    with torch.no_grad():
        return world.vision(preprocess(images_BHWC))


def clip_test_scenes(n: int, seed: int) -> list[Scene]:
    """Renders for the ThinkDiff-CLIP checks, half from held-out cells (never trained on)."""
    from thinkdiff.miniworld.judge import held_out_scenes

    rng = scene_rng("clip-test", seed)
    held = held_out_scenes(n // 2, seed + 7)
    return held + [sample_scene(rng) for _ in range(n - len(held))]


@torch.no_grad()
def score_clip(
    world: MiniWorld, aligner: torch.nn.Module, n: int, seed: int, **sampling: Any
) -> dict[str, Any]:
    """ThinkDiff-CLIP: attribute preservation (image in), image + text, and two-image composition.

    - *image*: 17 aligned tokens of one render -> FLUX; each attribute read back must equal the input's.
    - *image + text*: the same tokens followed by the T5 states of "on a {colour} background" with a
      new background colour; success = new background while shape and object colour are kept.
    - *composition*: the tokens of two renders A and B; per attribute, is the output's value A's,
      B's or neither; a composition is an output whose every attribute comes from A or B and that
      takes at least one attribute from each.
    """
    scenes = clip_test_scenes(n, seed)
    rng = scene_rng("clip-partner", seed)
    partners = [sample_scene(rng, allow_held_out=True) for _ in scenes]
    images_a = np.stack([render(s) for s in scenes])
    images_b = np.stack([render(s) for s in partners])
    tokens_a = aligner(clip_tokens(world, images_a)).float()
    tokens_b = aligner(clip_tokens(world, images_b)).float()
    seeds = [seed * 10_000 + i for i in range(len(scenes))]
    out: dict[str, Any] = {"n": len(scenes)}

    single = world.images_from_embeds(list(tokens_a), seeds, **sampling)
    verdicts = world.judge.read(single)
    out["image"] = attribute_accuracy(verdicts, scenes)

    new_bg = [
        rng.choice([c for c in ATTRIBUTES["background"] if c not in (s.background, s.color)]) for s in scenes
    ]
    texts = [
        caption(s.shape, background=b).split(" ", 2)[2] for s, b in zip(scenes, new_bg)
    ]  # "on a blue background"
    text_states = world.text_embeds(texts)
    with_text = world.images_from_embeds(
        [torch.cat([t, x]) for t, x in zip(tokens_a, text_states)], seeds, **sampling
    )
    verdicts_t = world.judge.read(with_text)
    out["image_text"] = {
        "background_from_text": float(np.mean([v.background == b for v, b in zip(verdicts_t, new_bg)])),
        "shape_kept": float(np.mean([v.shape == s.shape for v, s in zip(verdicts_t, scenes)])),
        "color_kept": float(np.mean([v.color == s.color for v, s in zip(verdicts_t, scenes)])),
        "all": float(
            np.mean(
                [
                    v.background == b and v.shape == s.shape and v.color == s.color
                    for v, b, s in zip(verdicts_t, new_bg, scenes)
                ]
            )
        ),
    }

    pairs = world.images_from_embeds(
        [torch.cat([a, b]) for a, b in zip(tokens_a, tokens_b)], seeds, **sampling
    )
    verdicts_p = world.judge.read(pairs)
    comp: dict[str, Any] = {}
    composed = 0
    for name in ATTRIBUTES:
        from_a = [v.value(name) == a.value(name) for v, a in zip(verdicts_p, scenes)]
        from_b = [
            v.value(name) == b.value(name) and b.value(name) != a.value(name)
            for v, a, b in zip(verdicts_p, scenes, partners)
        ]
        comp[name] = {"from_a": float(np.mean(from_a)), "from_b": float(np.mean(from_b))}
    for v, a, b in zip(verdicts_p, scenes, partners):
        sources = [
            ({"a"} if v.value(k) == a.value(k) else set()) | ({"b"} if v.value(k) == b.value(k) else set())
            for k in ATTRIBUTES
        ]
        if (
            all(sources)
            and any("a" in s and "b" not in s for s in sources)
            and any("b" in s and "a" not in s for s in sources)
        ):
            composed += 1
    comp["composed"] = composed / len(scenes)
    out["composition"] = comp
    out["examples"] = {
        "inputs_a": images_a[:8],
        "inputs_b": images_b[:8],
        "image": single[:8],
        "image_text": with_text[:8],
        "pairs": pairs[:8],
        "texts": texts[:8],
    }
    return out


ALIGNMENT_REFERENCE = "t5 encoder states (reference)"
"""The last row of :func:`alignment_diagnostics`: the T5 states themselves."""


@torch.no_grad()
def alignment_diagnostics(
    world: MiniWorld,
    runs: Sequence[PromptRun],
    aligners: dict[str, torch.nn.Module],
    *,
    use_prompt: dict[str, bool],
) -> dict[str, dict[str, float]]:
    """Where the aligned features land, seen from both decoders' sides.

    - ``proxy_reads_answer``: the frozen T5 *decoder* (the training proxy), given the aligned
      features, writes a text naming the same shape and detail as the VLM's answer;
    - ``cosine_to_t5_states``: mean cosine between the aligned features and the T5 *encoder*
      states of the VLM's answer, position by position (FLUX was trained on the latter);
    - ``rms`` of the aligned features and of the T5 states.
    """
    from thinkdiff.models.proxy_decoder import ProxyT5Decoder
    from thinkdiff.objectives import pad_features

    proxy = ProxyT5Decoder.from_pretrained(world.root / "t5", device="cpu", dtype=torch.float32)
    states = {r.answer: world.text_embeds([r.answer or " "])[0] for r in runs}
    out = {}
    for name, aligner in aligners.items():
        reads, cosines, rms = [], [], []
        for start in range(0, len(runs), 128):
            chunk = runs[start : start + 128]
            memories = [
                aligner(r.prompt_features_PH if use_prompt.get(name) else r.features_NH) for r in chunk
            ]
            memory, mask = pad_features(memories)  # the proxy decoder takes a padding mask
            texts = proxy.generate_text(memory, mask, max_new_tokens=16)
            for r, text, m in zip(chunk, texts, memories):
                want = {k: v for k, v in parse_caption(r.answer).items() if k in r.prompt.target}
                got = parse_caption(text)
                reads.append(bool(want) and all(got.get(k) == v for k, v in want.items()))
                t5 = states[r.answer]
                n = min(len(t5), len(m))
                cosines.append(mean_cosine(m[:n], t5[:n]))
                rms.append(float(m.pow(2).mean().sqrt()))
        out[name] = {
            "proxy_reads_answer": float(np.mean(reads)),
            "cosine_to_t5_states": float(np.mean(cosines)),
            "rms": float(np.mean(rms)),
        }
    out[ALIGNMENT_REFERENCE] = {
        "proxy_reads_answer": float("nan"),
        "cosine_to_t5_states": 1.0,
        "rms": float(np.mean([float(s.pow(2).mean().sqrt()) for s in states.values()])),
    }
    return out


def mean_cosine(a_LD: torch.Tensor, b_LD: torch.Tensor) -> float:
    """Mean position-wise cosine of two sequences of the same length."""
    return float(torch.nn.functional.cosine_similarity(a_LD, b_LD, dim=-1).mean())

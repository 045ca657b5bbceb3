"""Pre-computing ThinkDiff-LVLM training data: the LVLM describes each image, its token features are saved.

For every image of a source, one of the paper's 16 description prompts is chosen (seeded by the
sample key), the LVLM samples an answer, and the post-final-norm features of the answer's tokens
are written to feature shards (:mod:`thinkdiff.data.feature_shards`), one output shard per input
shard. Two engines produce the same kind of output:

- ``hf``: transformers ``generate``; the features are either recomputed by one teacher-forced pass
  (``features="recompute"``, the default: ``generate`` then keeps no hidden states) or read out of
  ``generate`` (``features="generate"``);
- ``vllm``: stock vLLM samples the tokens, then the same teacher-forced pass computes the features.

The work is split by input shard across ranks, and a rerun skips the shards that are complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from thinkdiff.data.feature_shards import (
    FeatureShardWriter,
    read_shard_records,
    shard_name,
    write_index,
    write_json_atomic,
)
from thinkdiff.data.sharding import rank_and_world_size
from thinkdiff.data.sources import (
    ImageCaptionSample,
    Skip,
    SkipLog,
    SourceShard,
    SourceSpec,
    iter_samples,
    list_source_shards,
)
from thinkdiff.utils import compare_settings, record_changes, remove_debris, temporary_path

if TYPE_CHECKING:
    from PIL import Image

    from thinkdiff.models.lvlm import LVLMFeatureExtractor, LVLMOutput

__all__ = [
    "DESCRIPTION_PROMPTS",
    "ENGINES",
    "ExtractionSettings",
    "ExtractionSummary",
    "FeatureEngine",
    "Generated",
    "HFEngine",
    "VLLMEngine",
    "extract_features",
    "make_engine",
    "merge",
    "write_report",
]

logger = logging.getLogger(__name__)

# The paper's instruction prompts (appendix B), some adapted from LLaVA; one is drawn per image.
# "photo's" has a straight apostrophe as in LLaVA's list (the PDF typesets it curly).
DESCRIPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
    "Generate a prompt that can recreate the image in a 2D diffusion model.",
    "Provide a descriptive prompt to reproduce the given image using a diffusion model.",
    "Create a prompt suitable for a 2D diffusion model to generate the same image.",
    "Summarize the visual details as a prompt for a 2D diffusion model.",
    "Write a clear prompt to guide a 2D diffusion model in recreating the image.",
)

ENGINES: tuple[str, ...] = ("hf", "vllm")
SETTINGS_NAME = "extraction.json"
REPORT_NAME = "report.json"
SKIPPED_NAME = "skipped.jsonl"
CHANGES_NAME = "changes.jsonl"


@dataclass
class ExtractionSettings:
    """What decides the content of the feature shards (a rerun must use the same values)."""

    prompts: tuple[str, ...] = DESCRIPTION_PROMPTS
    """Instruction prompts; one is drawn per image, seeded by ``seed`` and the sample key."""
    temperature: float = 0.6
    """Sampling temperature (the released pre-processing)."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    max_new_tokens: int = 64
    """Most tokens generated per image (64 in the paper)."""
    seed: int = 0
    """Seed of the prompt choice and of the sampling (per input shard and batch)."""
    prompt_features: bool = False
    """Also store the prompt tokens' features (the paper's input-tokens ablation)."""
    samples_per_shard: int = 1000
    """Slice size for folder and manifest sources (a tar file is always one shard)."""
    task_shots: tuple[int, ...] = ()
    """Task-format mode (:mod:`thinkdiff.data.task_prompts`): group consecutive samples into
    interleaved prompts of these many demonstrations (cycled); empty: describe each image."""
    task_text_words: int = 0
    """Task-format mode: words of each caption kept as its short text (0: the whole caption)."""
    greedy: bool = False
    """Decode greedily (as at test time) instead of sampling."""
    qcd_alpha: float = 0.0
    """Query-contrastive decoding weight (:mod:`thinkdiff.models.qcd`; contrast: the prompt without
    its last text: the image alone, or a task prompt without its final word); 0 samples plainly. The
    hf engine only."""
    hint: str | None = None
    """Task-format mode: a sentence appended to the task instruction (``HINT_INSTRUCTION`` is ours)."""

    def __post_init__(self) -> None:
        self.prompts = tuple(self.prompts)
        self.task_shots = tuple(self.task_shots)
        if any(k < 1 for k in self.task_shots) or self.task_text_words < 0:
            raise ValueError("task_shots must be >= 1 and task_text_words >= 0")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.qcd_alpha < 0:
            raise ValueError(f"qcd_alpha must be >= 0, got {self.qcd_alpha}")
        if self.hint is not None and not (self.task_shots and self.hint.strip()):
            raise ValueError("hint applies to the task-format mode (task_shots) and must be a non-empty sentence")

    def prompt_for(self, key: str) -> str:
        """The prompt of one sample: fixed by ``seed`` and the key, whatever the order or rank."""
        return random.Random(f"{self.seed}:{key}").choice(self.prompts)

    def batch_seed(self, shard_index: int, batch_index: int) -> int:
        """Sampling seed of one batch: a redone shard samples exactly the same tokens."""
        return random.Random(f"{self.seed}:{shard_index}:{batch_index}").getrandbits(62)


# ---- engines -------------------------------------------------------------------------------------


@dataclass
class Generated:
    """One sample's answer: N token ids (EOS included if produced), N features, and the text."""

    token_ids_N: torch.Tensor
    features_NH: torch.Tensor
    text: str
    prompt_features_PH: torch.Tensor | None = None


class FeatureEngine(Protocol):
    """Generates answers for (image, prompt) pairs and returns their token features."""

    name: str
    model: str

    def run(self, images: Sequence[Image.Image], prompts: Sequence[str], seed: int) -> list[Generated]: ...


def _split_output(out: LVLMOutput) -> list[Generated]:
    """Per-sample tensors from a padded batch output (valid positions are a prefix of each row)."""
    results = []
    for b, text in enumerate(out.texts):
        n = int(out.feature_mask[b].sum())
        prompt = None
        if out.prompt_features is not None and out.prompt_mask is not None:
            prompt = out.prompt_features[b, : int(out.prompt_mask[b].sum())].cpu()
        results.append(Generated(out.token_ids[b, :n].cpu(), out.features[b, :n].cpu(), text, prompt))
    return results


class HFEngine:
    """transformers ``generate``, then the features (recomputed, or read out of ``generate``)."""

    name = "hf"

    def __init__(
        self,
        extractor: LVLMFeatureExtractor,
        settings: ExtractionSettings,
        *,
        features: str = "recompute",
        model: str = "",
    ) -> None:
        if features not in ("recompute", "generate"):
            raise ValueError(f"features must be 'recompute' or 'generate', got {features!r}")
        self.extractor = extractor
        self.settings = settings
        self.features = features
        self.model = model

    def run(self, images: Sequence[Image.Image], prompts: Sequence[str], seed: int) -> list[Generated]:
        return self.run_items([[image, prompt] for image, prompt in zip(images, prompts)], seed)

    def run_items(self, items: Sequence[list[Any]], seed: int) -> list[Generated]:
        """Answers to interleaved inputs (texts and PIL images), e.g. task-format prompts."""
        from thinkdiff.models.lvlm import SamplingSettings

        sampling = SamplingSettings(
            do_sample=not self.settings.greedy,
            max_new_tokens=self.settings.max_new_tokens,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            seed=seed,
            qcd_alpha=self.settings.qcd_alpha,
        )
        out = self.extractor.generate(
            list(items),
            sampling,
            teacher_forced=self.features == "recompute",
            return_prompt_features=self.settings.prompt_features,
        )
        return _split_output(out)


class VLLMEngine:
    """Stock vLLM samples the tokens; one teacher-forced pass of the HF model computes the features.

    Both models sit on the same GPU: vLLM gets ``gpu_memory_utilization`` of it (weights + KV
    cache), the HF model and its single forward pass the rest.
    """

    name = "vllm"

    def __init__(
        self,
        extractor: LVLMFeatureExtractor,
        settings: ExtractionSettings,
        *,
        model: str,
        model_dir: str,
        gpu_memory_utilization: float = 0.5,
        feature_batch_size: int = 16,
        enforce_eager: bool = False,
    ) -> None:
        vllm = _import_vllm()
        self.feature_batch_size = feature_batch_size
        self.extractor = extractor
        self.settings = settings
        self.model = model
        self._sampling_params = vllm.SamplingParams
        self.bad_words = _vision_bad_words(extractor)
        self.llm = vllm.LLM(
            **vllm_engine_args(
                extractor,
                settings,
                model_dir=model_dir,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
            )
        )

    def run(self, images: Sequence[Image.Image], prompts: Sequence[str], seed: int) -> list[Generated]:
        items = [[image, prompt] for image, prompt in zip(images, prompts)]
        # The same chat text the HF processor builds; vLLM expands the image placeholder itself.
        requests = [
            {"prompt": self.extractor.chat_text(item), "multi_modal_data": {"image": image}}
            for item, image in zip(items, images)
        ]
        params = [
            self._sampling_params(
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                max_tokens=self.settings.max_new_tokens,
                seed=seed + i,
                bad_words=self.bad_words,  # the vision tokens the hf engine suppresses
            )
            for i in range(len(items))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        token_ids = [list(o.outputs[0].token_ids) or [self.extractor.eos_token_ids[0]] for o in outputs]
        # vLLM wants large batches; the feature pass holds every position's activations at once, so
        # it runs on slices of the batch.
        results: list[Generated] = []
        for start in range(0, len(items), self.feature_batch_size):
            stop = start + self.feature_batch_size
            inputs = self.extractor.prepare_inputs(items[start:stop])
            out = self.extractor.features_from_tokens(
                inputs, token_ids[start:stop], return_prompt_features=self.settings.prompt_features
            )
            results.extend(_split_output(out))
        return results


VLLM_MIN_VERSION = "0.19.1"
"""The first vLLM whose requirements admit transformers 5 (vllm-project/vllm#30566); 0.10 to 0.19.0
pin ``transformers >= 4.56, < 5``."""

VLLM_TEXT_TOKENS = 512
"""Prompt tokens besides the image in ``max_model_len``: the chat template, system prompt and
instruction (about 40 with the description prompts), with room for a longer prompts file."""


def _vision_bad_words(extractor: LVLMFeatureExtractor) -> list[str]:
    """The vision special tokens as vLLM ``bad_words``; vLLM tokenizes each word, so each must be
    exactly its one token (a single-token bad word gets a -inf logit at every step)."""
    tokenizer = extractor.processor.tokenizer
    words = tokenizer.convert_ids_to_tokens(extractor.vision_token_ids)
    for word, token_id in zip(words, extractor.vision_token_ids):
        if tokenizer.encode(word, add_special_tokens=False) != [token_id]:
            raise ValueError(
                f"vision token {word!r} does not tokenize to its own id {token_id}: cannot ban it in vLLM"
            )
    return words


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ValueError(
            "the vllm engine needs vLLM, which is not installed here; on a CUDA machine run "
            "pip install 'thinkdiff[vllm]', or use --engine hf"
        ) from exc
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        declared = requires("vllm") or []
        installed_transformers = version("transformers")
    except PackageNotFoundError:  # a source checkout on the path: nothing declared to check
        declared, installed_transformers = [], None
    problem = vllm_install_problem(vllm.__version__, declared, installed_transformers)
    if problem:
        raise ValueError(problem)
    return vllm


def vllm_install_problem(
    vllm_version: str, vllm_requires: Sequence[str], transformers_version: str | None
) -> str | None:
    """Why this vLLM cannot run beside this transformers (one line), or ``None`` when it can.

    ``vllm_requires`` are vLLM's declared requirements (``importlib.metadata.requires("vllm")``):
    a vLLM installed with ``--no-deps`` or forced beside a transformers outside its range fails
    later, inside its engine process, with a far less clear error.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import Version

    if Version(vllm_version) < Version(VLLM_MIN_VERSION):
        return (
            f"vLLM {vllm_version} is too old for the vllm engine: it needs vLLM >= {VLLM_MIN_VERSION}, "
            "the first that runs beside transformers 5; run pip install 'thinkdiff[vllm]'"
        )
    if transformers_version is None:
        return None
    for line in vllm_requires:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.name != "transformers" or (requirement.marker and not requirement.marker.evaluate()):
            continue
        if not requirement.specifier.contains(transformers_version, prereleases=True):
            return (
                f"vLLM {vllm_version} requires transformers{requirement.specifier} but transformers "
                f"{transformers_version} is installed; install a vLLM that admits it "
                "(pip install 'thinkdiff[vllm]' picks one) or use --engine hf"
            )
    return None


def vllm_engine_args(
    extractor: LVLMFeatureExtractor,
    settings: ExtractionSettings,
    *,
    model_dir: str,
    gpu_memory_utilization: float = 0.5,
    enforce_eager: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for the extraction (no vLLM needed to compute them).

    - The image size cap is the HF processor's own ``size`` (``shortest_edge`` / ``longest_edge``
      in pixels), passed as the non-deprecated ``size`` processor argument: the feature pass must
      see the very image tokens vLLM generated from.
    - ``max_model_len`` fits one image at that cap, the prompt text and the answer, instead of the
      model's 32768: vLLM profiles its memory at startup with max-size dummy inputs.
    - Video is off (limit 0): vLLM would otherwise also profile a maximum-size video.
    """
    processor = extractor.processor.image_processor
    size = {"shortest_edge": int(processor.size["shortest_edge"]), "longest_edge": int(processor.size["longest_edge"])}
    # One visual token per merged patch: (patch_size * merge_size)^2 pixels (28 x 28 for Qwen2-VL).
    image_tokens = size["longest_edge"] // (processor.patch_size * processor.merge_size) ** 2
    return {
        "model": model_dir,
        "dtype": "bfloat16",
        "seed": settings.seed,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": image_tokens + VLLM_TEXT_TOKENS + settings.max_new_tokens,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "mm_processor_kwargs": {"size": size},
        "enforce_eager": enforce_eager,
    }


def _vllm_device(device: str | None) -> str:
    """The device of the feature pass beside vLLM: ``cuda:0``, the first visible GPU (or the CPU).

    vLLM takes no device argument; its engine always sits on the first visible GPU. A device
    index other than 0, or a second local rank that sees the same GPUs, would silently put
    several engines (or the engine and the feature pass) on different or shared GPUs.
    """
    chosen = torch.device(device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if chosen.type != "cuda":
        return str(chosen)  # vLLM's CPU backend
    if chosen.index not in (None, 0):
        raise ValueError(
            f"--device {device} cannot apply to vLLM, which always takes the first visible GPU: "
            f"select that GPU with CUDA_VISIBLE_DEVICES={chosen.index} instead"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if local_rank > 0 and (visible is None or len([d for d in visible.split(",") if d.strip()]) != 1):
        raise ValueError(
            f"LOCAL_RANK={local_rank} with --engine vllm: vLLM always takes the first visible GPU, so every "
            "rank would share one; start each rank with only its own GPU visible "
            "(CUDA_VISIBLE_DEVICES=$LOCAL_RANK)"
        )
    return "cuda:0"


def make_engine(
    engine: str,
    model: str,
    settings: ExtractionSettings,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    hf_features: str = "recompute",
    max_pixels: int | None = None,
    gpu_memory_utilization: float = 0.5,
    enforce_eager: bool = False,
) -> FeatureEngine:
    """Load the LVLM (hub id or folder) behind the named engine (``"hf"`` or ``"vllm"``).

    ``device`` defaults to ``cuda:$LOCAL_RANK`` when a GPU is present, else the CPU. With vLLM it
    must be the first visible GPU (one process per GPU: ``CUDA_VISIBLE_DEVICES`` per rank).
    ``enforce_eager``: vLLM without CUDA graphs or torch.compile (a quick start for small runs).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    if engine == "vllm" and settings.qcd_alpha > 0:
        # vLLM samples inside its own engine loop, with no hook to run a second (contrast) prompt
        # in step with each request short of patching it.
        raise ValueError("--qcd-alpha > 0 needs the hf engine: vLLM cannot run query-contrastive decoding")
    if engine == "vllm" and settings.task_shots:
        raise ValueError("task-format prompts (--task-shots) hold several images: use the hf engine")
    if engine == "vllm":
        _import_vllm()  # fail before loading anything
    from thinkdiff.models.loading import resolve_model_dir
    from thinkdiff.models.lvlm import LVLMFeatureExtractor

    if engine == "vllm":
        device = _vllm_device(device)
    elif device is None and torch.cuda.is_available():
        # One process per GPU under torchrun / accelerate: each takes its local GPU, not all cuda:0.
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    folder = resolve_model_dir(model, kind="LVLM")
    name = recorded_model_name(model)
    extractor = LVLMFeatureExtractor.from_pretrained(
        folder, device=device, dtype=dtype, max_pixels=max_pixels
    )
    if engine == "vllm":
        return VLLMEngine(
            extractor,
            settings,
            model=name,
            model_dir=str(folder),
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
        )
    return HFEngine(extractor, settings, features=hf_features, model=name)


# ---- the extraction loop -------------------------------------------------------------------------


@dataclass
class ExtractionSummary:
    """What one process did."""

    rank: int
    world_size: int
    shards_assigned: int
    shards_done_before: int = 0
    shards_written: int = 0
    samples_written: int = 0
    bytes_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_sample(self) -> float:
        return self.bytes_written / self.samples_written if self.samples_written else 0.0

    def __str__(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items()) or "none"
        return (
            f"rank {self.rank}/{self.world_size}: {self.shards_written} shards written, "
            f"{self.shards_done_before} already complete (of {self.shards_assigned}); "
            f"{self.samples_written} samples, skipped: {skipped}; "
            f"{self.bytes_per_sample / 1024:.1f} KiB/sample; "
            f"{self.samples_per_second:.2f} samples/s over {self.seconds:.1f} s"
        )


def recorded_model_name(model: str | Path) -> str:
    """How an LVLM is recorded in ``extraction.json``: a local folder by its absolute path (so that
    a resume from elsewhere matches), a hub id or ``tiny:`` name as it is."""
    return str(Path(model).expanduser().resolve()) if Path(model).expanduser().is_dir() else str(model)


def _run_settings(
    model_name: str, shards: Sequence[SourceShard], settings: ExtractionSettings, batch_size: int
) -> dict[str, Any]:
    return {
        "model": model_name,
        "source_shards": [s.name for s in shards],
        **asdict(settings),
        "prompts": list(settings.prompts),
        # The batch decides the sampling seeds and the padding: a redone shard must match.
        "batch_size": batch_size,
    }


def check_settings_before_loading(
    out_dir: str | Path,
    model: str,
    source: SourceSpec,
    settings: ExtractionSettings,
    *,
    batch_size: int,
    engine: str,
    hf_features: str | None,
    allow_change: Sequence[str] = (),
) -> None:
    """The settings check of :func:`extract_features`, on what is known before the LVLM is loaded
    (a refused rerun should not first load a 7B model); nothing is written."""
    if not (Path(out_dir) / SETTINGS_NAME).is_file():
        return
    shards = list_source_shards(source, samples_per_shard=settings.samples_per_shard)
    current = {
        **_run_settings(recorded_model_name(model), shards, settings, batch_size),
        "engine": engine,
        "hf_features": hf_features if engine == "hf" else None,
    }
    _check_settings(Path(out_dir), current, allow_change, write=False)


def _check_settings(
    out_dir: Path, current: dict[str, Any], allow_change: Sequence[str] = (), *, write: bool = True, record: bool = True
) -> None:
    """Write the run's settings, or check that a rerun into the same folder uses the same ones.

    A difference is refused (naming the fields) unless the field is in ``allow_change``; with
    ``write``, an allowed change becomes the folder's setting and is appended to ``changes.jsonl``
    (by the process with ``record``, so ranks do not record it twice).
    """
    path = out_dir / SETTINGS_NAME
    if not path.is_file():
        if write:
            write_json_atomic(path, current)
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path} (the settings this folder was written with): {exc}") from exc
    known = sorted(set(current) | set(saved))
    unknown = sorted(set(allow_change) - set(known))
    if unknown:
        raise ValueError(f"--allow-change: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    changes = compare_settings(saved, current, allowed=allow_change, where=out_dir)
    if not write:
        return
    # Settings an older version did not record are taken as this run's (they cannot be compared).
    if changes or set(current) - set(saved):
        write_json_atomic(path, {**saved, **current})
    if record:
        for change in changes:
            logger.warning("%s: %s changed from %r to %r (allowed)", out_dir, change["field"], change["old"], change["new"])
        record_changes(out_dir / CHANGES_NAME, changes)


def _engine_settings(engine: FeatureEngine) -> dict[str, Any]:
    """What of the engine decides the features besides :class:`ExtractionSettings`: its kind, how
    the hf engine gets the features, the LVLM's dtype and its image-size cap."""
    extractor = getattr(engine, "extractor", None)
    model = getattr(extractor, "model", None)
    image_processor = getattr(getattr(extractor, "processor", None), "image_processor", None)
    size = getattr(image_processor, "size", None)
    return {
        "engine": engine.name,
        "hf_features": getattr(engine, "features", None),
        "dtype": str(getattr(model, "dtype", None)),
        # A dict, or transformers' SizeDict (no keys(); dict() of it keeps the fields that are set).
        "image_size": dict(sorted(dict(size).items())) if size is not None else None,
    }


def _batches(samples: Iterator[ImageCaptionSample], size: int) -> Iterator[list[ImageCaptionSample]]:
    batch: list[ImageCaptionSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _expected_samples(shard: SourceShard) -> int | None:
    """Samples in a shard when known without reading it (slices; img2dataset's ``*_stats.json``)."""
    if shard.stop is not None:
        return shard.stop - shard.start
    stats = Path(shard.url).with_name(Path(shard.url).stem + "_stats.json")
    try:
        with open(stats, encoding="utf-8") as f:
            return int(json.load(f)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_engine(
    engine: FeatureEngine, batch: list[ImageCaptionSample], prompts: list[str], seed: int, skips: SkipLog
) -> list[Generated | None]:
    """Run a batch; if it fails, run its samples one by one and skip those that fail alone.

    An image the LVLM cannot take (an extreme aspect ratio the processor rejects, one so large it
    runs out of memory) must cost that sample, not the run.
    """
    try:
        return list(engine.run([s.image for s in batch], prompts, seed))
    except (ValueError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if len(batch) == 1:
            skips(Skip(batch[0].key, batch[0].shard, "lvlm_error", f"{type(exc).__name__}: {exc}"[:500]))
            return [None]
        logger.warning("a batch failed (%s: %s); retrying its samples one by one", type(exc).__name__, exc)
    results: list[Generated | None] = []
    for i, (sample, prompt) in enumerate(zip(batch, prompts)):
        results.extend(_run_engine(engine, [sample], [prompt], seed + 1 + i, skips))
    return results


def _extract_shard(
    shard: SourceShard,
    out_dir: Path,
    engine: FeatureEngine,
    settings: ExtractionSettings,
    batch_size: int,
    bar: Any,
) -> dict[str, Any]:
    for stale in out_dir.glob(f"{shard_name(shard.index)}.*.tmp"):
        stale.unlink()  # left by a killed run
    if settings.task_shots:
        from thinkdiff.data.task_prompts import extract_task_shard

        return extract_task_shard(shard, out_dir, engine, settings, batch_size, bar)
    skips = SkipLog()
    started = time.perf_counter()
    with FeatureShardWriter(out_dir, shard.index, prompt_features=settings.prompt_features) as writer:
        for batch_index, batch in enumerate(_batches(iter_samples(shard, skips), batch_size)):
            prompts = [settings.prompt_for(s.key) for s in batch]
            seed = settings.batch_seed(shard.index, batch_index)
            results = _run_engine(engine, batch, prompts, seed, skips)
            for sample, prompt, result in zip(batch, prompts, results):
                if result is None:
                    continue
                writer.add(
                    sample.key,
                    result.token_ids_N,
                    result.features_NH,
                    prompt=prompt,
                    text=result.text,
                    prompt_features_PH=result.prompt_features_PH,
                    caption=sample.caption,
                )
            bar.update(len(batch))
        # A few samples the LVLM rejects are data; most of a shard failing is a bug or a broken setup,
        # and must not be recorded as a complete shard (a rerun would never redo it).
        failed = [s for s in skips.skips if s.reason == "lvlm_error"]
        if len(failed) >= 2 and 2 * len(failed) > len(failed) + writer.num_samples:
            raise RuntimeError(
                f"{len(failed)} samples of {shard.name} failed in the LVLM, e.g. {failed[0].detail}"
            )
        return writer.finish(
            {
                "source": shard.name,
                "engine": engine.name,
                "seconds": round(time.perf_counter() - started, 3),
                "skipped": skips.counts(),
                "skipped_samples": [s.to_json() for s in skips.skips],
            }
        )


def extract_features(
    source: SourceSpec,
    out_dir: str | Path,
    engine: FeatureEngine,
    settings: ExtractionSettings | None = None,
    *,
    batch_size: int = 8,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    allow_change: Sequence[str] = (),
) -> ExtractionSummary:
    """Write the feature shards of this rank's input shards into ``out_dir``; skip complete ones.

    Input shard ``i`` becomes output shard ``shard-{i:06d}``; rank ``r`` of ``w`` takes shards
    ``r, r + w, ...`` (``rank``/``world_size`` default to the environment, see
    :func:`thinkdiff.data.sharding.rank_and_world_size`). Ends by merging every complete shard into
    ``index.json`` and writing ``report.json`` / ``skipped.jsonl``. A rerun must use the settings
    the folder was written with, except those named in ``allow_change`` (recorded in
    ``changes.jsonl``).
    """
    from tqdm.auto import tqdm

    settings = settings or ExtractionSettings()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world_size = rank_and_world_size(rank, world_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is an existing file")
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_debris(out_dir)  # of killed runs; a live rank's temporary files are kept
    if removed:
        logger.info("%s: removed %d temporary files of killed runs: %s", out_dir, len(removed), ", ".join(removed))
    shards = list_source_shards(source, samples_per_shard=settings.samples_per_shard)
    _check_settings(
        out_dir,
        {**_run_settings(engine.model, shards, settings, batch_size), **_engine_settings(engine)},
        allow_change,
        record=rank == 0,
    )
    mine = shards[rank::world_size]
    done = {r["name"] for r in read_shard_records(out_dir)}
    todo = [s for s in mine if shard_name(s.index) not in done]
    summary = ExtractionSummary(rank, world_size, len(mine), shards_done_before=len(mine) - len(todo))
    logger.info(
        "rank %d/%d: %d of %d input shards to do (%d already complete)",
        rank, world_size, len(todo), len(mine), summary.shards_done_before,
    )  # fmt: skip

    expected = [_expected_samples(s) for s in todo]
    started = time.perf_counter()
    counts: Counter[str] = Counter()
    with tqdm(
        total=sum(e for e in expected if e is not None) or None,
        unit="sample",
        desc=f"rank {rank}" if world_size > 1 else "extract",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for i, shard in enumerate(todo):
            record = _extract_shard(shard, out_dir, engine, settings, batch_size, bar)
            summary.shards_written += 1
            summary.samples_written += record["num_samples"]
            summary.bytes_written += sum(f["bytes"] for f in record["files"].values())
            counts.update(record["skipped"])
            # Re-estimate the total for the ETA; shards of unknown size (tars without img2dataset's
            # stats) count as the mean of the shards done so far.
            mean = summary.samples_written / summary.shards_written
            rest = expected[i + 1 :]
            bar.total = bar.n + int(sum(e if e is not None else mean for e in rest))
            bar.refresh()
    summary.seconds = time.perf_counter() - started
    summary.skipped = dict(sorted(counts.items()))
    merge(out_dir)
    return summary


def merge(out_dir: str | Path) -> dict[str, Any]:
    """Rebuild ``index.json``, ``report.json`` and ``skipped.jsonl`` from the complete shards.

    Each rank does this when it finishes; run it once more after all ranks of a multi-node run
    are done (``thinkdiff extract-features --merge-only``). Returns the report.
    """
    out_dir = Path(out_dir)
    path = out_dir / SETTINGS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} holds no {SETTINGS_NAME}: not an extract-features output folder")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    index = write_index(out_dir, num_source_shards=len(saved["source_shards"]), model=saved["model"])
    return write_report(out_dir, index)


def write_report(out_dir: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Write ``report.json`` (totals, skips per reason, bytes per sample) and ``skipped.jsonl``
    (one line per skipped sample: key, shard, reason, detail) from the complete shards."""
    out_dir = Path(out_dir)
    records = read_shard_records(out_dir)
    tmp = temporary_path(out_dir / SKIPPED_NAME)
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            for skip in record.get("skipped_samples", []):
                f.write(json.dumps(skip, ensure_ascii=False) + "\n")
    tmp.replace(out_dir / SKIPPED_NAME)
    total_bytes = sum(f["bytes"] for r in records for f in r["files"].values())
    feature_bytes = sum(r["files"]["features"]["bytes"] for r in records)
    samples = index["num_samples"]
    report = {
        "complete": index["complete"],
        "num_shards": index["num_shards"],
        "num_source_shards": index["num_source_shards"],
        "num_samples": samples,
        "num_tokens": index["num_tokens"],
        "skipped": index["skipped"],
        "bytes_per_sample": total_bytes / samples if samples else None,
        "feature_bytes_per_sample": feature_bytes / samples if samples else None,
        "extraction_seconds": sum(r.get("seconds", 0.0) for r in records),
    }
    write_json_atomic(out_dir / REPORT_NAME, report)
    return report

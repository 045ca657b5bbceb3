"""The engines that answer (image, prompt) pairs with an LVLM and return the answer's token features.

Two engines produce the same kind of output:

- ``hf``: transformers ``generate``; the features are either recomputed by one teacher-forced pass
  (``features="recompute"``, the default: ``generate`` then keeps no hidden states) or read out of
  ``generate`` (``features="generate"``);
- ``vllm``: stock vLLM samples the tokens, then the same teacher-forced pass computes the features.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from thinkdiff.data.extraction_settings import ExtractionSettings, recorded_model_name

if TYPE_CHECKING:
    from PIL import Image

    from thinkdiff.models.lvlm import LVLMFeatureExtractor, LVLMOutput

__all__ = [
    "ENGINES",
    "VLLM_MIN_VERSION",
    "VLLM_TEXT_TOKENS",
    "FeatureEngine",
    "Generated",
    "HFEngine",
    "VLLMEngine",
    "make_engine",
    "vllm_engine_args",
    "vllm_install_problem",
]

ENGINES: tuple[str, ...] = ("hf", "vllm")


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

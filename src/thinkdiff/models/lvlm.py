"""ThinkDiff-LVLM features: the deep features of the tokens a Qwen2-VL / Qwen2.5-VL generates.

The paper (section 3.3) feeds the aligner with the LVLM's final-RMSNorm hidden states (the input of
``lm_head``) of the tokens the LVLM generates from an interleaved image + text prompt. Feature ``i``
is the state that *produced* generated token ``i``: the first one is the state at the last prompt
position, the last one the state after generated token ``N - 2``.

Two ways give the same features (within float tolerance):

- :meth:`LVLMFeatureExtractor.generate` reads them out of ``model.generate(output_hidden_states=True)``;
- :meth:`LVLMFeatureExtractor.features_from_tokens` runs ONE teacher-forced forward pass over the prompt
  followed by already generated tokens, so that a fast engine (vLLM, ...) can do the sampling.

Conventions:

- Prompts are left padded (batched generation needs the last prompt token at the same index).
- ``feature_mask`` is True up to AND INCLUDING the first end-of-sequence token and False after it.
  The EOS-producing state is a real state conditioned on the whole answer (it is what decided the
  answer was complete), and generation engines return the EOS among the generated ids; the decoded
  text skips it. With ``min_new_tokens == max_new_tokens`` (the inference mode) no EOS is produced.
- ``features`` and ``prompt_features`` both hold their valid positions first: ``x[b, :mask[b].sum()]``.
- dtype: bfloat16 on GPU, float32 on CPU, unless given.

Shape legend: B batch, P prompt length (padded), N generated tokens, H hidden size, L = P + N - 1.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    BatchFeature,
    GenerationConfig,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from thinkdiff.imaging import open_rgb, to_rgb
from thinkdiff.models.qcd import query_contrastive_processor
from thinkdiff.pipelines.constants import DEFAULT_INSTRUCTION

__all__ = [
    "PROMPT_FILE",
    "SYSTEM_PROMPT",
    "Item",
    "LVLMFeatureExtractor",
    "LVLMOutput",
    "SamplingSettings",
    "load_lvlm",
    "load_processor",
    "own_instruction",
    "recorded_instruction",
    "vision_token_ids",
]

SYSTEM_PROMPT = "You are a helpful assistant."

PROMPT_FILE = "thinkdiff_prompt.json"
"""Optional file in an LVLM folder, ``{"instruction": "..."}``: the instruction that LVLM was trained
to read, when it is not the release's :data:`~thinkdiff.pipelines.constants.DEFAULT_INSTRUCTION`
(the mini world's VLM learnt the instruction without its closing blank line, as one token)."""

Item = str | Image.Image | os.PathLike
"""One piece of a prompt: ``str`` is text; a PIL image or an ``os.PathLike`` (image file) is an image."""

_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}


class _Qwen2VLProcessorNoVideo(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor, which cannot load without torchvision.

    ``ProcessorMixin`` derives the sub-processors from the ``__init__`` signature, so leaving
    ``video_processor`` out of it is what drops the part.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class _Qwen2_5_VLProcessorNoVideo(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without its video processor (see :class:`_Qwen2VLProcessorNoVideo`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


_IMAGE_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": _Qwen2VLProcessorNoVideo,
    "qwen2_5_vl": _Qwen2_5_VLProcessorNoVideo,
}


def vision_token_ids(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of the vision special tokens: the config's ``*_token_id`` fields and the tokenizer's
    special tokens that name an image, a video or vision (placeholders, vision start/end/pad).

    The LVLM must never sample one: the teacher-forced feature pass would take a sampled image
    placeholder for a slot of the prompt's image and miscount (the sample is then lost).
    """
    ids = {
        value
        for name, value in config.to_dict().items()
        if name.endswith("_token_id") and any(w in name for w in _VISION_WORDS) and isinstance(value, int)
    }
    ids |= {
        tokenizer.convert_tokens_to_ids(token)
        for token in tokenizer.all_special_tokens
        if any(w in token.lower() for w in _VISION_WORDS)
    }
    return sorted(ids)


_VISION_WORDS = ("vision", "image", "video")


def _model_type(name_or_path: str | Path) -> str:
    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type not in _MODEL_CLASSES:
        raise ValueError(
            f"unsupported LVLM model_type {model_type!r} in {name_or_path}; supported: {sorted(_MODEL_CLASSES)}"
        )
    return model_type


def load_processor(name_or_path: str | Path, max_pixels: int | None = None) -> ProcessorMixin:
    """Load the Qwen2-VL / Qwen2.5-VL processor (tokenizer + image processor + chat template).

    Falls back to an image-only processor where torchvision is missing (the video processor needs
    it; ThinkDiff never passes videos). ``max_pixels`` caps the image resolution (and so the number
    of visual tokens, ``max_pixels / 28**2``); ``None`` keeps the checkpoint's setting.
    """
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except ImportError:
        processor = _IMAGE_ONLY_PROCESSORS[_model_type(name_or_path)].from_pretrained(name_or_path)
    if max_pixels is not None:
        smallest = int(processor.image_processor.size["shortest_edge"])
        if max_pixels < smallest:
            # The image processor fails on every image otherwise (each sample lost as an LVLM error).
            raise ValueError(
                f"max_pixels {max_pixels} is below the {smallest} pixels that {name_or_path}'s processor "
                "resizes every image to at least"
            )
        processor.image_processor.size["longest_edge"] = max_pixels
    return processor


def load_lvlm(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantization_config: Any = None,
) -> PreTrainedModel:
    """Load a Qwen2-VL or Qwen2.5-VL (hub id or local folder), frozen and in eval mode.

    ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on GPU and float32 on CPU.
    ``quantization_config``: a transformers quantization config (see
    :func:`thinkdiff.models.quantization.transformers_quantization`), applied while loading.
    Raises ``ValueError`` for any other ``model_type``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model_class = _MODEL_CLASSES[_model_type(name_or_path)]
    quantized = {} if quantization_config is None else {"quantization_config": quantization_config}
    model = model_class.from_pretrained(name_or_path, dtype=dtype, device_map=str(device), **quantized)
    return model.eval().requires_grad_(False)


def recorded_instruction(folder: str | Path) -> str | None:
    """The instruction ``folder``'s :data:`PROMPT_FILE` records, or ``None`` (no file, or a hub id).

    Raises ``ValueError`` naming the file when it is not ``{"instruction": "<non-empty text>"}``.
    """
    path = Path(folder) / PROMPT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from None
    instruction = record.get("instruction") if isinstance(record, dict) else None
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f'{path}: expected {{"instruction": "<text>"}} with a non-empty instruction')
    return instruction


def own_instruction(text: str, instruction: str) -> str:
    """``text`` with the release's instruction at its start replaced by ``instruction``.

    Callers write prompts with :data:`~thinkdiff.pipelines.constants.DEFAULT_INSTRUCTION`, hinted or
    not (``"<body> <hint>\n\n"``, see :func:`~thinkdiff.pipelines.constants.hinted`). An LVLM that
    was trained on another instruction reads that one, hint kept: the part between the release
    body and its closing blank line moves between the recorded body and its own ending. Any other
    text is returned unchanged.
    """
    body = DEFAULT_INSTRUCTION.rstrip()
    ending = DEFAULT_INSTRUCTION[len(body) :]
    if text == instruction or not text.startswith(body) or not text.endswith(ending):
        return text
    middle = text[len(body) : len(text) - len(ending)]
    if middle and not middle.startswith(" "):  # another sentence that happens to begin alike
        return text
    own_body = instruction.rstrip()
    return f"{own_body}{middle}{instruction[len(own_body) :]}"


@dataclass
class SamplingSettings:
    """How the LVLM samples its answer (defaults: the released training-data settings)."""

    max_new_tokens: int = 256
    """Most tokens generated per prompt (the released config: 256; the paper says 64)."""
    min_new_tokens: int = 0
    """EOS is suppressed until this many tokens exist; set it to ``max_new_tokens`` for exactly N tokens."""
    do_sample: bool = True
    """Sample (True) or decode greedily (False)."""
    temperature: float = 0.6
    """Softmax temperature when sampling."""
    top_p: float = 0.9
    """Nucleus sampling mass when sampling (no top-k cut, like vLLM's default)."""
    seed: int | None = None
    """Seed for the sampling RNG (forked, so the global RNG is untouched); ``None`` uses the global RNG."""
    qcd_alpha: float = 0.0
    """Query-contrastive decoding weight (:mod:`thinkdiff.models.qcd`); 0 samples plainly."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.qcd_alpha < 0:
            raise ValueError(f"qcd_alpha must be >= 0, got {self.qcd_alpha}")

    @classmethod
    def exactly(cls, num_tokens: int = 128, **kwargs) -> SamplingSettings:
        """The inference mode: exactly ``num_tokens`` tokens, EOS never produced."""
        return cls(max_new_tokens=num_tokens, min_new_tokens=num_tokens, **kwargs)


@dataclass
class LVLMOutput:
    """What the extractor returns for a batch of B prompts."""

    token_ids: torch.Tensor
    """[B, N] long: generated token ids; after an early EOS they are padding."""
    texts: list[str]
    """B decoded answers (special tokens skipped, nothing after EOS)."""
    features: torch.Tensor
    """[B, N, H]: final-norm states; ``features[:, i]`` produced ``token_ids[:, i]``."""
    feature_mask: torch.Tensor
    """[B, N] bool: True up to and including the first EOS."""
    prompt_features: torch.Tensor | None = None
    """[B, P, H]: final-norm states of the prompt tokens, valid positions first (the paper's ablation)."""
    prompt_mask: torch.Tensor | None = None
    """[B, P] bool: True for real prompt tokens."""


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the RNG inside the block only; ``generate`` takes no ``torch.Generator``."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _valid_first(x_BPH: torch.Tensor, mask_BP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid positions to the front, keeping their order (left -> right padding)."""
    order_BP = torch.argsort((~mask_BP).int(), dim=1, stable=True)
    x_BPH = x_BPH.gather(1, order_BP[..., None].expand_as(x_BPH))
    return x_BPH, mask_BP.gather(1, order_BP)


class LVLMFeatureExtractor:
    """Generate with a Qwen2-VL / Qwen2.5-VL and return the generated tokens' deep features.

    Use :meth:`from_pretrained` to load by hub id or folder. Prompts are lists of :data:`Item`; a batch
    is a list of prompts. See the module docstring for the conventions (EOS, padding, dtype).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        max_images: int = 16,
        instruction: str | None = None,
    ) -> None:
        if model.config.model_type not in _MODEL_CLASSES:
            raise ValueError(
                f"unsupported LVLM model_type {model.config.model_type!r}; supported: {sorted(_MODEL_CLASSES)}"
            )
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.max_images = max_images
        self.instruction = instruction
        """The instruction this LVLM was trained to read, rendered in place of the release's
        (:func:`own_instruction`); ``None``: the release's, as written."""
        gen_config = model.generation_config
        eos = (
            gen_config.eos_token_id
            if gen_config.eos_token_id is not None
            else processor.tokenizer.eos_token_id
        )
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos)
        pad = gen_config.pad_token_id
        self.pad_token_id: int = pad if pad is not None else processor.tokenizer.pad_token_id
        # Never sampled, by either engine (see vision_token_ids).
        self.vision_token_ids: list[int] = [
            i for i in vision_token_ids(model.config, processor.tokenizer) if i not in self.eos_token_ids
        ]

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_images: int = 16,
        max_pixels: int | None = None,
        quantization_config: Any = None,
    ) -> LVLMFeatureExtractor:
        """Load model and processor (see :func:`load_lvlm` and :func:`load_processor`), and the
        folder's recorded instruction (:data:`PROMPT_FILE`)."""
        instruction = recorded_instruction(name_or_path)  # first: cheap checks before the weights
        processor = load_processor(name_or_path, max_pixels=max_pixels)  # it checks max_pixels
        model = load_lvlm(name_or_path, device=device, dtype=dtype, quantization_config=quantization_config)
        return cls(model, processor, max_images=max_images, instruction=instruction)

    @property
    def hidden_size(self) -> int:
        """H, the size of one feature (3584 for Qwen2-VL-7B)."""
        return self.model.config.text_config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- prompts -------------------------------------------------------------------------------

    def _load_items(self, items: Sequence[Item]) -> tuple[list[dict], list[Image.Image]]:
        """Chat content entries and the images they refer to, in order."""
        if isinstance(items, str | Image.Image | os.PathLike) or len(items) == 0:
            raise ValueError(f"a prompt must be a non-empty list of text and images, got {items!r}")
        content: list[dict] = []
        images: list[Image.Image] = []
        for item in items:
            if isinstance(item, str):
                text = item if self.instruction is None else own_instruction(item, self.instruction)
                content.append({"type": "text", "text": text})
                continue
            if isinstance(item, os.PathLike):
                try:
                    image = open_rgb(item)  # already through to_rgb
                except FileNotFoundError as error:  # bad prompts are ValueErrors here
                    raise ValueError(str(error)) from error
            elif isinstance(item, Image.Image):
                image = to_rgb(item)
            else:
                raise ValueError(
                    f"prompt items must be str, PIL images or image paths, got {type(item).__name__}"
                )
            content.append({"type": "image"})
            images.append(image)
        if len(images) > self.max_images:
            raise ValueError(f"a prompt has {len(images)} images, more than max_images={self.max_images}")
        return content, images

    def chat_text(self, items: Sequence[Item]) -> str:
        """The chat-formatted prompt for one list of items (vision placeholders not yet expanded)."""
        content, images = self._load_items(items)
        return self._render(content, num_images=len(images))

    def _render(self, content: list[dict], num_images: int) -> str:
        messages = [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": content},
        ]
        # "Picture 1: ..." labels tell several images apart, as in the released pre-processing.
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, add_vision_id=num_images > 1
        )

    def prepare_inputs(self, prompts: Sequence[Sequence[Item]]) -> BatchFeature:
        """Tokenize a batch of prompts (left padded) with their images, on the model's device.

        Returns ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` [B, P] and, when there are
        images, ``pixel_values`` and ``image_grid_thw`` [num_images, 3].
        """
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of prompts (each a list of items)")
        texts, images = [], []
        for items in prompts:
            content, prompt_images = self._load_items(items)
            texts.append(self._render(content, num_images=len(prompt_images)))
            images.extend(prompt_images)
        inputs = self.processor(
            text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt"
        )
        return inputs.to(self.device)

    # ---- features ------------------------------------------------------------------------------

    def _generation_config(self, sampling: SamplingSettings, with_states: bool) -> GenerationConfig:
        # Every sampling field is explicit: unset ones would be filled in from the checkpoint's
        # generation_config (Qwen2-VL-Instruct ships top_k=1, i.e. greedy). top_k=0 disables the cut,
        # as in vLLM, which produced the released features. Greedy gets the neutral defaults.
        sample = (
            {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
            if sampling.do_sample
            else {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
        )
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens,
            do_sample=sampling.do_sample,
            repetition_penalty=1.0,
            suppress_tokens=self.vision_token_ids or None,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            output_hidden_states=with_states,
            return_dict_in_generate=True,
            **sample,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[Item]],
        sampling: SamplingSettings | None = None,
        *,
        teacher_forced: bool = False,
        with_states: bool = True,
        return_prompt_features: bool = False,
    ) -> LVLMOutput:
        """Generate answers for a batch of prompts and return tokens, texts and features.

        With ``teacher_forced=False`` the features are read from ``generate``'s hidden states; with
        True, ``generate`` only samples tokens and :meth:`features_from_tokens` recomputes the
        features in one forward pass (less memory: ``generate`` keeps every layer's states).
        ``with_states=False`` computes no features at all, for when only the texts are needed:
        ``features`` is then an empty [B, N, 0] and ``prompt_features`` ``None``.
        """
        sampling = sampling or SamplingSettings()
        inputs = self.prepare_inputs(prompts)
        keep_states = with_states and not teacher_forced
        # QCD: a logits processor runs the prompts without their query beside generate (own cache).
        processors = None
        if sampling.qcd_alpha > 0:
            processors = LogitsProcessorList([query_contrastive_processor(self, prompts, sampling.qcd_alpha)])
        with _seeded(sampling.seed, self.device):
            out = self.model.generate(
                **inputs,
                generation_config=self._generation_config(sampling, with_states=keep_states),
                logits_processor=processors,
            )
        token_ids_BN = out.sequences[:, inputs["input_ids"].shape[1] :]
        if not with_states:
            no_features_BN0 = token_ids_BN.new_zeros((*token_ids_BN.shape, 0), dtype=self.model.dtype)
            return self._output(token_ids_BN, self.eos_mask(token_ids_BN), no_features_BN0, inputs, None)
        if teacher_forced:
            return self.features_from_tokens(
                inputs, token_ids_BN, return_prompt_features=return_prompt_features
            )

        # Step 0 holds the whole prompt [B, P, H], later steps one position [B, 1, H]; [-1] is the
        # last layer after the final norm. The last generated token is never fed back, so N states.
        last_layer = [step[-1] for step in out.hidden_states]
        features_BNH = torch.cat([last_layer[0][:, -1:], *last_layer[1:]], dim=1)
        prompt_BPH = last_layer[0] if return_prompt_features else None
        return self._output(token_ids_BN, self.eos_mask(token_ids_BN), features_BNH, inputs, prompt_BPH)

    @torch.no_grad()
    def features_from_tokens(
        self,
        inputs: Mapping[str, torch.Tensor],
        token_ids: torch.Tensor | Sequence[Sequence[int]],
        *,
        return_prompt_features: bool = False,
    ) -> LVLMOutput:
        """Features of already generated tokens, by one teacher-forced pass over prompt + tokens.

        ``inputs`` comes from :meth:`prepare_inputs` (the generator must have seen exactly these
        prompt tokens and images). ``token_ids`` is [B, N] or B lists of ids of any length (as a
        generation engine returns them, EOS included or not); short rows are padded and masked.
        """
        token_ids_BN, valid_BN = self._pad_tokens(token_ids)
        input_ids_BP, prompt_mask_BP = inputs["input_ids"], inputs["attention_mask"]
        batch, prompt_len = input_ids_BP.shape
        if token_ids_BN.shape[0] != batch:
            raise ValueError(f"got token ids for {token_ids_BN.shape[0]} prompts, inputs hold {batch}")
        if not prompt_mask_BP[:, -1].all():
            # Generated token i must follow the last column; prepare_inputs pads on the left.
            raise ValueError("inputs must be left padded (build them with prepare_inputs)")

        # Feed prompt + all generated tokens but the last: position P-1+i then produced token i.
        fed_BN = token_ids_BN[:, :-1]
        input_ids_BL = torch.cat([input_ids_BP, fed_BN], dim=1)
        mask_BL = torch.cat([prompt_mask_BP, torch.ones_like(fed_BN)], dim=1)
        mm_types_BL = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(fed_BN)], dim=1)
        vision = {
            k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")
        }
        position_ids = self.position_ids(input_ids_BL, mask_BL, mm_types_BL, vision.get("image_grid_thw"))
        hidden_BLH = self.model.model(
            input_ids=input_ids_BL,
            attention_mask=mask_BL,
            position_ids=position_ids,
            mm_token_type_ids=mm_types_BL,
            use_cache=False,
            **vision,
        ).last_hidden_state  # after the final norm
        features_BNH = hidden_BLH[:, prompt_len - 1 :]
        prompt_BPH = hidden_BLH[:, :prompt_len] if return_prompt_features else None
        return self._output(
            token_ids_BN, valid_BN & self.eos_mask(token_ids_BN), features_BNH, inputs, prompt_BPH
        )

    def position_ids(
        self,
        input_ids_BL: torch.Tensor,
        mask_BL: torch.Tensor,
        mm_types_BL: torch.Tensor,
        image_grid_thw: torch.Tensor | None,
    ) -> torch.Tensor:
        """[4, B, L] position ids built as ``generate`` builds them: a text row, then M-RoPE (t, h, w).

        Left padding makes the real tokens start at different indices, so positions count attended
        tokens only; ``get_rope_index`` gives the 3-D positions of the image tokens and continues
        text positions after each image from the image's largest (h, w) index.
        """
        text_BL = (mask_BL.long().cumsum(-1) - 1).masked_fill(mask_BL == 0, 0)
        if image_grid_thw is None:
            rope_3BL = text_BL.expand(3, -1, -1)
        else:
            rope_3BL, _ = self.model.model.get_rope_index(
                input_ids_BL,
                mm_token_type_ids=mm_types_BL,
                image_grid_thw=image_grid_thw,
                attention_mask=mask_BL,
            )
        return torch.cat([text_BL[None], rope_3BL], dim=0)

    def _pad_tokens(
        self, token_ids: torch.Tensor | Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N] ids on the model's device and [B, N] bool "is a real token" (ragged rows padded)."""
        if isinstance(token_ids, torch.Tensor):
            ids_BN = token_ids.to(self.device, torch.long)
            return ids_BN, torch.ones_like(ids_BN, dtype=torch.bool)
        lengths = [len(row) for row in token_ids]
        if not lengths or min(lengths) == 0:
            raise ValueError(f"every prompt needs at least one generated token, got lengths {lengths}")
        ids_BN = torch.full((len(lengths), max(lengths)), self.pad_token_id, dtype=torch.long)
        for row, ids in zip(ids_BN, token_ids):
            row[: len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        valid_BN = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
        return ids_BN.to(self.device), valid_BN.to(self.device)

    def eos_mask(self, token_ids_BN: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: True up to and including the first EOS of each row, False after it."""
        is_eos_BN = torch.isin(token_ids_BN, torch.tensor(self.eos_token_ids, device=token_ids_BN.device))
        eos_before_BN = is_eos_BN.long().cumsum(1) - is_eos_BN.long()
        return eos_before_BN == 0

    def _output(
        self,
        token_ids_BN: torch.Tensor,
        mask_BN: torch.Tensor,
        features_BNH: torch.Tensor,
        inputs: Mapping[str, torch.Tensor],
        prompt_BPH: torch.Tensor | None,
    ) -> LVLMOutput:
        token_ids_BN = token_ids_BN.masked_fill(~mask_BN, self.pad_token_id)
        texts = self.processor.tokenizer.batch_decode(
            [ids[keep] for ids, keep in zip(token_ids_BN, mask_BN)], skip_special_tokens=True
        )
        output = LVLMOutput(token_ids_BN, texts, features_BNH, mask_BN)
        if prompt_BPH is not None:
            output.prompt_features, output.prompt_mask = _valid_first(
                prompt_BPH, inputs["attention_mask"].bool()
            )
        return output

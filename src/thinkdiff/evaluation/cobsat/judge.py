"""Judging CoBSAT images: the LLaVA-1.5 judge (default), a Qwen2-VL judge, and the CLIP metric.

The judge asks the two questions of :func:`~thinkdiff.evaluation.cobsat.protocol.judge_questions`
about every image, greedily, and the reply is parsed by the benchmark's rule. Every question and
reply is appended to a JSONL log, one line per question::

    {results}/judgements/{judge_slug}/{shard}.jsonl     + judge.json (who judged, how)

Each process writes its own ``{shard}`` file and reads all of them, so judging resumes where it
stopped and several processes (GPUs) can split the work by task, shot and prompt range without
writing to the same file. A question counts as done when a record with the same question and the
same image bytes (SHA-1) exists; a regenerated image is judged again.

The original judge is ``liuhaotian/llava-v1.5-13b`` run by the LLaVA repository's own code (conv
mode ``llava_v1``, fp16, greedy, up to 512 new tokens). This module runs the transformers port
(``llava-hf/llava-1.5-13b-hf`` or any LLaVA-1.5 folder) and rebuilds what that code fed the model:
the ``llava_v1`` system sentence, ``USER: <image>\\n{question} ASSISTANT:``, and the image padded
to a square with the processor's mean colour (LLaVA-1.5's ``image_aspect_ratio = "pad"``) before
the processor's resize and crop. Remaining differences (tokenisation of the text around
``<image>``, kernels) may shift answers slightly: results files say so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from thinkdiff.evaluation.cobsat.generate import find_output
from thinkdiff.evaluation.cobsat.protocol import (
    ITEMS,
    NUM_PROMPTS,
    TASKS,
    CobsatPrompt,
    build_prompts,
    judge_questions,
    parse_answer,
)
from thinkdiff.imaging import open_rgb
from thinkdiff.models.loading import TINY_PREFIX, resolve_tiny

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_JUDGE",
    "LLAVA_PORT_NOTE",
    "LLAVA_V1_SYSTEM",
    "ChatVLMJudge",
    "ClipScorer",
    "JudgeInfo",
    "JudgeReport",
    "LlavaJudge",
    "VisionJudge",
    "judge_cobsat",
    "judge_slug",
    "load_judge",
    "read_judgements",
    "recorded_selection",
]

logger = logging.getLogger(__name__)

DEFAULT_JUDGE = "llava-hf/llava-1.5-13b-hf"
"""The transformers port of the benchmark's default judge, LLaVA-1.5-13B."""

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
"""The benchmark's secondary metric model (CLIP ViT-B/32)."""

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
"""System sentence of LLaVA's ``llava_v1`` conversation template, which the benchmark's judge used."""

LLAVA_PORT_NOTE = (
    "The judge is LLaVA-1.5 run through its Hugging Face transformers port (llava-hf) instead of the "
    "original LLaVA code (liuhaotian/llava-v1.5-13b, conv mode llava_v1) that produced the published "
    "numbers; the port may shift answers slightly."
)
"""The sentence every results file carries when the judge is the llava-hf port."""


def judge_slug(name: str) -> str:
    """A folder name for a judge: ``llava-hf/llava-1.5-13b-hf`` -> ``llava-hf--llava-1.5-13b-hf``."""
    path = Path(name)
    base = path.name if path.exists() else name
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in base.replace("/", "--")) or "judge"


@dataclass
class JudgeInfo:
    """Who judged and how: written to ``judge.json`` and into every results file."""

    name: str
    """Hub id or folder the judge was loaded from."""
    kind: str
    """``llava`` (the benchmark's judge) or ``chat-vlm`` (e.g. Qwen2-VL; not the benchmark's)."""
    max_new_tokens: int
    dtype: str
    notes: list[str] = field(default_factory=list)
    """Sentences the results files must carry (e.g. :data:`LLAVA_PORT_NOTE`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "max_new_tokens": self.max_new_tokens,
            "dtype": self.dtype,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JudgeInfo:
        return cls(d["name"], d["kind"], int(d["max_new_tokens"]), d["dtype"], list(d.get("notes", [])))


class VisionJudge(Protocol):
    """Answers one question about one image per pair, greedily; batched."""

    info: JudgeInfo

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]: ...


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    import torch

    if dtype is None:
        # The benchmark ran its judge in fp16; CPUs lack fast fp16 kernels.
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        names = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16}
        names |= {"bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)}")
        return names[dtype]
    return dtype


def _expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: centre the image on a square of the processor's mean colour."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def _greedy_decode(model: Any, processor: Any, inputs: Any, max_new_tokens: int) -> list[str]:
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return [s.strip() for s in processor.batch_decode(new_tokens, skip_special_tokens=True)]


class LlavaJudge:
    """LLaVA-1.5 as the CoBSAT judge, through transformers' ``LlavaForConditionalGeneration``."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        name: str,
        max_new_tokens: int = 512,
        system_prompt: str = LLAVA_V1_SYSTEM,
        pad_to_square: bool = True,
    ) -> None:
        """Wrap a loaded model and processor; use :meth:`from_pretrained` to load by hub id or folder.

        ``system_prompt=""`` gives the llava-hf model card's shorter ``USER: <image>\\n... ASSISTANT:``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        self.model = model.eval()
        self.processor = processor
        # Batched generation appends new tokens on the right, so prompts are padded on the left.
        self.processor.tokenizer.padding_side = "left"
        self.system_prompt = system_prompt
        self.pad_to_square = pad_to_square
        notes = [LLAVA_PORT_NOTE]
        if system_prompt != LLAVA_V1_SYSTEM:
            notes.append("The judge prompt differs from llava_v1's (system sentence changed).")
        if not pad_to_square:
            notes.append("Images were not padded to square before the judge's resize and crop.")
        self.info = JudgeInfo(name, "llava", max_new_tokens, str(model.dtype).removeprefix("torch."), notes)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> LlavaJudge:
        """Load a LLaVA-1.5 judge (default fp16 on GPU, fp32 on CPU)."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        device = device or _default_device()
        model = LlavaForConditionalGeneration.from_pretrained(
            str(name_or_path), dtype=_resolve_dtype(dtype, device)
        )
        processor = AutoProcessor.from_pretrained(str(name_or_path))
        return cls(model.to(device), processor, str(name_or_path), **kwargs)

    def prompt(self, question: str) -> str:
        """The text fed to the model for one question (``llava_v1`` layout)."""
        body = f"USER: <image>\n{question} ASSISTANT:"
        return f"{self.system_prompt} {body}" if self.system_prompt else body

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]:
        """Greedy replies, one per (image, question) pair, stripped of special tokens and spaces."""
        pil = [open_rgb(p) for p in images]
        if self.pad_to_square:
            mean = self.processor.image_processor.image_mean
            background = tuple(int(x * 255) for x in mean)
            pil = [_expand_to_square(im, background) for im in pil]  # type: ignore[arg-type]
        inputs = self.processor(
            images=pil, text=[self.prompt(q) for q in questions], padding=True, return_tensors="pt"
        ).to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return _greedy_decode(self.model, self.processor, inputs, self.info.max_new_tokens)


class ChatVLMJudge:
    """Any chat-template VLM as judge (e.g. Qwen2-VL): one user turn with the image and the question.

    Not the benchmark's judge; its numbers are not comparable with the published LLaVA-judged rows.
    """

    def __init__(self, model: Any, processor: Any, name: str, max_new_tokens: int = 512) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.info = JudgeInfo(
            name,
            "chat-vlm",
            max_new_tokens,
            str(model.dtype).removeprefix("torch."),
            [
                f"The judge is {name}, not the benchmark's LLaVA-1.5-13B: not comparable with the published rows."
            ],
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> ChatVLMJudge:
        """Load e.g. ``Qwen/Qwen2-VL-7B-Instruct`` with ``AutoModelForImageTextToText``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = device or _default_device()
        model = AutoModelForImageTextToText.from_pretrained(
            str(name_or_path), dtype=_resolve_dtype(dtype, device)
        )
        try:
            processor = AutoProcessor.from_pretrained(str(name_or_path))
        except ImportError:
            # Qwen2-VL's video processor needs torchvision; the project's loader drops that part.
            from thinkdiff.models.lvlm import load_processor

            processor = load_processor(name_or_path)
        return cls(model.to(device), processor, str(name_or_path), **kwargs)

    def answer(self, images: Sequence[Path], questions: Sequence[str]) -> list[str]:
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for q in questions
        ]
        pil = [open_rgb(p) for p in images]
        inputs = self.processor(images=pil, text=texts, padding=True, return_tensors="pt").to(
            self.model.device
        )
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return _greedy_decode(self.model, self.processor, inputs, self.info.max_new_tokens)


def load_judge(
    name_or_path: str | Path,
    kind: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_new_tokens: int = 512,
) -> LlavaJudge | ChatVLMJudge:
    """Load a judge; ``kind`` is ``llava`` or ``chat-vlm``, or read from a local folder's config.json.

    Without a local config (a hub id) the kind defaults to ``llava``, the benchmark's judge.
    """
    if str(name_or_path).startswith(TINY_PREFIX):  # the offline kit's tiny LLaVA, for tests and demos
        name_or_path = resolve_tiny(str(name_or_path))
    if kind is None:
        config = Path(name_or_path) / "config.json"
        model_type = json.loads(config.read_text()).get("model_type", "") if config.is_file() else "llava"
        kind = "llava" if model_type == "llava" else "chat-vlm"
    if kind == "llava":
        return LlavaJudge.from_pretrained(
            name_or_path, device=device, dtype=dtype, max_new_tokens=max_new_tokens
        )
    if kind in ("chat-vlm", "qwen2-vl"):
        return ChatVLMJudge.from_pretrained(
            name_or_path, device=device, dtype=dtype, max_new_tokens=max_new_tokens
        )
    raise ValueError(f"judge kind {kind!r} is not one of llava, chat-vlm, qwen2-vl")


class ClipScorer:
    """The benchmark's secondary metric: CLIP argmax over the bare word lists (items, not shown words).

    Like the benchmark, one forward pass scores the image against ``[detail, obj, "detail obj"] +
    object list + detail list``; similarities are ``logit_scale * cos`` clipped at 0; the predicted
    options are the argmax within each list.
    """

    def __init__(self, model: Any, processor: Any, name: str) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = DEFAULT_CLIP, device: str | None = None, dtype: str | None = None
    ) -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        device = device or _default_device()
        model = CLIPModel.from_pretrained(str(name_or_path), dtype=_resolve_dtype(dtype or "float32", device))
        return cls(model.to(device), CLIPProcessor.from_pretrained(str(name_or_path)), str(name_or_path))

    def score(self, image: Path, prompt: CobsatPrompt) -> dict[str, Any]:
        """Predicted 1-based options and the similarity to the target words for one image."""
        import torch

        task = prompt.task
        obj_list, detail_list = list(ITEMS[task.obj_category]), list(ITEMS[task.detail_category])
        d, o = prompt.target_detail, prompt.target_obj
        texts = [d, o, f"{d} {o}", *obj_list, *detail_list]
        inputs = self.processor(text=texts, images=open_rgb(image), return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        with torch.inference_mode():
            sims = self.model(**inputs).logits_per_image[0].float().clamp(min=0).cpu()
        pred_obj = int(sims[3 : 3 + len(obj_list)].argmax()) + 1
        pred_detail = int(sims[3 + len(obj_list) :].argmax()) + 1
        labels = prompt.true_labels
        return {
            "pred_detail": pred_detail,
            "pred_obj": pred_obj,
            "check_detail": pred_detail == labels["detail"],
            "check_obj": pred_obj == labels["obj"],
            "correct": pred_detail == labels["detail"] and pred_obj == labels["obj"],
            "similarity_detail": float(sims[0]),
            "similarity_obj": float(sims[1]),
            "similarity_overall": float(sims[2]),
        }


@dataclass
class JudgeReport:
    """What one :func:`judge_cobsat` call did."""

    prompts: int
    """Prompts selected."""
    missing_images: int
    """Selected prompts without an image (they count as wrong; nothing is asked)."""
    asked: int
    """Questions put to the judge by this call."""
    reused: int
    """Questions answered by an earlier run (resumed)."""
    clip_scored: int = 0
    seconds: float = 0.0


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def read_judgements(folder: str | Path) -> dict[tuple[int, int, int, str], dict[str, Any]]:
    """All records of all ``*.jsonl`` files in ``folder``, keyed by ``(shot, task_id, index, question_kind)``.

    Later lines win, so a re-judged image replaces its old record. A truncated last line (a killed
    writer) is skipped.
    """
    records: dict[tuple[int, int, int, str], dict[str, Any]] = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[(r["shot"], r["task_id"], r["index"], r["question_kind"])] = r
    return records


def recorded_selection(folder: str | Path) -> tuple[list[int], list[int], list[int]] | None:
    """Union of the (tasks, shots, prompt indices) that the shards judging into ``folder`` covered.

    ``None`` when no shard recorded its selection.
    """
    tasks: set[int] = set()
    shots: set[int] = set()
    indices: set[int] = set()
    files = sorted(Path(folder).glob("*.selection.json"))
    for path in files:
        sel = json.loads(path.read_text())
        tasks.update(sel["tasks"])
        shots.update(sel["shots"])
        indices.update(sel["indices"])
    return (sorted(tasks), sorted(shots), sorted(indices)) if files else None


def _default_shard(tasks: Sequence[int], shots: Sequence[int], indices: Sequence[int]) -> str:
    def span(xs: Sequence[int]) -> str:
        xs = sorted(xs)
        return f"{xs[0]}-{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else "+".join(map(str, xs))

    return f"shots{span(shots)}_tasks{span(tasks)}_prompts{span(indices)}" if indices else "empty"


def judge_cobsat(
    judge: VisionJudge | None,
    images_dir: str | Path,
    results_dir: str | Path,
    *,
    tasks: Iterable[int] = tuple(TASKS),
    shots: Iterable[int] = (2, 4),
    indices: Iterable[int] = range(NUM_PROMPTS),
    batch_size: int = 8,
    clip: ClipScorer | None = None,
    shard: str | None = None,
) -> JudgeReport:
    """Ask the judge both questions about every selected image; log everything; skip what is done.

    Records go to ``{results_dir}/judgements/{judge_slug}/{shard}.jsonl`` (``shard`` defaults to a
    name built from the selection) and, with ``clip``, to ``judgements/clip--{slug}/``. Missing
    images are not asked about (they count as wrong in the results). ``judge=None`` runs only the
    CLIP metric.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    images_dir, results_dir = Path(images_dir), Path(results_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    tasks, shots, indices = list(tasks), list(shots), list(indices)
    prompts = list(build_prompts(tasks, shots, indices))
    shard = shard or _default_shard(tasks, shots, indices)
    start = time.perf_counter()

    # 1. Locate images; hash them once (resume compares hashes, so regenerated images are re-judged).
    found: list[tuple[CobsatPrompt, Path, str]] = []
    for p in prompts:
        path = find_output(images_dir, p)
        if path is not None:
            found.append((p, path, _sha1(path)))
    report = JudgeReport(prompts=len(prompts), missing_images=len(prompts) - len(found), asked=0, reused=0)

    # 2. The judge: pending (image, question) pairs in batches, appended to this shard's log.
    if judge is not None:
        log_dir = results_dir / "judgements" / judge_slug(judge.info.name)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "judge.json").write_text(json.dumps(judge.info.to_dict(), indent=2) + "\n")
        # What this shard was asked to cover, so a report can default to the union of all shards.
        selection = {"tasks": tasks, "shots": shots, "indices": indices}
        (log_dir / f"{shard}.selection.json").write_text(json.dumps(selection) + "\n")
        done = read_judgements(log_dir)
        pending: list[tuple[CobsatPrompt, Path, str, str, str]] = []
        for p, path, digest in found:
            for kind, question in judge_questions(p.task.theme).items():
                old = done.get((p.shot, p.task_id, p.index, kind))
                if old is not None and old["image_sha1"] == digest and old["question"] == question:
                    report.reused += 1
                else:
                    pending.append((p, path, digest, kind, question))
        logger.info(
            "judge %s: %d prompts, %d images missing, %d questions done, %d to ask",
            judge.info.name,
            len(prompts),
            report.missing_images,
            report.reused,
            len(pending),
        )
        with open(log_dir / f"{shard}.jsonl", "a", encoding="utf-8") as log:
            for b in range(0, len(pending), batch_size):
                chunk = pending[b : b + batch_size]
                t0 = time.perf_counter()
                replies = judge.answer([c[1] for c in chunk], [c[4] for c in chunk])
                per_question = (time.perf_counter() - t0) / len(chunk)
                for (p, path, digest, kind, question), reply in zip(chunk, replies):
                    answer, label = parse_answer(reply), p.true_labels[kind]
                    record = {
                        "task_id": p.task_id,
                        "shot": p.shot,
                        "index": p.index,
                        "stem": p.stem,
                        "image": os.path.relpath(path, images_dir),
                        "image_sha1": digest,
                        "question_kind": kind,
                        "question": question,
                        "reply": reply,
                        "answer": answer,
                        "true_label": label,
                        "check": answer == label,
                        "judge": judge.info.name,
                        "seconds": per_question,
                        "host": socket.gethostname(),
                    }
                    log.write(json.dumps(record) + "\n")
                # Flush per batch: a killed run loses at most one batch.
                log.flush()
                report.asked += len(chunk)
                if (b // batch_size) % 20 == 0 or b + batch_size >= len(pending):
                    logger.info(
                        "judged %d/%d questions (%.2f s/question)", report.asked, len(pending), per_question
                    )

    # 3. The CLIP metric, logged and resumed the same way.
    if clip is not None:
        clip_dir = results_dir / "judgements" / f"clip--{judge_slug(clip.name)}"
        clip_dir.mkdir(parents=True, exist_ok=True)
        (clip_dir / "judge.json").write_text(json.dumps({"name": clip.name, "kind": "clip"}, indent=2) + "\n")
        done = read_judgements(clip_dir)
        with open(clip_dir / f"{shard}.jsonl", "a", encoding="utf-8") as log:
            for p, path, digest in found:
                old = done.get((p.shot, p.task_id, p.index, "clip"))
                if old is not None and old["image_sha1"] == digest:
                    continue
                record = {
                    "task_id": p.task_id,
                    "shot": p.shot,
                    "index": p.index,
                    "stem": p.stem,
                    "image": os.path.relpath(path, images_dir),
                    "image_sha1": digest,
                    "question_kind": "clip",
                    **clip.score(path, p),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                report.clip_scored += 1
    report.seconds = time.perf_counter() - start
    return report

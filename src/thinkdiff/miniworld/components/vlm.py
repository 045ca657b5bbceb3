"""The mini VLM: the real Qwen2-VL architecture at a tiny size, trained to describe the world's
images and to answer mini-CoBSAT prompts by writing the caption of the next image.

Saved exactly like :func:`thinkdiff.tiny.qwen.save_tiny_qwen_vl` (weights, generation config,
tokenizer with Qwen's chat template, PIL image processor), so every project loader reads it:
``LVLMFeatureExtractor.from_pretrained(folder)``, ``extract_features``, the trainer's tokenizer.

Training mixes two kinds of samples, with the loss on the answer only:

- *describe* (60% of the samples at the start, 20% at the end): ``[image, one of the paper's 16
  description prompts]`` -> the full caption;
- *mini-CoBSAT* (the rest): ThinkDiff's CoBSAT input (the world's instruction, ``"Word 1: red, "``,
  image, ...) with 1 to 4 shots of a random task -> the caption of the next image (``a red star``).
  The instruction is :data:`~thinkdiff.miniworld.text.MINI_INSTRUCTION`, which the saved folder
  records (:data:`~thinkdiff.models.lvlm.PROMPT_FILE`) for the prompt code to render.

The prompt text comes from the same chat template the extractor uses at inference, and the
images' ``pixel_values`` are those of the checkpoint's own image processor: resized once per pool
image, cut into patches per batch (the feasibility run found that re-processing images every step
costs more than the model), checked against the processor at start.
Training images never come from a held-out cell.

Shapes: B batch, T tokens, I images in a batch.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from thinkdiff.data.extraction import DESCRIPTION_PROMPTS
from thinkdiff.miniworld.components.common import cosine_lr, save_losses
from thinkdiff.miniworld.minicobsat import MINI_TASKS
from thinkdiff.miniworld.pool import ScenePool
from thinkdiff.miniworld.text import MINI_INSTRUCTION, qwen_tokenizer
from thinkdiff.miniworld.world import HELD_OUT, full_caption, theme_caption, to_pil
from thinkdiff.models.lvlm import PROMPT_FILE, SYSTEM_PROMPT
from thinkdiff.tiny.qwen import QWEN_SPECIAL_TOKENS

__all__ = ["VLM_HIDDEN", "VlmData", "build_vlm", "save_vlm", "train_vlm"]

VLM_HIDDEN = 128
"""Text hidden size of the mini VLM (= the width of its token features, the aligner's input)."""
SHOT_WEIGHTS: dict[int, float] = {1: 0.1, 2: 0.35, 3: 0.2, 4: 0.35}
"""Shots of the mini-CoBSAT training samples (2 and 4 are the evaluated settings)."""


def build_vlm(vocab_size: int, ids: dict[str, int]):
    """A random mini Qwen2-VL: text 128 wide, 4 layers; vision tower 2 blocks of 128 (about 1.5M parameters)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {
        "vocab_size": vocab_size,
        "hidden_size": VLM_HIDDEN,
        "intermediate_size": 2 * VLM_HIDDEN,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        # M-RoPE splits head_dim / 2 = 16 rotary frequencies among (t, h, w).
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": True,
    }
    vision = {
        "depth": 2,
        # 128 wide: at 64 the tower still could not tell shapes apart after 400 pretraining steps.
        "embed_dim": 128,
        "num_heads": 4,
        "mlp_ratio": 2,
        "hidden_size": VLM_HIDDEN,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2VLForConditionalGeneration(config)


def save_vlm(folder: Path, model, tokenizer) -> Path:
    """Write the VLM in the hub layout (see :func:`thinkdiff.tiny.qwen.save_tiny_qwen_vl`), with the
    instruction it was trained on recorded in :data:`~thinkdiff.models.lvlm.PROMPT_FILE`."""
    from transformers import GenerationConfig

    from thinkdiff.tiny.qwen import _save_processor

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    # 32 px images go through the processor's smart resize to 56 x 56: 4 visual tokens each.
    _save_processor(folder, "qwen2_vl", tokenizer)
    (folder / PROMPT_FILE).write_text(json.dumps({"instruction": MINI_INSTRUCTION}, indent=1) + "\n")
    return folder


@dataclass
class _Sample:
    items: list  # str or int (an index into the pool's pixel cache)
    answer: str


class VlmData:
    """Builds the VLM's training samples from a scene pool (see the module docstring)."""

    def __init__(self, pool: ScenePool, tokenizer, image_processor, seed: int) -> None:
        self.pool = pool
        self.tokenizer = tokenizer
        self.rng = random.Random(f"vlm-data:{seed}")
        self.image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.processor = image_processor
        reference = image_processor([to_pil(im) for im in pool.images[:4]], return_tensors="pt")
        self.grid_thw = reference["image_grid_thw"][0]
        self.patches_per_image = int(self.grid_thw.prod())
        self.tokens_per_image = self.patches_per_image // image_processor.merge_size**2
        # Resized uint8 images (9 KB each, not the 75 KB of float patches): the patches are cut
        # per batch by :meth:`pixels`, which must equal the processor's output (checked here).
        side = (
            int(self.grid_thw[1]) * image_processor.patch_size,
            int(self.grid_thw[2]) * image_processor.patch_size,
        )
        self.resized = np.stack(
            [np.asarray(to_pil(im).resize(side[::-1], image_processor.resample)) for im in pool.images]
        )
        mine = self.pixels(list(range(min(4, len(pool)))))
        if not torch.allclose(mine, reference["pixel_values"], atol=1e-5):
            raise ValueError("the cached pixel values differ from the image processor's output")
        # Index of pool images by theme cell: (theme, detail, shape) -> [pool index].
        self.by_cell: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        for i, s in enumerate(pool.scenes):
            for theme in HELD_OUT:
                self.by_cell[(theme, s.value(theme.split("_")[0]), s.shape)].append(i)

    # ---- samples -------------------------------------------------------------------------------
    def describe_sample(self) -> _Sample:
        i = self.rng.randrange(len(self.pool))
        return _Sample([i, self.rng.choice(DESCRIPTION_PROMPTS)], full_caption(self.pool.scenes[i]))

    def cobsat_sample(self, shot: int | None = None, task_id: int | None = None) -> _Sample:
        rng = self.rng
        shot = shot or rng.choices(list(SHOT_WEIGHTS), weights=list(SHOT_WEIGHTS.values()))[0]
        task = MINI_TASKS[task_id or rng.choice(list(MINI_TASKS))]
        detail = task.detail_category
        while True:
            theta = rng.choice(task.theta_items)
            xs = rng.sample(task.x_items, shot + 1)
            cells = [(x, theta) if task.x_category != "shape" else (theta, x) for x in xs]
            if all((task.theme, d, s) in self.by_cell for d, s in cells):
                break
        items: list = [MINI_INSTRUCTION]
        for k, x in enumerate(xs):
            items.append(f"{'' if k == 0 else chr(10) * 2}Word {k + 1}: {x}, ")
            if k < shot:
                items.append(rng.choice(self.by_cell[(task.theme, *cells[k])]))
        d, s = cells[-1]
        del detail
        return _Sample(items, theme_caption(task.theme, s, d))

    def sample(self, describe_share: float = 0.25) -> _Sample:
        return self.describe_sample() if self.rng.random() < describe_share else self.cobsat_sample()

    def pixels(self, indices: list[int]) -> torch.Tensor:
        """``pixel_values`` [len(indices) * patches, C * T * P * P] of pool images, as the
        Qwen2-VL image processor lays them out (rescale, normalise, 2-frame temporal patches)."""
        ip = self.processor
        x = torch.from_numpy(self.resized[indices]).float() * ip.rescale_factor
        x = ((x - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)).permute(0, 3, 1, 2)
        b, c, h, w = x.shape
        p, m, t = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        x = x.reshape(b, c, h // p // m, m, p, w // p // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], t, p, p)
        return x.reshape(b * (h // p) * (w // p), c * t * p * p)

    # ---- tokens --------------------------------------------------------------------------------
    def prompt_ids(self, items: list) -> list[int]:
        """Token ids of the chat prompt, exactly as the processor builds them at inference."""
        content = [{"type": "image"} if isinstance(x, int) else {"type": "text", "text": x} for x in items]
        n_images = sum(isinstance(x, int) for x in items)
        messages = [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": content},
        ]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, add_vision_id=n_images > 1
        )
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        out: list[int] = []
        for t in ids:  # the processor expands each image placeholder to the image's token count
            out.extend([t] * self.tokens_per_image if t == self.image_token else [t])
        return out

    def answer_ids(self, answer: str) -> list[int]:
        return [*self.tokenizer(answer, add_special_tokens=False).input_ids, self.end_id]

    def collate(self, samples: list[_Sample]) -> dict[str, torch.Tensor]:
        """A right-padded training batch; labels are -100 outside the answers."""
        rows, labels, images = [], [], []
        for s in samples:
            prompt, answer = self.prompt_ids(s.items), self.answer_ids(s.answer)
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
            images.extend(x for x in s.items if isinstance(x, int))
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id)
        label_ids = torch.full((len(rows), length), -100)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (r, lab) in enumerate(zip(rows, labels)):
            input_ids[b, : len(r)] = torch.tensor(r)
            label_ids[b, : len(r)] = torch.tensor(lab)
            mask[b, : len(r)] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": label_ids,
            "mm_token_type_ids": (input_ids == self.image_token).long(),
        }
        if images:
            batch["pixel_values"] = self.pixels(images)
            batch["image_grid_thw"] = self.grid_thw[None].repeat(len(images), 1)
        return batch


def pretrain_vision_tower(
    model, data: VlmData, *, steps: int, batch_size: int = 128, lr: float = 2e-3, progress: bool = True
) -> list[float]:
    """Stage 1: the vision tower (with its merger) learns to see, before the language model trains.

    Like the pretrained ViT a real Qwen2-VL starts from: linear heads read the four attributes from
    an image's merged tokens (supervised classification on the pool), then are thrown away. A ViT
    learns shapes and textures far faster this way than through caption tokens alone.
    """
    import torch.nn.functional as F
    from torch import nn
    from tqdm.auto import tqdm

    from thinkdiff.miniworld.world import ATTRIBUTES

    visual = model.model.visual
    width = data.tokens_per_image * model.config.text_config.hidden_size
    heads = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in ATTRIBUTES.items()})
    labels = {
        name: torch.tensor([values.index(s.value(name)) for s in data.pool.scenes])
        for name, values in ATTRIBUTES.items()
    }
    params = [*visual.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(len(data.pool))
    losses = []
    visual.train()
    for step in tqdm(range(steps), desc="mini VLM vision", disable=not progress, dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(50, steps // 10 + 1))
        idx = torch.randint(len(data.pool), (batch_size,), generator=gen)
        pixels = data.pixels(idx.tolist())
        tokens = visual(pixels, grid_thw=data.grid_thw[None].repeat(batch_size, 1)).pooler_output
        flat = tokens.reshape(batch_size, width)
        loss = sum(F.cross_entropy(head(flat), labels[name][idx]) for name, head in heads.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def train_vlm(
    folder: Path,
    pool: ScenePool,
    *,
    seed: int,
    steps: int,
    vision_steps: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    progress: bool = True,
) -> dict:
    """Train the mini VLM on samples drawn from ``pool`` and save it into ``folder``.

    ``vision_steps`` > 0 first pretrains the vision tower (:func:`pretrain_vision_tower`).
    """
    from tqdm.auto import tqdm
    from transformers import Qwen2VLImageProcessorPil

    from thinkdiff.tiny.qwen import _MAX_PIXELS, _MIN_PIXELS

    tokenizer = qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    data = VlmData(
        pool, tokenizer, Qwen2VLImageProcessorPil(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS), seed
    )
    torch.manual_seed(seed)
    model = build_vlm(len(tokenizer), ids)
    started = time.perf_counter()
    vision_losses = (
        pretrain_vision_tower(model, data, steps=vision_steps, progress=progress) if vision_steps > 0 else []
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses: list[float] = []
    model.train()
    for step in tqdm(range(steps), desc="mini VLM", disable=not progress, dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(200, steps // 10 + 1))
        # Perception first: describing teaches every attribute of every image, densely; the share
        # of in-context samples grows as training goes on.
        share = 0.6 - 0.4 * step / max(1, steps - 1)
        batch = data.collate([data.sample(share) for _ in range(batch_size)])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    model.eval()
    save_vlm(folder, model, tokenizer)
    record = {
        "steps": steps,
        "vision_steps": vision_steps,
        "batch_size": batch_size,
        "seconds": round(seconds, 1),
    }
    save_losses(
        Path(folder) / "training.json", losses, vision_losses=[round(x, 5) for x in vision_losses], **record
    )
    return record


def max_answer_tokens(tokenizer) -> int:
    """Generation budget: the longest answer the world has, plus EOS and a margin (a too-small
    limit silently truncates answers, see the feasibility note)."""
    longest = "an outlined triangle on an orange background, a checkered diamond on a yellow background"
    return len(tokenizer(longest, add_special_tokens=False).input_ids) + 2


def describe_json(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


_ = np  # numpy is used by callers through pixel caches; keep the import explicit for typing tools

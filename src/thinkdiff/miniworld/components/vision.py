"""The mini vision encoder: BLIP-2's EVA ViT architecture (``Blip2VisionModel``) at a tiny size,
trained contrastively against captions (CLIP's objective) so that its tokens carry semantics.

Geometry: 224 px input (the images are upscaled by BLIP-2's own preprocessing, bicubic, CLIP
mean/std) with 28 px patches, so 8 x 8 patches + CLS; ThinkDiff-CLIP's pooling halves the grid to
1 + 4 x 4 = 17 tokens per image (:class:`thinkdiff.models.clip_vision.CLIPVisionFeatures`). The
text side of the contrastive pair is a tiny ``CLIPTextModel`` over the mini T5's word vocabulary;
it is only needed for training and is saved beside the vision tower for reference.

Training images never come from a held-out cell.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel, CLIPTextConfig, CLIPTextModel

from thinkdiff.data.image_caption import blip2_preprocess
from thinkdiff.miniworld.components.common import cosine_lr, save_losses
from thinkdiff.miniworld.pool import ScenePool
from thinkdiff.miniworld.text import t5_tokenizer
from thinkdiff.miniworld.world import full_caption, random_caption, to_pil

__all__ = ["VISION_IMAGE_SIZE", "build_vision", "preprocess", "train_vision"]

VISION_IMAGE_SIZE = 224
"""Input side of the vision tower (BLIP-2's); the 32 px images are upscaled to it."""
VISION_HIDDEN = 64


def build_vision() -> Blip2VisionModel:
    """A random mini EVA ViT: 3 blocks of width 64, 4 heads, patch 28 at 224 px."""
    config = Blip2VisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=VISION_IMAGE_SIZE,
        patch_size=28,
    )
    return Blip2VisionModel(config)


def preprocess(images_BHWC: np.ndarray) -> torch.Tensor:
    """BLIP-2's transform (what the ThinkDiff-CLIP data loader applies) for a batch of renders."""
    return torch.stack([blip2_preprocess(to_pil(im), VISION_IMAGE_SIZE) for im in images_BHWC])


class _TextTower(nn.Module):
    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=dim,
            intermediate_size=2 * dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            projection_dim=dim,
            # T5 ids: </s> (1) ends every text, so the pooled state sees the whole caption.
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        )
        self.model = CLIPTextModel(config)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).pooler_output


def train_vision(
    folder: Path,
    pool: ScenePool,
    *,
    seed: int,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    progress: bool = True,
) -> dict:
    """Train the vision tower contrastively on ``pool``; save it with its image processor."""
    from tqdm.auto import tqdm
    from transformers import BlipImageProcessorPil

    from thinkdiff.data.image_caption import CLIP_MEAN, CLIP_STD

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    vision = build_vision()
    text = _TextTower(len(tokenizer), VISION_HIDDEN)
    image_proj = nn.Linear(VISION_HIDDEN, VISION_HIDDEN, bias=False)
    logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    params = [*vision.parameters(), *text.parameters(), *image_proj.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    rng = random.Random(f"vision-train:{seed}")
    losses: list[float] = []
    started = time.perf_counter()
    for step in tqdm(range(steps), desc="mini vision", disable=not progress, dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        idx = [rng.randrange(len(pool)) for _ in range(batch_size)]
        # Mostly full captions (all four attributes must be in the image tokens), some partial.
        captions = [
            full_caption(pool.scenes[i]) if rng.random() < 0.7 else random_caption(pool.scenes[i], rng)
            for i in idx
        ]
        enc = tokenizer(captions, padding=True, return_tensors="pt")
        image_BD = F.normalize(
            image_proj(vision(pixel_values=preprocess(pool.images[idx])).pooler_output), dim=-1
        )
        text_BD = F.normalize(text(enc.input_ids, enc.attention_mask), dim=-1)
        logits = logit_scale.clamp(max=np.log(100)).exp() * image_BD @ text_BD.T
        # Same caption twice in a batch is rare but possible: both count as positives.
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    folder = Path(folder)
    vision.eval().save_pretrained(folder)
    BlipImageProcessorPil(
        size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        resample=3,  # bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    ).save_pretrained(folder)
    record = {"steps": steps, "batch_size": batch_size, "seconds": round(seconds, 1)}
    save_losses(folder / "training.json", losses, **record)
    return record


@torch.no_grad()
def probe_accuracy(folder: Path, train: ScenePool, test: ScenePool, steps: int = 300) -> dict[str, float]:
    """How much each attribute is linearly readable from the pooled tokens (a fidelity check):
    a linear probe per attribute on ``train`` features, accuracy on ``test``."""
    from thinkdiff.miniworld.world import ATTRIBUTES
    from thinkdiff.models.clip_vision import CLIPVisionFeatures

    features = CLIPVisionFeatures.from_pretrained(folder, device="cpu", dtype=torch.float32)

    def embed(pool: ScenePool) -> torch.Tensor:
        return torch.cat(
            [features(preprocess(pool.images[i : i + 256])).flatten(1) for i in range(0, len(pool), 256)]
        )

    x_train, x_test = embed(train), embed(test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    out = {}
    for name, values in ATTRIBUTES.items():
        y_train = torch.tensor([values.index(s.value(name)) for s in train.scenes])
        y_test = torch.tensor([values.index(s.value(name)) for s in test.scenes])
        with torch.random.fork_rng():  # the same probe from run to run, the global RNG untouched
            torch.manual_seed(0)
            probe = nn.Linear(x_train.shape[1], len(values))
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(probe(x_train), y_train)
                opt.zero_grad()
                loss.backward()
                opt.step()
        out[name] = float((probe(x_test).argmax(-1) == y_test).float().mean())
    return out

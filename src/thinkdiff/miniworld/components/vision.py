"""The mini vision encoder: BLIP-2's EVA ViT architecture (``Blip2VisionModel``) at a tiny size,
trained the way CLIP-family encoders are: a contrastive loss between images and their captions,
with hard negatives.

Geometry: the renders' own 32 px (BLIP-2's preprocessing, CLIP mean/std, at the tower's input
side) with 4 px patches, so 8 x 8 patches + CLS; ThinkDiff-CLIP's pooling halves the grid to
1 + 4 x 4 = 17 tokens per image (:class:`thinkdiff.models.clip_vision.CLIPVisionFeatures`). A patch
sees the same 4 x 4 pixels as a 28 px patch of the 224 px upscale did, at 1/8 of the cost per step
(measured: the upscale and the 28 px patch embedding were over half of each step). The text side of
the contrastive pair is a tiny ``CLIPTextModel`` over the mini T5's word vocabulary; it is only
needed for training.

Why hard negatives: with random in-batch negatives, colour and background alone (90 combinations)
tell almost every pair of a batch apart, so the loss falls while shape and texture stay unseen
(a linear probe read them at 16%, chance 10%). Each image is therefore also contrasted, attribute
by attribute, with captions that differ from its own in exactly that attribute
(:func:`attribute_alternatives`).

Training images never come from a held-out cell; :func:`vision_probe` tests on renders that
include held-out cells.

Shapes: B images, D width, N distinct texts of a step, V values of an attribute.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel, CLIPTextConfig, CLIPTextModel

from thinkdiff.data.image_caption import CLIP_MEAN, CLIP_STD, blip2_preprocess
from thinkdiff.miniworld.components.common import cosine_lr, save_losses
from thinkdiff.miniworld.pool import ScenePool
from thinkdiff.miniworld.text import t5_tokenizer
from thinkdiff.miniworld.world import ATTRIBUTES, IMAGE_SIZE, Scene, caption, full_caption, to_pil

__all__ = [
    "VISION_IMAGE_SIZE",
    "attribute_alternatives",
    "build_vision",
    "linear_probe_accuracy",
    "preprocess",
    "probe_accuracy",
    "sincos_position_embedding",
    "train_vision",
    "vision_probe",
]

VISION_IMAGE_SIZE = 32
"""Input side of the vision tower: the renders' own size (BLIP-2's EVA ViT-g takes 224)."""
VISION_PATCH = 4
"""Patch side: one period of a texture (EVA ViT-g: 14)."""
VISION_HIDDEN = 64
VISION_LAYERS = 3


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2D sine-cosine position embedding of a ``grid x grid`` patch grid, with a zero row
    for the CLS token in front: ``[1 + grid * grid, dim]``. Half of the channels encode the patch's
    row, half its column, each as sines and cosines of ``dim / 4`` frequencies."""
    if dim % 4:
        raise ValueError(f"a 2D sine-cosine embedding needs a width divisible by 4, got {dim}")

    def one_axis(positions: torch.Tensor, width: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
        angles = positions[:, None].double() * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    patches = torch.cat([one_axis(rows.flatten(), dim // 2), one_axis(cols.flatten(), dim // 2)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patches]).float()


def build_vision() -> Blip2VisionModel:
    """A random mini EVA ViT (:data:`VISION_LAYERS` blocks of width :data:`VISION_HIDDEN`, 4 heads),
    its learned position embedding started at :func:`sincos_position_embedding`.

    Why the sine-cosine start: a from-scratch ViT must first learn where its patches are before it
    can tell shapes apart, and a random start (std 0.02) leaves that to the data. Measured on the
    build's recipe (one run each, a linear probe on held-out renders), after 3000 steps: shape
    0.343 from the random start, 0.533 from the sine-cosine one. How it grows from there is on
    :attr:`~thinkdiff.miniworld.budgets.BuildConfig.vision_steps`.
    """
    config = Blip2VisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=4,
        image_size=VISION_IMAGE_SIZE,
        patch_size=VISION_PATCH,
        # BLIP-2's default (1e-10) suits a checkpoint that is always loaded; trained from scratch,
        # a tower that starts at zero barely learned shape or texture. ViT's usual 0.02 instead.
        initializer_range=0.02,
    )
    model = Blip2VisionModel(config)
    grid = config.image_size // config.patch_size
    with torch.no_grad():  # after the random init, so the seed's other draws stay as they were
        model.embeddings.position_embedding.copy_(sincos_position_embedding(grid, config.hidden_size)[None])
    return model


def preprocess(images_BHWC: np.ndarray) -> torch.Tensor:
    """BLIP-2's transform (what the ThinkDiff-CLIP data loader applies) for a batch of renders."""
    return torch.stack([blip2_preprocess(to_pil(im), VISION_IMAGE_SIZE) for im in images_BHWC])


class _FastPreprocess:
    """:func:`preprocess` of 32 px renders as two matrix products (training only; at 32 px the
    resize is the identity).

    PIL's bicubic resize is separable and linear: a horizontal pass, rounded to uint8, then a
    vertical one. Its weights are read from PIL itself (the resize of unit impulses), so the result
    matches :func:`preprocess` to within one grey level, without a PIL image per sample.
    """

    def __init__(self) -> None:
        weights = np.zeros((VISION_IMAGE_SIZE, IMAGE_SIZE), np.float32)
        for j in range(IMAGE_SIZE):
            impulse = np.zeros((1, IMAGE_SIZE), np.float32)
            impulse[0, j] = 1.0
            row = Image.fromarray(impulse, "F").resize((VISION_IMAGE_SIZE, 1), Image.Resampling.BICUBIC)
            weights[:, j] = np.asarray(row)[0]
        self.weights = torch.from_numpy(weights)  # [input side, render side]
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def __call__(self, images_BHWC: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images_BHWC)).float().permute(0, 3, 1, 2)
        wide = torch.matmul(x, self.weights.T).round().clamp(0, 255)
        full = torch.matmul(self.weights, wide).round().clamp(0, 255)
        return (full / 255 - self.mean) / self.std


def attribute_alternatives(scene: Scene, name: str) -> list[str]:
    """Captions that name the scene's shape and one attribute ``name``, one per value of that
    attribute in :data:`ATTRIBUTES` order: the scene's own caption and its hard negatives, which
    differ from it in exactly that attribute (``a star`` ... ``a house`` for the shape,
    ``a red star``, ``a white star`` ... for the object colour)."""
    parts = {"color": None, "texture": None, "background": None}
    out = []
    for value in ATTRIBUTES[name]:
        if name == "shape":
            out.append(caption(value))
        else:
            out.append(caption(scene.shape, **(parts | {name: value})))
    return out


def _image_embedding(vision: Blip2VisionModel, pixel_values_BCHW: torch.Tensor) -> torch.Tensor:
    """The contrastive image embedding: the mean of all output tokens, not CLS alone. Measured at
    1500 steps: shape / texture probes 0.32 / 0.58 with the mean, 0.23 / 0.48 with CLS; the
    mean puts the attributes in every token that ThinkDiff-CLIP reads, not only in the CLS."""
    return vision(pixel_values=pixel_values_BCHW).last_hidden_state.mean(1)


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
    """Train the vision tower contrastively on ``pool``; save it with its image processor.

    Each step: ``batch_size`` renders; CLIP's symmetric loss between them and their full captions
    (in-batch negatives), plus, per attribute, a softmax of each render over its
    :func:`attribute_alternatives` (hard negatives), averaged over the attributes.
    """
    from tqdm.auto import tqdm
    from transformers import BlipImageProcessorPil

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    vision = build_vision()
    text = _TextTower(len(tokenizer), VISION_HIDDEN)
    image_proj = nn.Linear(VISION_HIDDEN, VISION_HIDDEN, bias=False)
    logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    params = [*vision.parameters(), *text.parameters(), *image_proj.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    fast_preprocess = _FastPreprocess()
    rng = random.Random(f"vision-train:{seed}")
    losses: list[float] = []
    started = time.perf_counter()
    for step in tqdm(range(steps), desc="mini vision", disable=not progress, dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=min(100, steps // 10 + 1))
        idx = [rng.randrange(len(pool)) for _ in range(batch_size)]
        scenes = [pool.scenes[i] for i in idx]
        captions = [full_caption(scene) for scene in scenes]
        alternatives = {
            name: [attribute_alternatives(scene, name) for scene in scenes] for name in ATTRIBUTES
        }
        # Every distinct text of the step through the text tower once (at most ~300 of them).
        texts = sorted({*captions, *(t for rows in alternatives.values() for row in rows for t in row)})
        row_of = {t: i for i, t in enumerate(texts)}
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        image_BD = F.normalize(
            image_proj(_image_embedding(vision, fast_preprocess(pool.images[idx]))), dim=-1
        )
        text_ND = F.normalize(text(enc.input_ids, enc.attention_mask), dim=-1)
        scale = logit_scale.clamp(max=np.log(100)).exp()
        # CLIP's symmetric loss on the full captions; a caption twice in a batch counts as a
        # positive of both images.
        logits_BB = scale * image_BD @ text_ND[[row_of[c] for c in captions]].T
        same_BB = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        targets_BB = same_BB / same_BB.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits_BB, targets_BB) + F.cross_entropy(logits_BB.T, targets_BB)) / 2
        # Hard negatives: per attribute, the image against every value of it (the rest equal).
        for name, values in ATTRIBUTES.items():
            rows_BV = torch.tensor([[row_of[t] for t in row] for row in alternatives[name]])
            logits_BV = scale * torch.einsum("bd,bvd->bv", image_BD, text_ND[rows_BV])
            labels_B = torch.tensor([values.index(scene.value(name)) for scene in scenes])
            loss = loss + F.cross_entropy(logits_BV, labels_B) / len(ATTRIBUTES)
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
    record = {
        "steps": steps,
        "batch_size": batch_size,
        "seconds": round(seconds, 1),
    }
    save_losses(folder / "training.json", losses, **record)
    return record


def linear_probe_accuracy(
    x_train_ND: torch.Tensor,
    y_train_N: torch.Tensor,
    x_test_ND: torch.Tensor,
    y_test_N: torch.Tensor,
    num_classes: int,
    steps: int = 300,
) -> float:
    """Accuracy on the test set of a linear classifier fitted (full batch, Adam) on the training
    set; the features are standardised with the training set's statistics."""
    mean, std = x_train_ND.mean(0), x_train_ND.std(0) + 1e-6
    x_train_ND, x_test_ND = (x_train_ND - mean) / std, (x_test_ND - mean) / std
    with torch.random.fork_rng():  # the same probe from run to run, the global RNG untouched
        torch.manual_seed(0)
        probe = nn.Linear(x_train_ND.shape[1], num_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(probe(x_train_ND), y_train_N)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((probe(x_test_ND).argmax(-1) == y_test_N).float().mean())


@torch.no_grad()
def probe_accuracy(folder: Path, train: ScenePool, test: ScenePool, steps: int = 300) -> dict[str, float]:
    """How much each attribute is linearly readable from the pooled tokens that ThinkDiff-CLIP
    reads (:class:`~thinkdiff.models.clip_vision.CLIPVisionFeatures`, all 17 tokens flattened): a
    :func:`linear_probe_accuracy` per attribute, fitted on ``train``, measured on ``test``."""
    from thinkdiff.models.clip_vision import CLIPVisionFeatures

    features = CLIPVisionFeatures.from_pretrained(folder, device="cpu", dtype=torch.float32)

    def embed(pool: ScenePool) -> torch.Tensor:
        return torch.cat(
            [features(preprocess(pool.images[i : i + 256])).flatten(1) for i in range(0, len(pool), 256)]
        )

    x_train, x_test = embed(train), embed(test)
    out = {}
    for name, values in ATTRIBUTES.items():
        y_train = torch.tensor([values.index(s.value(name)) for s in train.scenes])
        y_test = torch.tensor([values.index(s.value(name)) for s in test.scenes])
        out[name] = linear_probe_accuracy(x_train, y_train, x_test, y_test, len(values), steps)
    return out


def vision_probe(folder: Path, *, n_train: int, n_test: int, seed: int) -> dict[str, float]:
    """:func:`probe_accuracy` of the tower in ``folder``: probes fitted on ``n_train`` fresh renders
    of training cells, accuracy (attribute -> fraction) on ``n_test`` renders that include the
    held-out cells (the report's ``vision_probe``)."""
    from thinkdiff.miniworld.pool import render_pool

    train = render_pool(n_train, seed, progress=False)
    test = render_pool(n_test, seed + 1, allow_held_out=True, progress=False)
    return probe_accuracy(folder, train, test)

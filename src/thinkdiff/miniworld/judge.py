"""The judge: reads the four attributes back out of an image of the miniature world.

Colours are read by exact pixel statistics, which a generator cannot talk its way past: the
background is the palette colour nearest to the median of the border pixels, the object colour the
most frequent palette colour among the object's interior pixels (those far from the background and
from the texture grey, whose 4-neighbours are not background either, so anti-aliased edges, whose
mix of two palette colours can land on a third, do not vote). A pixel only counts when it lies
within :data:`COLOR_TOLERANCE` of a palette colour, and the background only when its median does:
a smeared or off-palette image reads as "unreadable", never as a lucky guess.

Shape and texture are read by a small CNN (:class:`JudgeNet`) trained on renders only (never on
generated images), with extra noise and colour jitter as augmentation; its accuracy is measured on
renders of the held-out combinations, which it never saw. The CNN also has colour heads, used only
to report how far the two readings agree.

Shapes: B images, H height, W width, C channels.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thinkdiff.miniworld.world import (
    ATTRIBUTES,
    COLORS,
    GREY,
    HELD_OUT,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    TEXTURES,
    render_batch,
    sample_scene,
    scene_rng,
)

__all__ = [
    "COLOR_TOLERANCE",
    "Judge",
    "JudgeNet",
    "Verdict",
    "held_out_scenes",
    "judge_accuracy",
    "pixel_background",
    "pixel_color",
    "train_judge",
]

logger = logging.getLogger(__name__)

COLOR_TOLERANCE = 60.0
"""Largest RGB distance at which a pixel (or the border median) counts as a palette colour; the
palette colours are at least 127 apart, so no pixel is within tolerance of two."""
_PALETTE_KC = np.array([PALETTE[c] for c in COLORS], np.float32)
_GREY = np.array(GREY, np.float32)
UNREADABLE = "?"
"""What the judge answers for an attribute it cannot read."""


def _nearest(rgb_NC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour and its distance, for each of N colours."""
    dist_NK = np.linalg.norm(rgb_NC[:, None, :].astype(np.float32) - _PALETTE_KC[None], axis=-1)
    index_N = dist_NK.argmin(1)
    return index_N, dist_NK[np.arange(len(index_N)), index_N]


def pixel_background(image_HWC: np.ndarray) -> str:
    """The background colour: the palette colour nearest the median border pixel, or ``"?"``."""
    border = np.concatenate([image_HWC[0], image_HWC[-1], image_HWC[1:-1, 0], image_HWC[1:-1, -1]])
    median = np.median(border.astype(np.float32), axis=0)
    index, dist = _nearest(median[None])
    return COLORS[int(index[0])] if dist[0] <= COLOR_TOLERANCE else UNREADABLE


def pixel_color(image_HWC: np.ndarray, background: str | None = None) -> str:
    """The object colour: the most frequent palette colour among interior object pixels, or ``"?"``."""
    background = background or pixel_background(image_HWC)
    pixels = image_HWC.astype(np.float32)
    if background == UNREADABLE:
        return UNREADABLE
    bg_HW = np.linalg.norm(pixels - np.array(PALETTE[background], np.float32), axis=-1) <= COLOR_TOLERANCE
    near_bg = bg_HW.copy()  # background pixels and their 4-neighbours: where edges mix two colours
    near_bg[1:] |= bg_HW[:-1]
    near_bg[:-1] |= bg_HW[1:]
    near_bg[:, 1:] |= bg_HW[:, :-1]
    near_bg[:, :-1] |= bg_HW[:, 1:]
    candidates = pixels[~near_bg]
    if len(candidates) == 0:
        return UNREADABLE
    candidates = candidates[np.linalg.norm(candidates - _GREY, axis=-1) > COLOR_TOLERANCE]
    index, dist = _nearest(candidates) if len(candidates) else (np.zeros(0, int), np.zeros(0))
    votes = Counter(int(i) for i in index[dist <= COLOR_TOLERANCE])
    votes.pop(COLORS.index(background), None)
    if not votes:
        return UNREADABLE
    return COLORS[votes.most_common(1)[0][0]]


# ----------------------------------------------------------------------------------- the CNN
class JudgeNet(nn.Module):
    """A small CNN with one 10-way head per attribute (shape, texture, color, background)."""

    HEADS: tuple[str, ...] = ("shape", "texture", "color", "background")

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.MaxPool2d(2),
            )  # fmt: skip

        # The first block is narrow: it runs at full resolution and dominates the cost.
        self.features = nn.Sequential(
            block(3, width // 2), block(width // 2, 2 * width), block(2 * width, 4 * width)
        )
        side = IMAGE_SIZE // 8
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * side * side, 256), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(ATTRIBUTES[name])) for name in self.HEADS})

    def forward(self, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for images scaled to [-1, 1]."""
        h = self.trunk(self.features(images_BCHW))
        return {name: head(h) for name, head in self.heads.items()}


def to_tensor(images_BHWC: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(images_BHWC)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class Verdict:
    """What the judge reads in one image (``"?"`` for an attribute it cannot read)."""

    shape: str
    color: str
    background: str
    texture: str
    cnn_color: str
    cnn_background: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)

    def matches(self, target: dict[str, str]) -> bool:
        """True when every attribute named in ``target`` is read as that value."""
        return all(self.value(k) == v for k, v in target.items())

    def to_dict(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ("shape", "color", "background", "texture")}


class Judge:
    """Pixel statistics for colours, :class:`JudgeNet` for shape and texture."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def read(self, images_BHWC: np.ndarray | Sequence[np.ndarray], batch_size: int = 512) -> list[Verdict]:
        """Read every image (uint8 [H, W, 3] arrays)."""
        images = np.asarray(images_BHWC, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"the judge reads uint8 [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got {images.shape}")
        verdicts = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            logits = self.net(to_tensor(chunk))
            best = {k: v.argmax(-1).tolist() for k, v in logits.items()}
            for i, image in enumerate(chunk):
                background = pixel_background(image)
                verdicts.append(
                    Verdict(
                        shape=SHAPES[best["shape"][i]],
                        texture=TEXTURES[best["texture"][i]],
                        color=pixel_color(image, background),
                        background=background,
                        cnn_color=COLORS[best["color"][i]],
                        cnn_background=COLORS[best["background"][i]],
                    )
                )
        return verdicts

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / "judge.safetensors")
        )
        (folder / "config.json").write_text(json.dumps({"width": self.width}, indent=2) + "\n")

    @property
    def width(self) -> int:
        return 2 * self.net.features[0][0].out_channels

    @classmethod
    def load(cls, folder: Path) -> Judge:
        from safetensors.torch import load_file

        config = json.loads((Path(folder) / "config.json").read_text())
        net = JudgeNet(width=config["width"])
        net.load_state_dict(load_file(str(Path(folder) / "judge.safetensors")), strict=True)
        return cls(net)


# ----------------------------------------------------------------------------------- training
def _labels(scenes) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor([ATTRIBUTES[name].index(s.value(name)) for s in scenes]) for name in JudgeNet.HEADS
    }


def held_out_scenes(n: int, seed: int) -> list:
    """``n`` scenes each in a held-out cell of some theme (what no component trains on)."""
    rng = scene_rng("judge-held-out", seed)
    cells = [(theme, pair) for theme, pairs in sorted(HELD_OUT.items()) for pair in sorted(pairs)]
    scenes = []
    for i in range(n):
        theme, (detail, shape) = cells[i % len(cells)]
        scenes.append(sample_scene(rng, shape=shape, **{theme.split("_")[0]: detail}, allow_held_out=True))
    return scenes


def train_judge(
    *, seed: int, num_train: int, steps: int, batch_size: int = 128, lr: float = 2e-3, progress: bool = True
) -> tuple[Judge, list[float]]:
    """Train :class:`JudgeNet` on ``num_train`` fresh renders; returns the judge and its loss curve.

    Unlike the components, the judge trains on every cell, held-out ones included: it is the
    measuring instrument and must read the held-out combinations the tests ask for.
    """
    from tqdm.auto import tqdm

    rng = scene_rng("judge-train", seed)
    scenes = [sample_scene(rng, allow_held_out=True) for _ in range(num_train)]
    images = torch.from_numpy(render_batch(scenes))
    labels = _labels(scenes)
    torch.manual_seed(seed)
    net = JudgeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for _ in tqdm(range(steps), desc="judge", disable=not progress, dynamic_ncols=True):
        idx = torch.randint(len(scenes), (batch_size,), generator=gen)
        x = images[idx].permute(0, 3, 1, 2).float()
        # Robustness to a generator's near-misses: more noise and a small colour cast than renders have.
        x = x + torch.randn(x.shape, generator=gen) * torch.rand(batch_size, 1, 1, 1, generator=gen) * 12
        x = x + (torch.rand(batch_size, 3, 1, 1, generator=gen) - 0.5) * 24
        x = x.clamp(0, 255) / 127.5 - 1.0
        logits = net(x)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in JudgeNet.HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return Judge(net), losses


def attribute_accuracy(verdicts: Sequence[Verdict], scenes: Sequence) -> dict[str, float]:
    """Share of verdicts whose attribute equals the scene's, per attribute and all four at once."""
    out = {
        k: float(np.mean([v.value(k) == s.value(k) for v, s in zip(verdicts, scenes)])) for k in ATTRIBUTES
    }
    out["all"] = float(
        np.mean([v.matches({k: s.value(k) for k in ATTRIBUTES}) for v, s in zip(verdicts, scenes)])
    )
    return out


def judge_accuracy(judge: Judge, scenes: Sequence) -> dict[str, float]:
    """Per-attribute accuracy (and ``all``) of the judge's verdict on renders of ``scenes``;
    ``cnn_color``/``cnn_background`` are the CNN's colour heads, for comparison."""
    started = time.perf_counter()
    verdicts = judge.read(render_batch(scenes))
    out: dict[str, float] = attribute_accuracy(verdicts, scenes)
    out["cnn_color"] = float(np.mean([v.cnn_color == s.color for v, s in zip(verdicts, scenes)]))
    out["cnn_background"] = float(
        np.mean([v.cnn_background == s.background for v, s in zip(verdicts, scenes)])
    )
    out["n"] = len(scenes)
    logger.info("judge read %d renders in %.1f s", len(scenes), time.perf_counter() - started)
    return out

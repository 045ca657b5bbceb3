"""The miniature world: procedurally rendered objects with four attributes, and their captions.

Every image is one object (a *shape*, 10 kinds) with an *object colour* and a *texture* on a
*background colour*, at a random position and size, with up to two small distracting specks and
pixel noise. Captions are templated ("a red striped star on a blue background") and may mention any
subset of colour, texture and background; the shape is always named.

Three CoBSAT-style themes pair one attribute (the *detail*) with the shape (the *object*):
``color_shape`` (object colour), ``background_shape`` (background colour) and ``texture_shape``.
Each theme is a 10 x 10 grid; :data:`HELD_OUT` removes 10 cells of every grid (one per detail and
one per shape) from everything the components are trained on, so that tests can ask for
combinations no component has seen. Object colour and background colour share the same ten colour
words, so a word list alone does not say which of the two it describes: only the images do.

Rendering is deterministic: a :class:`Scene` holds every random choice (noise seed included), and
:func:`render` draws it at 4x resolution, box-downsamples to :data:`IMAGE_SIZE` and adds the noise.

Shapes: H height, W width, C channels (RGB).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES",
    "COLORS",
    "GREY",
    "HELD_OUT",
    "IMAGE_SIZE",
    "PALETTE",
    "SHAPES",
    "TEXTURES",
    "THEMES",
    "Scene",
    "canonical",
    "caption",
    "full_caption",
    "is_held_out",
    "parse_caption",
    "random_caption",
    "render",
    "render_batch",
    "sample_scene",
    "scene_rng",
    "theme_caption",
    "to_pil",
    "with_attributes",
]

IMAGE_SIZE = 32
"""Side of every image, in pixels."""
_SCALE = 4  # drawn at 4x, then box-downsampled: anti-aliased edges without a resampling filter
SIZE_RANGE = (15.0, 23.0)
"""Side of the object's bounding box, in pixels (uniform)."""
NOISE_STD = 5.0
"""Standard deviation of the Gaussian pixel noise (0-255 scale)."""
MAX_SPECKS = 2
"""Distractors: up to this many 2x2 specks of another colour, outside the object."""

# CoBSAT's colour words in CoBSAT's order; RGB values at least 127 apart from each other.
COLORS: tuple[str, ...] = (
    "yellow", "white", "red", "purple", "pink", "orange", "green", "brown", "blue", "black",
)  # fmt: skip
PALETTE: dict[str, tuple[int, int, int]] = {
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "purple": (128, 0, 192),
    "pink": (255, 128, 192),
    "orange": (255, 128, 0),
    "green": (0, 160, 0),
    "brown": (128, 64, 0),
    "blue": (0, 64, 255),
    "black": (0, 0, 0),
}
GREY: tuple[int, int, int] = (128, 128, 128)
"""The second tone of every texture; at least 142 away from every palette colour, so it is never
read as one."""
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "cross", "diamond", "moon", "arrow", "house",
)  # fmt: skip
TEXTURES: tuple[str, ...] = (
    "solid", "striped", "barred", "slanted", "checkered", "dotted", "gridded", "outlined", "framed",
    "halved",
)  # fmt: skip

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "background": COLORS,
    "texture": TEXTURES,
}
"""The four attributes of a scene and their values, in option order."""

THEMES: tuple[str, ...] = ("color_shape", "background_shape", "texture_shape")
"""``{detail}_{object}`` themes, as in CoBSAT; the object is always the shape."""


def _held_out() -> dict[str, frozenset[tuple[str, str]]]:
    # A different Latin-square diagonal per theme: every detail and every shape is held out once.
    out = {}
    for t, theme in enumerate(THEMES):
        detail = theme.split("_")[0]
        pairs = {(ATTRIBUTES[detail][i], SHAPES[(3 * i + 2 * t + 1) % 10]) for i in range(10)}
        out[theme] = frozenset(pairs)
    return out


HELD_OUT: dict[str, frozenset[tuple[str, str]]] = _held_out()
"""Per theme, the 10 (detail, shape) cells that no component trains on."""


@dataclass(frozen=True)
class Scene:
    """Everything that decides one image."""

    shape: str
    color: str
    background: str
    texture: str
    cx: float
    """Centre of the object's bounding box, in pixels."""
    cy: float
    size: float
    """Side of the object's bounding box, in pixels."""
    specks: tuple[tuple[int, int, str], ...] = ()
    """Distractors: (x, y, colour) of 2x2 specks (top-left corner)."""
    noise_seed: int = 0

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(values)}")
        if self.color == self.background:
            raise ValueError(f"object colour and background are both {self.color!r}: the object would vanish")

    def value(self, attribute: str) -> str:
        """The value of ``shape``, ``color``, ``background`` or ``texture``."""
        return getattr(self, attribute)


def is_held_out(shape: str, color: str, background: str, texture: str) -> bool:
    """True when any theme's (detail, shape) pair of these attributes is a held-out cell."""
    return (
        (color, shape) in HELD_OUT["color_shape"]
        or (background, shape) in HELD_OUT["background_shape"]
        or (texture, shape) in HELD_OUT["texture_shape"]
    )


def scene_rng(*key: object) -> random.Random:
    """A private RNG seeded by a readable key (same stream on every machine and run)."""
    return random.Random(":".join(str(k) for k in key))


def sample_scene(
    rng: random.Random,
    *,
    shape: str | None = None,
    color: str | None = None,
    background: str | None = None,
    texture: str | None = None,
    allow_held_out: bool = False,
) -> Scene:
    """Draw a scene; given attributes are kept, the others drawn uniformly.

    Unless ``allow_held_out``, attribute combinations in a held-out cell of any theme are redrawn
    (``ValueError`` if the given attributes themselves form one). The object colour never equals
    the background.
    """
    given = {"shape": shape, "color": color, "background": background, "texture": texture}
    if color is not None and color == background:
        raise ValueError(f"object colour and background are both {color!r}")
    for _ in range(1000):
        values = {k: v if v is not None else rng.choice(ATTRIBUTES[k]) for k, v in given.items()}
        if values["color"] == values["background"]:
            continue
        if allow_held_out or not is_held_out(**values):
            break
    else:
        raise ValueError(f"attributes {given} fall in a held-out cell; pass allow_held_out=True")
    size = rng.uniform(*SIZE_RANGE)
    half = size / 2
    cx = rng.uniform(half + 1, IMAGE_SIZE - half - 1)
    cy = rng.uniform(half + 1, IMAGE_SIZE - half - 1)
    specks = []
    for _ in range(rng.randint(0, MAX_SPECKS)):
        for _ in range(20):  # outside the object's box (1 px margin), else give up on this speck
            x, y = rng.randint(0, IMAGE_SIZE - 2), rng.randint(0, IMAGE_SIZE - 2)
            if x + 2 < cx - half - 1 or x > cx + half + 1 or y + 2 < cy - half - 1 or y > cy + half + 1:
                colour = rng.choice([c for c in COLORS if c != values["background"]])
                specks.append((x, y, colour))
                break
    return Scene(**values, cx=cx, cy=cy, size=size, specks=tuple(specks), noise_seed=rng.getrandbits(31))


# ----------------------------------------------------------------------------------- drawing
def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / points
        out.append((r * math.cos(a), r * math.sin(a)))
    return out


def _heart() -> list[tuple[float, float]]:
    pts = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x, y))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    scale = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return [((x - cx) / scale, (y - cy) / scale) for x, y in pts]


def _cross(w: float = 0.34) -> list[tuple[float, float]]:
    """A plus sign with arms ``2 w`` wide, clockwise from the top arm's left edge."""
    return [
        (-w, -1),
        (w, -1),
        (w, -w),
        (1, -w),
        (1, w),
        (w, w),
        (w, 1),
        (-w, 1),
        (-w, w),
        (-1, w),
        (-1, -w),
        (-w, -w),
    ]


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(0.0, -1.0), (1.0, 0.85), (-1.0, 0.85)],
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
    "diamond": [(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)],
    "arrow": [(-1, -0.3), (0.1, -0.3), (0.1, -0.9), (1, 0), (0.1, 0.9), (0.1, 0.3), (-1, 0.3)],
    "house": [(-0.8, 1.0), (0.8, 1.0), (0.8, -0.15), (0.0, -1.0), (-0.8, -0.15)],
}


def _shape_mask(scene: Scene) -> np.ndarray:
    """Boolean [H*4, W*4] mask of the object at drawing resolution."""
    n = IMAGE_SIZE * _SCALE
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = scene.cx * _SCALE, scene.cy * _SCALE, scene.size * _SCALE / 2

    def box(scale: float, dx: float = 0.0) -> tuple[float, float, float, float]:
        return (cx + dx - r * scale, cy - r * scale, cx + dx + r * scale, cy + r * scale)

    if scene.shape == "circle":
        draw.ellipse(box(0.95), fill=255)
    elif scene.shape == "moon":
        draw.ellipse(box(1.0), fill=255)
        draw.ellipse(box(0.85, dx=0.55 * r), fill=0)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _POLYGONS[scene.shape]], fill=255)
    return np.asarray(mask) > 127


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1)^2 square, from a summed-area table (no SciPy needed)."""
    k = 2 * radius + 1
    padded = np.pad(mask.astype(np.int32), radius)
    table = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), np.int32)
    table[1:, 1:] = padded.cumsum(0).cumsum(1)
    window = table[k:, k:] - table[:-k, k:] - table[k:, :-k] + table[:-k, :-k]
    return window == k * k


def _texture_mask(scene: Scene, mask: np.ndarray) -> np.ndarray:
    """Boolean mask (same shape as ``mask``) of the pixels painted in the object colour; the rest
    of the object is :data:`GREY`. Patterns are in object coordinates so they move with it."""
    n = mask.shape[0]
    coords = (np.arange(n) + 0.5) / _SCALE  # pixel centres, in output pixels
    u = coords[None, :] - (scene.cx - scene.size / 2)
    v = coords[:, None] - (scene.cy - scene.size / 2)
    u, v = np.broadcast_to(u, mask.shape), np.broadcast_to(v, mask.shape)
    period = 4.0  # output pixels: two on, two off
    t = scene.texture
    if t == "solid":
        return mask
    if t == "striped":
        pattern = (v // 2) % 2 == 0
    elif t == "barred":
        pattern = (u // 2) % 2 == 0
    elif t == "slanted":
        pattern = ((u + v) // 2.4) % 2 == 0
    elif t == "checkered":
        pattern = ((u // 2) + (v // 2)) % 2 == 0
    elif t == "dotted":
        pattern = ((u % period) - 2) ** 2 + ((v % period) - 2) ** 2 > 1.1**2
    elif t == "gridded":
        pattern = ((u % period) >= 1) & ((v % period) >= 1)
    elif t in ("outlined", "framed"):
        rim = mask & ~_erode(mask, radius=2 * _SCALE - 1)
        return rim if t == "outlined" else mask & ~rim
    elif t == "halved":
        pattern = v < scene.size / 2
    else:  # pragma: no cover - Scene validates the texture
        raise ValueError(t)
    return mask & pattern


def render(scene: Scene, *, noise: bool = True) -> np.ndarray:
    """The image of a scene: uint8 [H, W, 3], identical on every call (``noise=False``: without
    the pixel noise)."""
    n = IMAGE_SIZE * _SCALE
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = PALETTE[scene.background]
    mask = _shape_mask(scene)
    paint = _texture_mask(scene, mask)
    canvas[mask] = GREY
    canvas[paint] = PALETTE[scene.color]
    image = canvas.reshape(IMAGE_SIZE, _SCALE, IMAGE_SIZE, _SCALE, 3).mean(axis=(1, 3))
    for x, y, colour in scene.specks:
        image[y : y + 2, x : x + 2] = PALETTE[colour]
    if noise:
        image = image + np.random.default_rng(scene.noise_seed).normal(0.0, NOISE_STD, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """uint8 [B, H, W, 3] of many scenes."""
    return (
        np.stack([render(s) for s in scenes])
        if scenes
        else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    )


def to_pil(image_HWC: np.ndarray) -> Image.Image:
    """A rendered (or generated) uint8 array as a PIL image."""
    return Image.fromarray(np.asarray(image_HWC, dtype=np.uint8), "RGB")


# ----------------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(
    shape: str, color: str | None = None, texture: str | None = None, background: str | None = None
) -> str:
    """``a red striped star on a blue background``; the parts left ``None`` are not mentioned."""
    words = [w for w in (color, texture, shape) if w is not None]
    text = f"{_article(words[0])} {' '.join(words)}"
    if background is not None:
        text += f" on {_article(background)} {background} background"
    return text


def full_caption(scene: Scene) -> str:
    """The caption naming all four attributes."""
    return caption(scene.shape, scene.color, scene.texture, scene.background)


def theme_caption(theme: str, shape: str, detail: str) -> str:
    """What an image of a theme must show, as a caption: ``a red star`` (color_shape),
    ``a star on a red background`` (background_shape), ``a striped star`` (texture_shape)."""
    if theme == "color_shape":
        return caption(shape, color=detail)
    if theme == "background_shape":
        return caption(shape, background=detail)
    if theme == "texture_shape":
        return caption(shape, texture=detail)
    raise ValueError(f"unknown theme {theme!r}; choose one of {', '.join(THEMES)}")


def random_caption(scene: Scene, rng: random.Random) -> str:
    """A caption of the scene naming the shape and a random subset of the other attributes."""
    keep = {name: rng.random() < 0.5 for name in ("color", "texture", "background")}
    return caption(
        scene.shape,
        scene.color if keep["color"] else None,
        scene.texture if keep["texture"] else None,
        scene.background if keep["background"] else None,
    )


@functools.lru_cache(maxsize=1)
def _word_kinds() -> dict[str, str]:
    kinds = {w: "shape" for w in SHAPES} | {w: "texture" for w in TEXTURES}
    kinds |= {w: "color" for w in COLORS}
    return kinds


def parse_caption(text: str) -> dict[str, str]:
    """Read the attributes a caption names: ``{"shape": ..., "color": ..., ...}`` (missing ones absent).

    A colour word right before ``background`` is the background; any other colour word is the
    object's. The first word of each kind wins; unknown words are ignored.
    """
    words = text.lower().replace(",", " ").replace(".", " ").split()
    kinds = _word_kinds()
    found: dict[str, str] = {}
    for i, word in enumerate(words):
        kind = kinds.get(word)
        if kind == "color" and i + 1 < len(words) and words[i + 1] == "background":
            kind = "background"
        if kind is not None and kind not in found:
            found[kind] = word
    return found


CANONICAL_SIZE = 20.0
"""Object size of :func:`canonical` scenes."""


def canonical(scene: Scene) -> Scene:
    """The scene as the decoder learns to draw it: the same attributes, the object centred at
    :data:`CANONICAL_SIZE`, no specks (render it with ``noise=False``).

    A caption says nothing of position, size, specks or noise, so the decoder need not learn to
    scatter them; they exist to make *reading* images hard. (Measured: with the object free to
    move by even 1 px against FLUX's 4x4-pixel tokens, 1200 steps gave blocky shapes at 30-45%
    shape accuracy; the feasibility run's centred objects reached 99%.)
    """
    centre = IMAGE_SIZE / 2
    return replace(scene, cx=centre, cy=centre, size=CANONICAL_SIZE, specks=())


def with_attributes(scene: Scene, **values: str) -> Scene:
    """A copy of ``scene`` with some attributes replaced (validated)."""
    return replace(scene, **values)

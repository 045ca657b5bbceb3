"""Generation requests: the interleaved inputs, checked and loaded before any model is.

A request is an ordered list of items (``str`` text, PIL images, or image paths), a seed, optional
extra text and optional per-request decoder settings. :func:`prepare_requests` opens every image
and checks counts up front, so that bad input fails with one clear message before minutes of model
loading, and no output file is ever started for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from thinkdiff.imaging import open_rgb, to_rgb
from thinkdiff.pipelines.constants import DEFAULT_INSTRUCTION, MODES, Mode

__all__ = [
    "DEFAULT_INSTRUCTION",
    "MODES",
    "Item",
    "Mode",
    "PreparedRequest",
    "Request",
    "cobsat_items",
    "prepare_requests",
]

Item = str | Image.Image | os.PathLike
"""One piece of an interleaved input: ``str`` is text; a PIL image or a path (``os.PathLike``) is an image."""


@dataclass
class Request:
    """One generation: interleaved inputs, a seed, and optional overrides of the call's settings.

    ``None`` settings fall back to the pipeline call's values, then to the stock decoder's defaults.
    """

    items: Sequence[Item]
    """Texts and images in order, e.g. ``["Word 1: white, ", img1, "\\n\\nWord 2: blue, ", img2]``."""
    seed: int = 0
    """Seeds both the LVLM's sampling and the decoder's initial noise (a CPU ``torch.Generator``)."""
    extra_text: str | None = None
    """lvlm: encoded by the decoder's T5 and appended after the aligned tokens; clip: appended to
    the text part; text-bridge: appended to the prompt the LVLM wrote."""
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    """FLUX only: true classifier-free guidance above 1 (negative: the decoder's T5 of ``""``)."""
    num_frames: int | None = None
    """Video decoders only."""
    qcd_alpha: float | None = None
    """lvlm and text-bridge: query-contrastive decoding weight (``None``: the pipeline's setting)."""
    hint: bool | None = None
    """lvlm and text-bridge: append the pipeline's hint (or ``HINT_INSTRUCTION``) to the instruction
    (True) or not (False); ``None``: the pipeline's setting."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form data carried through to the output (the CLI copies it into the sidecar)."""


@dataclass
class PreparedRequest:
    """A :class:`Request` whose images are loaded (8-bit RGB by :func:`thinkdiff.imaging.to_rgb`) and
    counted; what the stages consume."""

    request: Request
    items: list[str | Image.Image]
    """The request's items with every image loaded; the instruction is not added here."""

    @property
    def images(self) -> list[Image.Image]:
        return [item for item in self.items if isinstance(item, Image.Image)]

    @property
    def texts(self) -> list[str]:
        return [item for item in self.items if isinstance(item, str)]


def _load_image(path: os.PathLike, where: str) -> Image.Image:
    try:
        return open_rgb(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{where}: {error}") from error
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


def prepare_requests(requests: Sequence[Request], max_images: int | None = None) -> list[PreparedRequest]:
    """Load every image and check every request; raise on the first bad one.

    Raises ``FileNotFoundError`` for a missing image file and ``ValueError`` for an unreadable
    image, an item that is neither text nor image, a request with no inputs, or more than
    ``max_images`` images.
    """
    if isinstance(requests, Request):
        requests = [requests]
    if len(requests) == 0:
        raise ValueError("no requests given")
    prepared = []
    for index, request in enumerate(requests):
        where = f"request {index}" if len(requests) > 1 else "input"
        items = request.items
        if isinstance(items, str | Image.Image | os.PathLike):
            raise ValueError(
                f"{where}: items must be a list of texts and images, got one {type(items).__name__}"
            )
        loaded: list[str | Image.Image] = []
        for item in items:
            if isinstance(item, str):
                loaded.append(item)
            elif isinstance(item, Image.Image):
                try:
                    loaded.append(to_rgb(item))
                except ValueError as error:
                    raise ValueError(f"{where}: {error}") from error
            elif isinstance(item, os.PathLike):
                loaded.append(_load_image(item, where))
            else:
                raise ValueError(
                    f"{where}: items must be str (text), PIL images or image paths, got {type(item).__name__}"
                )
        ready = PreparedRequest(request, loaded)
        if loaded and isinstance(loaded[0], str) and _is_unfixed_instruction(loaded[0]):
            # The pipeline would add the instruction again before it: the LVLM would read it twice.
            raise ValueError(
                f"{request.metadata.get('where', where)}: its first text is the CoBSAT instruction without its "
                "closing blank line, as job files exported before that fix wrote it; re-export them with "
                "`thinkdiff eval cobsat prompts --format thinkdiff`"
            )
        if not ready.images and not any(text.strip() for text in ready.texts):
            raise ValueError(f"{where}: no inputs: give at least one image or non-empty text")
        if max_images is not None and len(ready.images) > max_images:
            raise ValueError(f"{where}: {len(ready.images)} images, more than the {max_images} accepted")
        prepared.append(ready)
    return prepared


def _is_unfixed_instruction(text: str) -> bool:
    """Whether ``text`` is :data:`DEFAULT_INSTRUCTION` as written before it ended with its blank
    line (alone, or with a hint sentence after it as the old ``hinted`` wrote it)."""
    body = DEFAULT_INSTRUCTION.rstrip()
    return text.startswith(body) and not text.endswith(DEFAULT_INSTRUCTION[len(body) :])


def cobsat_items(words: Sequence[str], images: Sequence[Item], instruction: str | None = None) -> list[Item]:
    """Interleave words and images the way the released code formatted CoBSAT prompts.

    ``cobsat_items(["white", "blue", "red"], [img1, img2])`` gives
    ``["Word 1: white, ", img1, "\\n\\nWord 2: blue, ", img2, "\\n\\nWord 3: red, "]``: one image
    after each of the first ``len(images)`` words. With ``instruction`` it is the first item (the
    pipeline adds :data:`DEFAULT_INSTRUCTION` itself when the items do not start with it).
    """
    if len(images) > len(words):
        raise ValueError(f"{len(images)} images but only {len(words)} words: each image follows a word")
    items: list[Item] = [] if instruction is None else [instruction]
    for i, word in enumerate(words):
        separator = "" if i == 0 else "\n\n"
        items.append(f"{separator}Word {i + 1}: {word}, ")
        if i < len(images):
            items.append(images[i])
    return items

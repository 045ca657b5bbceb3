"""The one way images become 8-bit RGB: files, bytes and PIL images, for every model input.

``PIL.Image.convert("RGB")`` alone gets several kinds of image wrong: it clips 16-bit grayscale
(``I;16``, ``I;16B``, ``I``) to white instead of scaling it, drops transparency onto black, and
ignores the EXIF orientation. :func:`to_rgb` fixes these, and every place that feeds an image to a
model (``extract-features`` through the data sources, ``generate``, the LVLM and BLIP-2 inputs) goes
through it:

- EXIF orientation (tags 2-8) is applied first, as a viewer shows the image.
- 16-bit values keep their high byte (``v >> 8``, libpng's 16-to-8 reduction), the same reduction
  Pillow applies to 16-bit RGB(A) PNGs, so gray and colour 16-bit files agree; ``I`` (32-bit) is
  taken as 16-bit data, clipped to ``[0, 65535]`` first. Float images (``F``) are refused.
- Transparency (an alpha band, or a palette or colour key with transparency) is composited on
  :data:`BACKGROUND`, white like transformers' ``convert_rgb``: ``round((c * a + bg * (255 - a)) / 255)``.
- Every other mode (``P``, ``L``, ``1``, ``CMYK``, ``YCbCr``, ...) uses Pillow's conversion; for CMYK
  that is ``R = (255 - C) * (255 - K) / 255`` (an embedded ICC profile is not applied).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["BACKGROUND", "open_rgb", "to_rgb"]

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""What transparent pixels are composited on (white, as transformers' image processors do)."""

_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """An 8-bit RGB copy of ``image``, converted as the module docstring says.

    Raises ``ValueError`` for a mode that has no faithful 8-bit RGB form (``F``).
    """
    if image.getexif().get(_ORIENTATION, 1) in range(2, 9):
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise ValueError("32-bit float images (mode F) are not supported; save the image as 8 or 16 bit")
    if image.has_transparency_data:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
        alpha = rgba[..., 3:]
        rgb = (rgba[..., :3] * alpha + np.asarray(background, np.uint32) * (255 - alpha) + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return image.convert("RGB")


def open_rgb(source: str | os.PathLike | bytes) -> Image.Image:
    """Decode a whole image file (a path or its bytes) and convert it with :func:`to_rgb`.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` (naming the path, or
    "bytes") for anything that cannot be decoded: truncated, not an image, too large
    (``DecompressionBombError``), a float image.
    """
    if isinstance(source, bytes):
        name, stream = "bytes", io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        name, stream = str(path), path
    try:
        with warnings.catch_warnings():
            # PIL warns about odd EXIF chunks; they are data, not news for the user.
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(stream) as opened:
                opened.load()  # decodes every pixel: a truncated file fails here, not in a model
                return to_rgb(opened)
    # PIL's decoders raise many kinds (OSError, SyntaxError, struct.error, EOFError, ...): all
    # mean "this file is not a readable image".
    except Exception as error:
        # PIL names a buffer by its address; drop it so that reports are the same on every run.
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "bytes", str(error))
        raise ValueError(f"cannot read image {name}: {type(error).__name__}: {detail}") from error

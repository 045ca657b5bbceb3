"""Image conversion to 8-bit RGB, pixel by pixel against hand-computed values, on every input path."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thinkdiff.data.sources import SkipLog, iter_samples, list_source_shards
from thinkdiff.imaging import open_rgb, to_rgb
from thinkdiff.pipelines.requests import Request, prepare_requests

SIXTEEN = np.array([[0, 255, 256, 1000], [32768, 40000, 65280, 65535]], dtype=np.uint16)
SIXTEEN_8 = np.array([[0, 0, 1, 3], [128, 156, 255, 255]], dtype=np.uint8)  # v >> 8, by hand


def png16(values_HWC: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): gray, LA, RGB or RGBA."""
    height, width, channels = values_HWC.shape
    rows = b"".join(b"\x00" + values_HWC[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def gray_to_rgb(gray_HW: np.ndarray) -> np.ndarray:
    return np.repeat(gray_HW[..., None], 3, axis=-1)


def over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """round((c * a + 255 * (255 - a)) / 255), in integers."""
    color, alpha = color.astype(np.int64), alpha.astype(np.int64)
    return ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


# ---- 16 bit ------------------------------------------------------------------------------------


def test_16_bit_gray_png_is_scaled_not_clipped() -> None:
    data = encoded(Image.fromarray(SIXTEEN))  # Pillow opens it as I;16
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    np.testing.assert_array_equal(pixels(open_rgb(data)), gray_to_rgb(SIXTEEN_8))


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16"])
def test_16_bit_modes_in_memory_and_as_tiff(mode: str) -> None:
    packed = SIXTEEN.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    image = Image.frombytes(mode, (4, 2), packed)
    np.testing.assert_array_equal(pixels(to_rgb(image)), gray_to_rgb(SIXTEEN_8))
    reopened = Image.open(io.BytesIO(encoded(image, "TIFF")))
    assert reopened.mode.startswith("I;16")
    np.testing.assert_array_equal(pixels(open_rgb(encoded(image, "TIFF"))), gray_to_rgb(SIXTEEN_8))


def test_32_bit_integer_is_read_as_16_bit_and_clipped_to_its_range() -> None:
    image = Image.fromarray(np.array([[-5, 0, 1000, 65535, 70000]], dtype=np.int32), "I")
    np.testing.assert_array_equal(pixels(to_rgb(image)), gray_to_rgb(np.array([[0, 0, 3, 255, 255]])))


def test_16_bit_rgb_and_rgba_png() -> None:
    rgb = np.stack([SIXTEEN, SIXTEEN[::-1], SIXTEEN[:, ::-1]], axis=-1)
    expected = np.stack([SIXTEEN_8, SIXTEEN_8[::-1], SIXTEEN_8[:, ::-1]], axis=-1)
    np.testing.assert_array_equal(pixels(open_rgb(png16(rgb))), expected)

    alpha = np.array([[65535, 0, 32768, 65535], [0, 65535, 65535, 16384]], dtype=np.uint16)
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    expected_rgba = over_white(expected, (alpha >> 8)[..., None])
    np.testing.assert_array_equal(pixels(open_rgb(png16(rgba))), expected_rgba)


def test_float_images_are_refused() -> None:
    with pytest.raises(ValueError, match="mode F"):
        to_rgb(Image.new("F", (2, 2), 0.5))
    with pytest.raises(ValueError, match=r"cannot read image bytes: .*mode F"):
        open_rgb(encoded(Image.new("F", (2, 2), 0.5), "TIFF"))


# ---- transparency ------------------------------------------------------------------------------


def test_palette_with_transparency_is_composited_on_white() -> None:
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    colors = np.array(palette, dtype=np.uint8).reshape(-1, 3)

    # tRNS alphas per palette entry: 0 opaque red -> transparent, 3 half transparent
    alphas = np.array([0, 255, 255, 128], dtype=np.uint8)
    data = encoded(image, transparency=bytes(alphas))
    assert Image.open(io.BytesIO(data)).mode == "P"
    expected = over_white(colors[indices], alphas[indices][..., None])
    np.testing.assert_array_equal(pixels(open_rgb(data)), expected)
    assert expected[0, 0].tolist() == [255, 255, 255] and expected[0, 3].tolist() == [132, 137, 142]

    # Without transparency a palette image is its colours.
    np.testing.assert_array_equal(pixels(open_rgb(encoded(image))), colors[indices])


def test_la_and_rgba_are_composited_on_white() -> None:
    gray = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    alpha = np.array([[255, 0, 128, 1]], dtype=np.uint8)
    la = Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
    np.testing.assert_array_equal(
        pixels(open_rgb(encoded(la))), over_white(gray_to_rgb(gray), alpha[..., None])
    )
    assert over_white(np.array([0]), np.array([128])).tolist() == [127]  # 255 * 127 / 255

    color = np.array([[[10, 20, 30], [200, 100, 0], [0, 0, 0], [90, 90, 90]]], dtype=np.uint8)
    rgba = Image.fromarray(np.concatenate([color, alpha[..., None]], axis=-1), "RGBA")
    expected = over_white(color, alpha[..., None])
    np.testing.assert_array_equal(pixels(open_rgb(encoded(rgba))), expected)
    np.testing.assert_array_equal(pixels(to_rgb(rgba)), expected)


def test_cmyk_uses_the_device_formula() -> None:
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [10, 20, 30, 40], [0, 128, 255, 255]]], dtype=np.uint8)
    image = Image.fromarray(cmyk, "CMYK")
    c, k = cmyk[..., :3].astype(np.int64), cmyk[..., 3:].astype(np.int64)
    expected = np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)
    assert expected[0, 2].tolist() == [207, 198, 190]
    np.testing.assert_array_equal(pixels(open_rgb(encoded(image, "TIFF"))), expected)


# ---- EXIF orientation ----------------------------------------------------------------------------


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize(
    ("orientation", "as_shown"),
    [
        (1, lambda a: a),
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (6, lambda a: np.rot90(a, k=-1)),  # stored lying on its left side: turn clockwise
        (8, lambda a: np.rot90(a, k=1)),
    ],
)
def test_exif_orientation_is_applied(orientation: int, as_shown) -> None:
    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    data = encoded(Image.fromarray(stored, "RGB"), exif=_exif(orientation))
    np.testing.assert_array_equal(pixels(open_rgb(data)), as_shown(stored))


def test_exif_rotated_jpeg() -> None:
    # A camera JPEG: left half black, right half white, stored rotated (orientation 6).
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, 16:] = 255
    shown = pixels(open_rgb(encoded(Image.fromarray(stored), "JPEG", exif=_exif(6), quality=95)))
    assert shown.shape == (32, 16, 3)  # turned clockwise: the white half is now the bottom
    assert shown[:12].max() < 20 and shown[20:].min() > 235


# ---- one function on every path ------------------------------------------------------------------


def test_generate_and_the_data_sources_load_images_the_same_way(tmp_path: Path) -> None:
    files = {
        "gray16.png": encoded(Image.fromarray(SIXTEEN)),
        "rgba.png": encoded(Image.fromarray(np.full((2, 4, 4), 128, dtype=np.uint8), "RGBA")),
        "turned.png": encoded(Image.fromarray(np.arange(24, dtype=np.uint8).reshape(2, 4, 3)), exif=_exif(6)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).with_suffix(".txt").write_text("a caption")
    log = SkipLog()
    from_source = {
        f"{s.key}.png": pixels(s.image) for shard in list_source_shards(tmp_path) for s in iter_samples(shard, log)
    }
    assert log.skips == [] and sorted(from_source) == sorted(files)
    prepared = prepare_requests([Request([tmp_path / name, Image.open(tmp_path / name)]) for name in files])
    for name, request in zip(files, prepared):
        expected = pixels(open_rgb(files[name]))
        np.testing.assert_array_equal(from_source[name], expected)
        for image in request.images:  # a path and an opened PIL image alike
            np.testing.assert_array_equal(pixels(image), expected)
    np.testing.assert_array_equal(from_source["gray16.png"], gray_to_rgb(SIXTEEN_8))

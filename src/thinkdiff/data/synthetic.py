"""Small synthetic data written on the spot: for tests, benchmarks and the offline demo.

- :func:`write_tar_shards`: WebDataset tars laid out as img2dataset writes them (``KEY.jpg`` +
  ``KEY.txt`` + ``KEY.json``), optionally with one bad sample of each kind in the first shard.
- :func:`write_random_feature_shards`: feature shards of random bf16 features at any size, through
  the real writer (for reader tests and the reading benchmark, without running an LVLM).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from thinkdiff.data.feature_shards import FeatureShardWriter, write_index

__all__ = ["BAD_SAMPLES", "jpeg_bytes", "write_random_feature_shards", "write_tar_shards"]

# Keys and expected skip reasons of the bad samples put in shard 0 by write_tar_shards(bad=True).
BAD_SAMPLES: dict[str, str] = {
    "bad_corrupt": "unreadable_image",
    "bad_truncated": "truncated_image",
    "bad_empty_caption": "empty_caption",
    "bad_no_caption": "missing_caption",
    "bad_not_image": "no_image",
}


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    """A small JPEG of smooth random colours (compresses like a photo, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    top = corners[0, 0] * (1 - t) + corners[0, 1] * t  # [size, 1, 3]
    bottom = corners[1, 0] * (1 - t) + corners[1, 1] * t
    s = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
    pixels = top.transpose(1, 0, 2) * (1 - s.transpose(1, 0, 2)) + bottom.transpose(1, 0, 2) * s.transpose(
        1, 0, 2
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible archives
    tar.addfile(info, io.BytesIO(data))


def write_tar_shards(
    folder: Path, num_shards: int = 2, samples_per_shard: int = 4, *, bad: bool = True, image_size: int = 32
) -> list[Path]:
    """Write ``NNNNN.tar`` shards of ``samples_per_shard`` good samples each (key ``SSSSSIIII``).

    Captions are in ``.txt`` for even samples and only in ``.json`` for odd ones (both occur in
    img2dataset output). With ``bad=True`` shard 0 also holds the samples of :data:`BAD_SAMPLES`,
    placed between good ones so that reading must go on past them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(samples_per_shard):
                key = f"{shard:05d}{i:04d}"
                if bad and shard == 0 and i == 1:
                    _add_bad_samples(tar, image_size)
                _add(tar, f"{key}.jpg", jpeg_bytes(shard * 10_000 + i, image_size))
                caption = f"a test picture number {i} of shard {shard}"
                if i % 2 == 0:
                    _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())
        paths.append(path)
    return paths


def _add_bad_samples(tar: tarfile.TarFile, image_size: int) -> None:
    good = jpeg_bytes(999, image_size)
    _add(tar, "bad_corrupt.jpg", b"GIF89a? no: these bytes are not an image in any format" * 4)
    _add(tar, "bad_corrupt.txt", b"a corrupt image")
    _add(tar, "bad_truncated.jpg", good[: len(good) // 2])
    _add(tar, "bad_truncated.txt", b"a truncated image")
    _add(tar, "bad_empty_caption.jpg", good)
    _add(tar, "bad_empty_caption.txt", b"  \n")
    _add(tar, "bad_no_caption.jpg", good)
    _add(tar, "bad_not_image.pdf", b"%PDF-1.4 not an image")
    _add(tar, "bad_not_image.txt", b"a caption without an image")


def write_random_feature_shards(
    out_dir: Path,
    num_shards: int = 2,
    samples_per_shard: int = 8,
    *,
    hidden_size: int = 16,
    num_tokens: int | tuple[int, int] = 8,
    seed: int = 0,
) -> Path:
    """Feature shards of random bf16 features (``num_tokens``: a count, or a ``(low, high)`` range)
    with an ``index.json``; sample ``i`` of shard ``s`` has key ``SSSSSIIII`` and text ``"text KEY"``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for shard in range(num_shards):
        with FeatureShardWriter(out_dir, shard) as writer:
            for i in range(samples_per_shard):
                if isinstance(num_tokens, int):
                    n = num_tokens
                else:
                    n = int(torch.randint(num_tokens[0], num_tokens[1] + 1, (1,), generator=generator))
                key = f"{shard:05d}{i:04d}"
                features = torch.randn(n, hidden_size, generator=generator).to(torch.bfloat16)
                token_ids = torch.randint(0, 1000, (n,), generator=generator)
                writer.add(
                    key, token_ids, features, prompt="Describe the image concisely.", text=f"text {key}"
                )
            writer.finish({"source": f"synthetic-{shard}"})
    write_index(out_dir, num_source_shards=num_shards)
    return out_dir

"""Image-caption sources: WebDataset tar shards, image folders and JSONL/CSV manifests.

Every source is cut into :class:`SourceShard` units, the unit of work for ranks, output shards and
resume. A tar file is one shard; a folder listing or a manifest is cut into slices of
``samples_per_shard`` entries (in sorted / file order, so the cut is the same on every run).

Reading a shard yields :class:`RawSample` (image bytes and caption, cheap to buffer) and
:func:`decode_image` turns one into a PIL image. Bad samples never stop the reading: each becomes a
:class:`Skip` (key, shard, reason) handed to a callback, and the rest of the shard is read on.

Skip reasons: ``no_image`` (a sample without an image member, e.g. only a ``.pdf``),
``missing_caption`` (no ``.txt`` and no ``caption`` in ``.json``), ``empty_caption``,
``unreadable_image`` (not decodable), ``truncated_image``, ``bad_manifest_row``, ``unreadable_shard``
(the tar stream itself failed; what was read before the failure is kept).
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageCaptionSample",
    "RawSample",
    "Skip",
    "SkipLog",
    "SourceShard",
    "decode_image",
    "iter_raw_samples",
    "iter_samples",
    "list_source_shards",
]

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "gif", "tif", "tiff")
_MANIFEST_IMAGE_FIELDS = ("image_path", "image", "path", "file_name")
_MANIFEST_CAPTION_FIELDS = ("caption", "text")

SourceSpec = str | os.PathLike | Sequence[str | os.PathLike]
"""A brace pattern (``data/{00000..00099}.tar``), a glob, one tar, a list of tars, a folder of tars,
a folder of images with ``.txt`` captions, or a ``.jsonl`` / ``.csv`` manifest."""


@dataclass(frozen=True)
class SourceShard:
    """One unit of input: a tar file, or rows ``[start, stop)`` of a folder listing or manifest."""

    index: int
    """Position in the source's shard list (names the output shard)."""
    kind: str
    """``"tar"``, ``"folder"`` or ``"manifest"``."""
    url: str
    """The tar file, folder or manifest."""
    start: int = 0
    stop: int | None = None

    @property
    def name(self) -> str:
        """A readable identity for reports: the url, plus the row range for slices."""
        return self.url if self.kind == "tar" else f"{self.url}[{self.start}:{self.stop}]"


@dataclass
class RawSample:
    """A sample as stored: undecoded image bytes and a non-empty caption."""

    key: str
    shard: str
    image_bytes: bytes
    caption: str


@dataclass
class ImageCaptionSample:
    """A decoded sample: RGB image and caption."""

    key: str
    shard: str
    image: Image.Image
    caption: str


@dataclass(frozen=True)
class Skip:
    """A sample left out, and why (see the module docstring for the reasons)."""

    key: str
    shard: str
    reason: str
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"key": self.key, "shard": self.shard, "reason": self.reason, "detail": self.detail}


@dataclass
class SkipLog:
    """Collects :class:`Skip` records; call it as the ``on_skip`` callback."""

    skips: list[Skip] = field(default_factory=list)

    def __call__(self, skip: Skip) -> None:
        self.skips.append(skip)

    def counts(self) -> dict[str, int]:
        """Number of skipped samples per reason."""
        return dict(sorted(Counter(s.reason for s in self.skips).items()))


# ---- listing -------------------------------------------------------------------------------------


def _is_remote(url: str) -> bool:
    # webdataset opens these itself (pipe:curl ..., http://, s3:// through its gopen handlers).
    return url.startswith("pipe:") or "://" in url


def _expand_tar_spec(spec: str) -> list[str]:
    import braceexpand  # a dependency of webdataset

    urls: list[str] = []
    for part in braceexpand.braceexpand(spec):
        if _is_remote(part) or not glob.has_magic(part):
            urls.append(part)
        else:
            urls.extend(sorted(glob.glob(part)))
    return urls


def list_source_shards(spec: SourceSpec, samples_per_shard: int = 1000) -> list[SourceShard]:
    """Cut a source into shards; the same spec always gives the same list.

    Raises ``FileNotFoundError`` for missing paths and ``ValueError`` for a spec of unknown form.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            tars = sorted(str(p) for p in path.glob("*.tar"))
            if tars:
                return _tar_shards(tars)
            images = _list_folder_images(path)
            if not images:
                raise FileNotFoundError(f"folder {path} holds neither .tar shards nor images")
            return _slices("folder", str(path.resolve()), len(images), samples_per_shard)
        if path.suffix.lower() in (".jsonl", ".csv"):
            if not path.is_file():
                raise FileNotFoundError(f"manifest {path} does not exist")
            return _slices(
                "manifest", str(path.resolve()), len(_read_manifest(path.resolve())), samples_per_shard
            )
        urls = _expand_tar_spec(text)
    else:
        urls = [os.fspath(s) for s in spec]
    if not urls:
        raise FileNotFoundError(f"source {spec!r} matches no files")
    return _tar_shards(urls)


def _tar_shards(urls: list[str]) -> list[SourceShard]:
    # Absolute paths: the shard names are recorded, and a resume from another folder must match.
    urls = [u if _is_remote(u) else os.path.abspath(os.path.expanduser(u)) for u in urls]
    missing = [u for u in urls if not _is_remote(u) and not Path(u).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} tar shards do not exist, e.g. {missing[0]}")
    if len(set(urls)) != len(urls):
        raise ValueError("the source lists the same tar shard more than once")
    return [SourceShard(i, "tar", u) for i, u in enumerate(urls)]


def _slices(kind: str, url: str, total: int, per_shard: int) -> list[SourceShard]:
    return [
        SourceShard(i, kind, url, start, min(start + per_shard, total))
        for i, start in enumerate(range(0, total, per_shard))
    ]


@functools.lru_cache(maxsize=4)
def _list_folder_images(folder: Path) -> list[Path]:
    # Cached: every slice of a folder source needs the same sorted listing.
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )


@functools.lru_cache(maxsize=4)
def _read_manifest(path: Path) -> list[dict | None]:
    """Rows of a JSONL or CSV manifest; ``None`` for a line that is not a JSON object."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows: list[dict | None] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            rows.append(row if isinstance(row, dict) else None)
    return rows


# ---- reading -------------------------------------------------------------------------------------


def _clean_caption(text: str | None) -> str | None:
    return None if text is None else text.strip()


def _caption_from_members(sample: dict) -> tuple[str | None, str]:
    """Caption from ``.txt``, else the ``caption`` field of ``.json`` (img2dataset writes both)."""
    if "txt" in sample:
        return _clean_caption(sample["txt"].decode("utf-8", errors="replace")), ""
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return None, f"bad .json: {exc}"
        caption = meta.get("caption") if isinstance(meta, dict) else None
        return (_clean_caption(caption) if isinstance(caption, str) else None), ""
    return None, ""


def _with_caption(
    key: str,
    shard: str,
    image_bytes: bytes,
    caption: str | None,
    detail: str,
    on_skip: Callable[[Skip], None],
) -> RawSample | None:
    if caption is None:
        on_skip(Skip(key, shard, "missing_caption", detail))
        return None
    if not caption:
        on_skip(Skip(key, shard, "empty_caption"))
        return None
    return RawSample(key, shard, image_bytes, caption)


def _iter_tar(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[RawSample]:
    import webdataset as wds

    reported: set[str] = set()

    def handler(exc: Exception) -> bool:
        # Called by webdataset for errors it catches (a damaged tar stream, duplicate member
        # names); True means "go on". A damaged stream raises at two levels: report it once.
        message = str(exc.args[0] if exc.args else "").split(" @ ")[0]
        if message not in reported:
            reported.add(message)
            on_skip(Skip("", shard.url, "unreadable_shard", f"{type(exc).__name__}: {message}"))
        return True

    for sample in wds.tarfile_samples([{"url": shard.url}], handler=handler):
        key = sample["__key__"]
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            on_skip(Skip(key, shard.url, "no_image", f"members: {', '.join(members)}"))
            continue
        caption, detail = _caption_from_members(sample)
        raw = _with_caption(key, shard.url, sample[image_ext], caption, detail, on_skip)
        if raw is not None:
            yield raw


def _iter_folder(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[RawSample]:
    folder = Path(shard.url)
    for path in _list_folder_images(folder)[shard.start : shard.stop]:
        key = path.relative_to(folder).with_suffix("").as_posix()
        caption_file = path.with_suffix(".txt")
        caption = (
            caption_file.read_text(encoding="utf-8", errors="replace").strip()
            if caption_file.is_file()
            else None
        )
        try:
            image_bytes = path.read_bytes()
        except OSError as exc:  # removed or unreadable since the listing
            on_skip(Skip(key, shard.name, "unreadable_image", f"{type(exc).__name__}: {exc}"))
            continue
        raw = _with_caption(key, shard.name, image_bytes, caption, "", on_skip)
        if raw is not None:
            yield raw


def _iter_manifest(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[RawSample]:
    manifest = Path(shard.url)
    rows = _read_manifest(manifest)
    for row_index in range(shard.start, shard.stop if shard.stop is not None else len(rows)):
        row = rows[row_index]
        image_field = next((f for f in _MANIFEST_IMAGE_FIELDS if row and row.get(f)), None)
        if row is None or image_field is None:
            on_skip(
                Skip(f"row{row_index}", shard.name, "bad_manifest_row", "no JSON object or no image_path")
            )
            continue
        image_path = Path(row[image_field]).expanduser()
        if not image_path.is_absolute():
            image_path = manifest.parent / image_path
        key = str(row.get("key") or Path(row[image_field]).with_suffix("").as_posix())
        try:
            image_bytes = image_path.read_bytes()
        except OSError as exc:
            on_skip(Skip(key, shard.name, "unreadable_image", f"{type(exc).__name__}: {exc}"))
            continue
        caption = next((row[f] for f in _MANIFEST_CAPTION_FIELDS if isinstance(row.get(f), str)), None)
        raw = _with_caption(key, shard.name, image_bytes, _clean_caption(caption), "", on_skip)
        if raw is not None:
            yield raw


_READERS = {"tar": _iter_tar, "folder": _iter_folder, "manifest": _iter_manifest}


def iter_raw_samples(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[RawSample]:
    """The samples of one shard with a non-empty caption, images not yet decoded."""
    return _READERS[shard.kind](shard, on_skip)


def decode_image(raw: RawSample, on_skip: Callable[[Skip], None]) -> ImageCaptionSample | None:
    """Fully decode the image to RGB; ``None`` (and a :class:`Skip`) when it cannot be decoded."""
    try:
        with warnings.catch_warnings():
            # PIL warns about odd EXIF or huge images; a data set has plenty of both.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw.image_bytes)) as opened:
                image = opened.convert("RGB")  # convert() loads every pixel, so truncation shows here
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = "truncated_image" if "truncated" in str(exc).lower() else "unreadable_image"
        # PIL names the buffer object by address; drop it so reports are the same on every run.
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "bytes", str(exc))
        on_skip(Skip(raw.key, raw.shard, reason, f"{type(exc).__name__}: {detail}"))
        return None
    return ImageCaptionSample(raw.key, raw.shard, image, raw.caption)


def iter_samples(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[ImageCaptionSample]:
    """The decodable samples of one shard, in stored order."""
    for raw in iter_raw_samples(shard, on_skip):
        sample = decode_image(raw, on_skip)
        if sample is not None:
            yield sample

"""Image-caption sources: WebDataset tar shards, image folders and JSONL/CSV manifests.

Every source is cut into :class:`SourceShard` units, the unit of work for ranks, output shards and
resume. A tar file is one shard; a folder listing or a manifest is cut into slices of
``samples_per_shard`` entries (in sorted / file order, so the cut is the same on every run).

Reading a shard yields :class:`RawSample` (image bytes and caption, cheap to buffer) and
:func:`decode_image` turns one into a PIL image. Bad samples never stop the reading: each becomes a
:class:`Skip` (key, shard, reason) handed to a callback, and the rest of the shard is read on.

Skip reasons: ``no_image`` (a sample without an image member, e.g. only a ``.pdf``),
``missing_caption`` (no ``.txt`` and no ``caption`` in ``.json``), ``empty_caption``,
``caption_not_utf8`` (the caption bytes are not UTF-8: never stored with replacement characters),
``unreadable_image`` (not decodable), ``truncated_image``, ``bad_manifest_row`` (its key is
``line{N}``, N the line in the file), ``truncated_sample`` (a tar ends inside this sample's members),
``unreadable_shard`` (the tar stream itself failed; what was read before the failure is kept, and
the samples after it are unknown, so this one record stands for them).

Images are decoded by :func:`thinkdiff.imaging.open_rgb` (16-bit scaled, transparency composited,
EXIF orientation applied), the same function ``generate`` uses.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import os
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from PIL import Image

from thinkdiff.imaging import open_rgb

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

T = TypeVar("T")

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
            rows = _read_manifest(path.resolve())
            if not rows:
                raise ValueError(f"manifest {path} holds no rows")
            return _slices("manifest", str(path.resolve()), len(rows), samples_per_shard)
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


@dataclass(frozen=True)
class _ManifestRow:
    """One manifest row: its line in the file, and its fields or why it has none."""

    line: int
    fields: dict | None
    problem: str = ""


@functools.lru_cache(maxsize=4)
def _read_manifest(path: Path) -> list[_ManifestRow]:
    """Rows of a JSONL or CSV manifest (blank JSONL lines are not rows).

    A JSONL line that is not UTF-8 or not a JSON object is a row without fields (a
    ``bad_manifest_row`` skip naming its line). A CSV file must be UTF-8 text as a whole (a quoted
    field may span lines): ``ValueError`` naming the file otherwise.
    """
    data = path.read_bytes()
    if path.suffix.lower() == ".csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(f"manifest {path} is not UTF-8 text (byte {exc.start})") from exc
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            return [_ManifestRow(reader.line_num, dict(row)) for row in reader]
        except csv.Error as exc:
            raise ValueError(f"manifest {path} line {reader.line_num}: not valid CSV: {exc}") from exc
    rows: list[_ManifestRow] = []
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            rows.append(_ManifestRow(number, None, f"line {number} is not UTF-8 (byte {exc.start})"))
            continue
        except json.JSONDecodeError as exc:
            problem = f"line {number}: not valid JSON: {exc.msg} (column {exc.colno})"
            rows.append(_ManifestRow(number, None, problem))
            continue
        if not isinstance(row, dict):
            rows.append(_ManifestRow(number, None, f"line {number}: not a JSON object"))
            continue
        rows.append(_ManifestRow(number, row))
    return rows


# ---- reading -------------------------------------------------------------------------------------


def _clean_caption(text: str | None) -> str | None:
    return None if text is None else text.strip()


class _CaptionError(ValueError):
    """A caption that exists but cannot be used as text; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _decode_caption(data: bytes, member: str) -> str:
    """UTF-8 text of a caption file; a replacement character would silently change the caption."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _CaptionError(
            "caption_not_utf8", f"{member}: byte {data[exc.start]:#04x} at {exc.start} is not UTF-8"
        ) from exc


def _caption_from_members(sample: dict) -> str | None:
    """Caption from ``.txt``, else the ``caption`` field of ``.json`` (img2dataset writes both)."""
    if "txt" in sample:
        return _clean_caption(_decode_caption(sample["txt"], ".txt"))
    if "json" in sample:
        text = _decode_caption(sample["json"], ".json")
        try:
            meta = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _CaptionError("missing_caption", f"bad .json: {exc}") from exc
        caption = meta.get("caption") if isinstance(meta, dict) else None
        return _clean_caption(caption) if isinstance(caption, str) else None
    return None


def _with_caption(
    key: str,
    shard: str,
    image_bytes: bytes,
    caption: str | _CaptionError | None,
    on_skip: Callable[[Skip], None],
) -> RawSample | None:
    if isinstance(caption, _CaptionError):
        on_skip(Skip(key, shard, caption.reason, str(caption)))
        return None
    if caption is None:
        on_skip(Skip(key, shard, "missing_caption"))
        return None
    if not caption:
        on_skip(Skip(key, shard, "empty_caption"))
        return None
    return RawSample(key, shard, image_bytes, caption)


def _caption_or_error(read: Callable[[T], str | None], source: T) -> str | _CaptionError | None:
    """``read(source)``, or the :class:`_CaptionError` it raised (the sample is then skipped)."""
    try:
        return read(source)
    except _CaptionError as exc:
        return exc


# What a stream cut short raises: tarfile, gzip (EOFError, zlib.error) and the file itself.
_STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def _has_end_marker(url: str) -> bool:
    """False for a local uncompressed ``.tar`` that does not end in the two zero blocks that
    close every tar archive; True when that cannot be told (remote, compressed)."""
    path = Path(url)
    if _is_remote(url) or path.suffix.lower() != ".tar":
        return True
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 1024))
            return size >= 1024 and not any(f.read(1024))
    except OSError:
        return True  # the reader reports an unreadable file itself


def _iter_tar(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[RawSample]:
    from webdataset import tariterators

    # Where the stream was when it failed: the member being read (its data cut short), else the
    # last member read whole (the failure was in the next header). Either names a sample that may
    # be incomplete: it is skipped as truncated_sample, not used with members missing.
    state: dict[str, str | None] = {"reading": None, "last": None, "partial": None}
    reported: set[str] = set()
    truncated: set[str] = set()

    def sample_key(member: str | None) -> str | None:
        prefix, _ = tariterators.base_plus_ext(member) if member else (None, None)
        return prefix

    def track(member: str) -> str:
        state["reading"] = member
        return member

    def read_whole(files: Iterator[dict]) -> Iterator[dict]:
        for file in files:
            if not file and state["partial"] is None and not _has_end_marker(shard.url):
                # tarfile ends quietly at a cut on (or inside) a member header: no error to catch.
                handler(tarfile.ReadError("the tar ends without its end-of-archive blocks (truncated?)"))
            state["last"], state["reading"] = file.get("fname", state["last"]), None
            yield file

    def handler(exc: Exception) -> bool:
        # Called by webdataset for errors it catches (a damaged tar stream, duplicate member
        # names); True means "go on". A damaged stream raises at two levels: report it once.
        message = str(exc.args[0] if exc.args else "").split(" @ ")[0]
        if isinstance(exc, _STREAM_ERRORS) and state["partial"] is None:
            member = state["reading"] or state["last"]
            state["partial"] = sample_key(member)
            if state["reading"] is not None and state["partial"] is not None:
                truncated.add(state["partial"])
                detail = f"{member}: {type(exc).__name__}: {message}"
                on_skip(Skip(state["partial"], shard.url, "truncated_sample", detail))
        if message not in reported:
            reported.add(message)
            after = f" (after member {state['last']})" if state["last"] else ""
            on_skip(Skip("", shard.url, "unreadable_shard", f"{type(exc).__name__}: {message}{after}"))
        return True

    streams = tariterators.url_opener([{"url": shard.url}], handler=handler)
    files = tariterators.tar_file_expander(streams, handler=handler, rename_files=track)
    for sample in tariterators.group_by_keys(read_whole(files), handler=handler):
        key = sample["__key__"]
        if key == state["partial"]:  # the stream ended inside this sample
            if key not in truncated:
                on_skip(Skip(key, shard.url, "truncated_sample", "the tar ends inside this sample"))
            continue
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            on_skip(Skip(key, shard.url, "no_image", f"members: {', '.join(members)}"))
            continue
        caption = _caption_or_error(_caption_from_members, sample)
        raw = _with_caption(key, shard.url, sample[image_ext], caption, on_skip)
        if raw is not None:
            yield raw


def _folder_caption(path: Path) -> str | None:
    return _clean_caption(_decode_caption(path.read_bytes(), path.name))


def _iter_folder(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[RawSample]:
    folder = Path(shard.url)
    for path in _list_folder_images(folder)[shard.start : shard.stop]:
        key = path.relative_to(folder).with_suffix("").as_posix()
        caption_file = path.with_suffix(".txt")
        try:
            image_bytes = path.read_bytes()
            caption = _caption_or_error(_folder_caption, caption_file) if caption_file.is_file() else None
        except OSError as exc:  # removed or unreadable since the listing
            on_skip(Skip(key, shard.name, "unreadable_image", f"{type(exc).__name__}: {exc}"))
            continue
        raw = _with_caption(key, shard.name, image_bytes, caption, on_skip)
        if raw is not None:
            yield raw


def _iter_manifest(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[RawSample]:
    manifest = Path(shard.url)
    rows = _read_manifest(manifest)
    for row in rows[shard.start : shard.stop]:
        fields = row.fields or {}
        image_field = next(
            (f for f in _MANIFEST_IMAGE_FIELDS if isinstance(fields.get(f), str) and fields[f]), None
        )
        if row.fields is None or image_field is None:
            problem = row.problem or f"line {row.line}: no {' / '.join(_MANIFEST_IMAGE_FIELDS)} string"
            on_skip(Skip(f"line{row.line}", shard.name, "bad_manifest_row", problem))
            continue
        image_path = Path(fields[image_field]).expanduser()
        if not image_path.is_absolute():
            image_path = manifest.parent / image_path
        key = str(fields.get("key") or Path(fields[image_field]).with_suffix("").as_posix())
        try:
            image_bytes = image_path.read_bytes()
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            on_skip(Skip(key, shard.name, "unreadable_image", f"{type(exc).__name__}: {exc}"))
            continue
        caption = next((fields[f] for f in _MANIFEST_CAPTION_FIELDS if isinstance(fields.get(f), str)), None)
        raw = _with_caption(key, shard.name, image_bytes, _clean_caption(caption), on_skip)
        if raw is not None:
            yield raw


_READERS = {"tar": _iter_tar, "folder": _iter_folder, "manifest": _iter_manifest}


def iter_raw_samples(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[RawSample]:
    """The samples of one shard with a non-empty caption, images not yet decoded."""
    return _READERS[shard.kind](shard, on_skip)


def decode_image(raw: RawSample, on_skip: Callable[[Skip], None]) -> ImageCaptionSample | None:
    """Fully decode the image to RGB (:func:`thinkdiff.imaging.open_rgb`); ``None`` (and a
    :class:`Skip`) when it cannot be decoded."""
    try:
        with warnings.catch_warnings():
            # PIL warns about odd EXIF or huge images; a data set has plenty of both.
            warnings.simplefilter("ignore")
            image = open_rgb(raw.image_bytes)
    except ValueError as exc:
        detail = str(exc).removeprefix("cannot read image bytes: ")
        reason = "truncated_image" if "truncated" in detail.lower() else "unreadable_image"
        on_skip(Skip(raw.key, raw.shard, reason, detail))
        return None
    return ImageCaptionSample(raw.key, raw.shard, image, raw.caption)


def iter_samples(shard: SourceShard, on_skip: Callable[[Skip], None]) -> Iterator[ImageCaptionSample]:
    """The decodable samples of one shard, in stored order."""
    for raw in iter_raw_samples(shard, on_skip):
        sample = decode_image(raw, on_skip)
        if sample is not None:
            yield sample

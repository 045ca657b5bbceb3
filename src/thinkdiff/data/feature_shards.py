"""Feature shards: the LVLM features of many samples, written once and memory-mapped for training.

One output shard ``shard-NNNNNN`` (NNNNNN = the input shard's index) is four files:

- ``shard-NNNNNN.safetensors``: ``features`` [T, H] bf16 (the generated tokens of all samples,
  concatenated), ``token_ids`` [T] int32 and ``offsets`` [n + 1] int32: sample ``i`` owns rows
  ``offsets[i]:offsets[i + 1]``. The data start at byte 4096 (page aligned).
- ``shard-NNNNNN.jsonl``: one line per sample, in the same order: ``key``, ``prompt``, ``text``
  (the decoded answer), ``caption`` (the source's caption), ``num_tokens``.
- ``shard-NNNNNN.prompt.safetensors`` (only with prompt features): ``prompt_features`` [Tp, H] bf16
  and ``prompt_offsets`` [n + 1] int32.
- ``shard-NNNNNN.json``: the shard's record (sample and token counts, byte sizes and SHA-256 of the
  files above, the samples skipped and why). Written last: a shard is complete iff its record exists.

Every file is written under a ``.tmp`` name and renamed into place (``os.replace`` is atomic), so a
killed run leaves complete shards and temp files, never a half-written shard under a final name.
``index.json`` merges the records (see :func:`write_index`).

The features are streamed to disk while a shard is written (the header space is reserved up front
and filled in at the end), so memory does not grow with the shard size.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError

from thinkdiff.utils import atomic_path, file_sha256

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "FeatureShardWriter",
    "FeatureShards",
    "ShardMismatchError",
    "check_feature_folder",
    "load_index",
    "read_shard_records",
    "shard_name",
    "verify_shards",
    "write_index",
    "write_json_atomic",
]

FORMAT = "thinkdiff-lvlm-features"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
_HEADER_BYTES = 4096  # 8-byte length + JSON header padded with spaces; the data start page aligned


def shard_name(index: int) -> str:
    """``shard-000012`` for input shard 12."""
    return f"shard-{index:06d}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temp file and a rename (readers never see half a file)."""
    # atomic_path: a per-process temporary name (ranks may write the same file), removed on failure.
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _file_entry(path: Path) -> dict[str, Any]:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


class _StreamingSafetensors:
    """A safetensors file with one big 2-D bf16 tensor appended row block by row block.

    Small tensors (ids, offsets) are added at the end. The JSON header is written last into space
    reserved at the start; safetensors allows trailing spaces in the header.
    """

    def __init__(self, path: Path, big_name: str) -> None:
        self.path = path
        self.big_name = big_name
        self.file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in finish/close)
        self.file.write(b"\0" * _HEADER_BYTES)
        self.rows = 0
        self.width: int | None = None

    def append(self, rows_NH: torch.Tensor) -> None:
        if rows_NH.ndim != 2:
            raise ValueError(
                f"{self.big_name} must be 2-D [tokens, hidden], got shape {tuple(rows_NH.shape)}"
            )
        if self.width is None:
            self.width = rows_NH.shape[1]
        elif rows_NH.shape[1] != self.width:
            raise ValueError(f"{self.big_name} width changed from {self.width} to {rows_NH.shape[1]}")
        data = rows_NH.detach().to("cpu", torch.bfloat16).contiguous()
        # bf16 has no numpy dtype; the same bits as int16 serialise identically.
        self.file.write(data.view(torch.int16).numpy().tobytes())
        self.rows += rows_NH.shape[0]

    def finish(self, small: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        width = self.width or 0
        big_bytes = self.rows * width * 2
        header: dict[str, Any] = {
            "__metadata__": metadata,
            self.big_name: {"dtype": "BF16", "shape": [self.rows, width], "data_offsets": [0, big_bytes]},
        }
        start = big_bytes
        dtype_names = {torch.int32: "I32", torch.int64: "I64"}
        for name, tensor in small.items():
            data = tensor.detach().cpu().contiguous().numpy().tobytes()
            header[name] = {
                "dtype": dtype_names[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [start, start + len(data)],
            }
            self.file.write(data)
            start += len(data)
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > _HEADER_BYTES - 8:
            raise ValueError(f"safetensors header of {len(text)} bytes does not fit the reserved space")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", _HEADER_BYTES - 8) + text.ljust(_HEADER_BYTES - 8, b" "))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def close(self) -> None:
        """Close an unfinished file that is being discarded: a failed last flush is no error."""
        with contextlib.suppress(OSError):
            self.file.close()


class FeatureShardWriter:
    """Write one feature shard: :meth:`add` each sample, then :meth:`finish` (or :meth:`abort`).

    Use as a context manager: leaving the block by an exception removes the temp files.
    """

    def __init__(self, out_dir: Path, index: int, *, prompt_features: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name = shard_name(index)
        self.with_prompt_features = prompt_features
        self._final = {
            "features": self.out_dir / f"{self.name}.safetensors",
            "metadata": self.out_dir / f"{self.name}.jsonl",
            "prompt_features": self.out_dir / f"{self.name}.prompt.safetensors",
        }
        self._tmp = {k: p.with_name(p.name + ".tmp") for k, p in self._final.items()}
        self._features = _StreamingSafetensors(self._tmp["features"], "features")
        self._prompt = (
            _StreamingSafetensors(self._tmp["prompt_features"], "prompt_features")
            if prompt_features
            else None
        )
        self._metadata = open(self._tmp["metadata"], "w", encoding="utf-8")  # noqa: SIM115 (closed in finish/abort)
        self._token_ids: list[torch.Tensor] = []
        self._offsets = [0]
        self._prompt_offsets = [0]

    @property
    def num_samples(self) -> int:
        return len(self._offsets) - 1

    def add(
        self,
        key: str,
        token_ids_N: torch.Tensor,
        features_NH: torch.Tensor,
        *,
        prompt: str = "",
        text: str = "",
        prompt_features_PH: torch.Tensor | None = None,
        **extra: Any,
    ) -> None:
        """Append one sample: its N generated token ids and their N features (stored as bf16)."""
        if features_NH.shape[0] != token_ids_N.shape[0]:
            raise ValueError(f"{key}: {features_NH.shape[0]} features for {token_ids_N.shape[0]} tokens")
        if (prompt_features_PH is None) == (self._prompt is not None):
            raise ValueError(f"{key}: prompt features must be given iff the writer stores them")
        self._features.append(features_NH)
        self._token_ids.append(token_ids_N.detach().to("cpu", torch.int32).reshape(-1))
        self._offsets.append(self._offsets[-1] + token_ids_N.shape[0])
        if self._prompt is not None and prompt_features_PH is not None:
            self._prompt.append(prompt_features_PH)
            self._prompt_offsets.append(self._prompt_offsets[-1] + prompt_features_PH.shape[0])
        line = {"key": key, "prompt": prompt, "text": text, "num_tokens": int(token_ids_N.shape[0]), **extra}
        self._metadata.write(json.dumps(line, ensure_ascii=False) + "\n")

    def finish(self, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """Complete the shard: finalise and rename the files, then write its record (returned)."""
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION)}
        token_ids = torch.cat(self._token_ids) if self._token_ids else torch.zeros(0, dtype=torch.int32)
        self._features.finish({"token_ids": token_ids, "offsets": _int32(self._offsets)}, meta)
        if self._prompt is not None:
            self._prompt.finish({"prompt_offsets": _int32(self._prompt_offsets)}, meta)
        self._metadata.flush()
        os.fsync(self._metadata.fileno())
        self._metadata.close()

        files: dict[str, Any] = {}
        for kind, tmp in self._tmp.items():
            if kind == "prompt_features" and self._prompt is None:
                continue
            os.replace(tmp, self._final[kind])
            files[kind] = _file_entry(self._final[kind])
        full_record = {
            "name": self.name,
            "num_samples": self.num_samples,
            "num_tokens": self._offsets[-1],
            "hidden_size": self._features.width,
            "files": files,
            **(record or {}),
        }
        # The record is the completion marker, so it is written after everything it describes.
        write_json_atomic(self.out_dir / f"{self.name}.json", full_record)
        return full_record

    def abort(self) -> None:
        """Close and delete the temp files (the final names are untouched).

        Never raises from closing: on a full disk ``close`` fails to flush the last buffered bytes
        (the file is closed all the same), and that second error would hide the first.
        """
        self._features.close()
        if self._prompt is not None:
            self._prompt.close()
        with contextlib.suppress(OSError):
            self._metadata.close()
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> FeatureShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _int32(values: Sequence[int]) -> torch.Tensor:
    if values and values[-1] >= 2**31:
        raise ValueError("a shard holds more than 2**31 tokens; use smaller shards")
    return torch.tensor(values, dtype=torch.int32)


# ---- records and index ---------------------------------------------------------------------------


def read_shard_records(out_dir: Path) -> list[dict[str, Any]]:
    """The records of every complete shard in ``out_dir``, by name."""
    records = []
    for path in sorted(Path(out_dir).glob("shard-*.json")):
        with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
    return records


def write_index(out_dir: Path, num_source_shards: int | None = None, **info: Any) -> dict[str, Any]:
    """Merge the shard records into ``index.json`` and return it.

    Any process may call this at any time (it only reads complete records); each rank calls it when
    it finishes, and ``thinkdiff extract-features --merge-only`` does it once after a multi-node run.
    ``complete`` tells whether every one of the ``num_source_shards`` input shards has its output.
    """
    out_dir = Path(out_dir)
    records = read_shard_records(out_dir)
    hidden = {r["hidden_size"] for r in records if r["hidden_size"]}
    if len(hidden) > 1:
        raise ValueError(f"shards in {out_dir} have different hidden sizes {sorted(hidden)}")
    skipped: collections.Counter[str] = collections.Counter()
    for record in records:
        skipped.update(record.get("skipped", {}))
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "hidden_size": hidden.pop() if hidden else None,
        "dtype": "bfloat16",
        "num_source_shards": num_source_shards,
        "complete": num_source_shards is not None and len(records) == num_source_shards,
        "num_shards": len(records),
        "num_samples": sum(r["num_samples"] for r in records),
        "num_tokens": sum(r["num_tokens"] for r in records),
        "skipped": dict(sorted(skipped.items())),
        **info,
        "shards": [
            {k: r[k] for k in ("name", "num_samples", "num_tokens", "files", "source") if k in r}
            for r in records
        ],
    }
    write_json_atomic(out_dir / INDEX_NAME, index)
    return index


def load_index(root: Path) -> dict[str, Any]:
    """Read ``index.json``, or merge the shard records when it is missing or behind them."""
    root = Path(root)
    path = root / INDEX_NAME
    if not root.is_dir():
        raise FileNotFoundError(f"feature folder {root} does not exist")
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} index (format={index.get('format')!r})")
        # Ranks finishing at the same moment can leave an index that misses the other's last shards.
        if index["complete"] or len(index["shards"]) == len(list(root.glob("shard-*.json"))):
            return index
    records = read_shard_records(root)
    if not records:
        raise FileNotFoundError(f"no complete feature shards in {root}")
    return {
        "format": FORMAT,
        "hidden_size": next((r["hidden_size"] for r in records if r["hidden_size"]), None),
        "complete": False,
        "num_samples": sum(r["num_samples"] for r in records),
        "shards": records,
    }


def verify_shards(root: Path) -> list[str]:
    """Check every file of every indexed shard against its recorded size and SHA-256; list problems."""
    root = Path(root)
    problems = []
    for shard in load_index(root)["shards"]:
        for entry in shard["files"].values():
            path = root / entry["name"]
            if not path.is_file():
                problems.append(f"{entry['name']}: missing")
            elif path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
                problems.append(f"{entry['name']}: size or checksum differs from the record")
    return problems


class ShardMismatchError(ValueError):
    """A feature shard whose files do not match its record (missing, size, header or SHA-256)."""


def worker_error_message(exc: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the traceback torch wraps
    around it (the worker's traceback is useless to someone whose data file is bad)."""
    lines = str(exc).strip().splitlines()
    marker = f"{type(exc).__name__}: "
    for line in reversed(lines):
        if marker in line:
            return line.split(marker, 1)[1]
    return lines[-1] if lines else type(exc).__name__


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte where its data start."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > 100 << 20:
            raise ValueError(f"a header of {length} bytes: not a safetensors file")
        text = f.read(length)
    if len(text) < length:
        raise ValueError("truncated inside its header")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("unreadable header")
    return header, 8 + length


def _header_problems(path: Path, expected: dict[str, tuple[str, list[int]]]) -> list[str]:
    """What is wrong with a shard's safetensors header, given the tensors its record implies."""
    try:
        header, start = _safetensors_header(path)
    except (OSError, ValueError) as exc:
        return [f"{path.name}: {exc}"]
    problems = []
    for name, (dtype, shape) in expected.items():
        entry = header.get(name)
        if not isinstance(entry, dict):
            problems.append(f"{path.name}: no tensor {name!r}")
        elif entry.get("dtype") != dtype or entry.get("shape") != shape:
            problems.append(
                f"{path.name}: {name} is {entry.get('dtype')} {entry.get('shape')}, its record implies {dtype} {shape}"
            )
    ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)]
    size = path.stat().st_size
    if ends and start + max(ends) != size:
        problems.append(f"{path.name}: its header describes {start + max(ends)} bytes, the file has {size}")
    return problems


def _shard_problems(root: Path, entry: dict[str, Any], hidden: int | None) -> list[str]:
    name = entry["name"]
    record_path = root / f"{name}.json"
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return [f"{record_path.name}: the shard's record is missing"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{record_path.name}: unreadable record ({exc})"]
    if record.get("files") != entry.get("files") or record.get("num_samples") != entry.get("num_samples"):
        return [f"{record_path.name}: differs from {INDEX_NAME} (rebuild it: thinkdiff extract-features --merge-only)"]
    problems = []
    for kind, file in record["files"].items():
        path = root / file["name"]
        if not path.is_file():
            problems.append(f"{file['name']}: missing")
        elif path.stat().st_size != file["bytes"]:
            problems.append(f"{file['name']}: {path.stat().st_size} bytes, its record says {file['bytes']}")
        elif kind == "features":
            tokens, samples = record["num_tokens"], record["num_samples"]
            problems += _header_problems(
                path,
                {
                    "features": ("BF16", [tokens, record["hidden_size"] or 0]),
                    "token_ids": ("I32", [tokens]),
                    "offsets": ("I32", [samples + 1]),
                },
            )
        elif kind == "prompt_features":
            problems += _header_problems(path, {"prompt_offsets": ("I32", [record["num_samples"] + 1])})
    if hidden and record.get("hidden_size") not in (None, hidden):
        problems.append(f"{record_path.name}: features {record['hidden_size']} wide, the folder's are {hidden}")
    return problems


def check_feature_folder(root: Path) -> dict[str, Any]:
    """Check every shard of a feature folder against its record before training reads it: the
    record exists and agrees with the index, every file exists with its recorded size, and the
    safetensors headers hold the tensors and shapes the record implies. Cheap (no data read); the
    SHA-256 of each file is checked when it is first read (:class:`FeatureShards`).

    Returns the index; raises :class:`ShardMismatchError` naming the shards and their problems.
    """
    root = Path(root)
    index = load_index(root)
    problems = [p for shard in index["shards"] for p in _shard_problems(root, shard, index.get("hidden_size"))]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ShardMismatchError(f"feature folder {root} does not match its records: {shown}")
    return index


# ---- reading -------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ShardMismatchError(f"{path} line {number} is not JSON ({exc})") from exc
    return rows


@dataclass
class _OpenShard:
    handle: Any  # safetensors safe_open object; keeps the file memory-mapped
    features: Any  # slice view of "features"
    token_ids_T: torch.Tensor
    offsets: list[int]
    metadata: list[dict[str, Any]]
    prompt_handle: Any = None
    prompt_features: Any = None
    prompt_offsets: list[int] | None = None


class FeatureShards:
    """Random access to the samples of a feature folder (memory-mapped, nothing loaded up front).

    ``shards[i]`` or ``shards.get(shard, row)`` return ``{"key", "features" [N, H] bf16,
    "token_ids" [N] long, "text"}`` plus ``"prompt_features"`` [P, H] when ``prompt_features=True``.
    A few shards stay open at a time (``max_open``): the datasets read shard by shard.

    With ``verify`` (the default), the first sample read of a shard first checks the SHA-256 of
    its files against the record: in the DataLoader workers, not at start-up. Which shards are
    verified is kept in shared memory, so the workers of a process (and the workers of later
    epochs) do not hash a shard again once one of them has; a mismatch is a
    :class:`ShardMismatchError` naming the file.
    """

    def __init__(
        self, root: Path, *, prompt_features: bool = False, max_open: int = 4, verify: bool = True
    ) -> None:
        self.root = Path(root)
        self.index = load_index(self.root)
        self.prompt_features = prompt_features
        self.max_open = max_open
        self.verify = verify
        # One flag per shard, shared with the DataLoader workers forked from this process.
        self._verified = torch.zeros(len(self.index["shards"]), dtype=torch.uint8).share_memory_()
        self.shard_names: list[str] = [s["name"] for s in self.index["shards"]]
        self.shard_sizes: list[int] = [s["num_samples"] for s in self.index["shards"]]
        self._starts = [0]
        for size in self.shard_sizes:
            self._starts.append(self._starts[-1] + size)
        if prompt_features:
            missing = [s["name"] for s in self.index["shards"] if "prompt_features" not in s["files"]]
            if missing:
                raise ValueError(
                    f"prompt features were not extracted for {len(missing)} shards, e.g. {missing[0]}"
                )
        self._open: collections.OrderedDict[int, _OpenShard] = collections.OrderedDict()

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def hidden_size(self) -> int | None:
        return self.index["hidden_size"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        import bisect

        shard = bisect.bisect_right(self._starts, index) - 1
        return self.get(shard, index - self._starts[shard])

    def lengths(self, shard: int) -> list[int]:
        """Number of generated tokens of every sample of a shard (for length bucketing)."""
        offsets = self._shard(shard).offsets
        return [b - a for a, b in itertools.pairwise(offsets)]

    def get(self, shard: int, row: int) -> dict[str, Any]:
        """Sample ``row`` of shard number ``shard``; tensors are copies (safe to send between processes)."""
        if self.verify and not self._verified[shard]:
            self._check_checksums(shard)
        opened = self._shard(shard)
        start, stop = opened.offsets[row], opened.offsets[row + 1]
        # clone(): a slice is a view of the whole mapped file, and DataLoader workers would move the
        # whole storage into shared memory to send it.
        sample = {
            "key": opened.metadata[row]["key"],
            "features": opened.features[start:stop].clone(),
            "token_ids": opened.token_ids_T[start:stop].long(),
            "text": opened.metadata[row]["text"],
        }
        if opened.prompt_features is not None and opened.prompt_offsets is not None:
            p0, p1 = opened.prompt_offsets[row], opened.prompt_offsets[row + 1]
            sample["prompt_features"] = opened.prompt_features[p0:p1].clone()
        return sample

    def _check_checksums(self, shard: int) -> None:
        entry = self.index["shards"][shard]
        for file in entry["files"].values():
            path = self.root / file["name"]
            try:
                digest = file_sha256(path)
            except OSError as exc:
                raise ShardMismatchError(f"cannot read feature shard file {path}: {exc}") from exc
            if digest != file["sha256"]:
                raise ShardMismatchError(
                    f"feature shard file {path} does not match its record {entry['name']}.json "
                    "(SHA-256 differs: changed or damaged after extraction); re-extract that shard"
                )
        self._verified[shard] = 1

    def metadata(self, shard: int) -> list[dict[str, Any]]:
        """The JSONL lines of a shard (key, prompt, text, caption, num_tokens)."""
        return self._shard(shard).metadata

    def _shard(self, shard: int) -> _OpenShard:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        from safetensors import safe_open

        name = self.shard_names[shard]
        try:
            handle = safe_open(str(self.root / f"{name}.safetensors"), framework="pt")
            metadata = _read_jsonl(self.root / f"{name}.jsonl")
        except (OSError, SafetensorError) as exc:
            raise ShardMismatchError(f"cannot read feature shard {self.root / name}: {exc}") from exc
        opened = _OpenShard(
            handle=handle,
            features=handle.get_slice("features"),
            token_ids_T=handle.get_tensor("token_ids"),
            offsets=handle.get_tensor("offsets").tolist(),
            metadata=metadata,
        )
        if len(metadata) != len(opened.offsets) - 1:
            raise ShardMismatchError(
                f"{self.root / name}.jsonl: {len(metadata)} lines for {len(opened.offsets) - 1} samples"
            )
        if self.prompt_features:
            opened.prompt_handle = safe_open(str(self.root / f"{name}.prompt.safetensors"), framework="pt")
            opened.prompt_features = opened.prompt_handle.get_slice("prompt_features")
            opened.prompt_offsets = opened.prompt_handle.get_tensor("prompt_offsets").tolist()
        self._open[shard] = opened
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return opened

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard, size in enumerate(self.shard_sizes):
            for row in range(size):
                yield self.get(shard, row)

    def __getstate__(self) -> dict[str, Any]:
        # Open files do not pickle (DataLoader workers get a copy); each process reopens its own.
        state = self.__dict__.copy()
        state["_open"] = collections.OrderedDict()
        return state

"""Small shared helpers: atomic file writes, checks of a resumed run's settings.

Nothing a run has already written may be lost or left half-written: every file is written under a
temporary name in the same folder and renamed into place (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from thinkdiff.storage import storage_failure


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it.

    Works for a file or a folder written at the yielded path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        _remove(tmp)
        yield tmp
        if tmp.is_dir() and path.is_dir():
            # Folders cannot be replaced in one rename: move the old one aside first.
            old = temporary_path(path, "old")
            _remove(old)
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this: the first error counts
            _remove(tmp)
        failure = storage_failure(exc)
        if failure is not None and (failure.filename is None or Path(failure.filename).is_relative_to(tmp)):
            # A full disk seen through a library's message or a buffered close names no file, and
            # the temporary name is gone: name the path being written, for the line the user reads.
            raise OSError(failure.errno, failure.reason, str(path)) from exc
        raise


def temporary_path(path: str | Path, kind: str = "tmp") -> Path:
    """``.NAME.HOST-PID.tmp`` beside ``path``: unique to this process, even among the ranks of a
    multi-node run sharing a folder, and recognisable by :func:`remove_debris` once it is dead."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host_tag()}-{os.getpid()}.{kind}")


# Our temporary names: ``.NAME.HOST-PID.tmp`` / ``.old``; from earlier versions also without the
# host, and the feature folders' ``index.json.PID.tmp`` (no leading dot) and its kin.
_DEBRIS = re.compile(
    r"^(?:\..+\.(?:(?P<host>[0-9a-f]{8})-)?|(?:(?:index|report|extraction|shard-\d+)\.json|skipped\.jsonl)\.)"
    r"(?P<pid>\d+)\.(?:tmp|old)$"
)


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_debris(folder: str | Path, *, hostless: bool = True) -> list[str]:
    """Delete the temporary files and folders that killed processes of this package left in
    ``folder`` (see :func:`temporary_path`); return their names.

    Only names of that pattern are touched, and only when their process is gone: a live process
    (another rank, a second run) may be writing one, and an entry from another machine is left
    alone because its process cannot be checked from here. ``hostless=False`` also leaves the
    older ``.NAME.PID.tmp`` form alone: in a user's own folder another program may use it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _DEBRIS.match(entry.name)
        if match is None:
            continue
        host_ok = match["host"] == _host_tag() or (hostless and match["host"] is None)
        if not host_ok or _process_alive(int(match["pid"])):
            continue
        _remove(entry)
        removed.append(entry.name)
    return removed


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---- settings of a resumable run ----------------------------------------------------------------


def compare_settings(
    saved: dict[str, Any], current: dict[str, Any], *, allowed: Iterable[str] = (), where: str | Path = ""
) -> list[dict[str, Any]]:
    """Check that a rerun into ``where`` uses the settings it was written with.

    A setting that differs and is not in ``allowed`` raises ``ValueError`` naming every such field
    with its old and new value; the changes that are allowed are returned as ``{"field", "old",
    "new"}`` records (for the run folder's ``changes.jsonl``). Callers pass only the settings that
    change the result; a field missing from ``saved`` (an older version's folder) is not compared.
    """
    allowed = set(allowed)
    # Both as they read back from JSON (tuples are lists), whichever way they were stored.
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    changes = [
        {"field": k, "old": saved[k], "new": v} for k, v in current.items() if k in saved and saved[k] != v
    ]
    refused = [c for c in changes if c["field"] not in allowed]
    if refused:
        listed = "; ".join(f"{c['field']}: {_short(c['old'])} -> {_short(c['new'])}" for c in refused)
        names = " ".join(c["field"] for c in refused)
        raise ValueError(
            f"{where} was written with other settings ({listed}); rerun with the same settings, use a new "
            f"folder, or accept the change deliberately with --allow-change {names}"
        )
    return changes


def record_changes(path: str | Path, changes: list[dict[str, Any]], **context: Any) -> None:
    """Append accepted setting changes to a ``changes.jsonl`` record (atomically rewritten)."""
    if not changes:
        return
    path = Path(path)
    before = path.read_text(encoding="utf-8") if path.is_file() else ""
    if before and not before.endswith("\n"):
        before += "\n"  # a cut-off last line stays readable as what it is
    lines = "".join(json.dumps({**context, **change}) + "\n" for change in changes)
    atomic_write_text(path, before + lines)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."

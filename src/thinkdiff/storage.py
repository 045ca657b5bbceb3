"""Recognising a full disk, an exceeded quota or a read-only file system in any error.

Writes fail deep inside libraries (safetensors, PIL, numpy, a buffered file's ``close``), and each
reports it its own way: an ``OSError`` with an errno, or a message such as safetensors' "I/O error:
No space left on device (os error 28)". The command line turns all of them into one line naming
the path (see ``thinkdiff.cli``); this module says whether an error is one of them.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

# What the error is, and what the user can do about it.
STORAGE_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free some space or write elsewhere, then rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free some of your quota or write elsewhere, then rerun"),
    errno.EROFS: ("read-only file system", "write to a writable folder"),
}
# Rust's io::Error ("... (os error 28)") and Python's own "[Errno 28] ..." inside another message.
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


@dataclass(frozen=True)
class StorageFailure:
    """A write that failed because of where it was writing."""

    errno: int
    """One of :data:`STORAGE_ERRNOS`."""
    filename: str | None
    """The file the OS named, when it named one."""

    @property
    def reason(self) -> str:
        return STORAGE_ERRNOS[self.errno][0]

    @property
    def advice(self) -> str:
        return STORAGE_ERRNOS[self.errno][1]


def storage_failure(exc: BaseException) -> StorageFailure | None:
    """The storage failure behind ``exc`` (itself, its cause or its context), or ``None``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        if code is None:
            match = _ERRNO_IN_TEXT.search(str(current))
            code = int(match[1] or match[2]) if match else None
        if code in STORAGE_ERRNOS:
            filename = getattr(current, "filename", None)
            return StorageFailure(code, str(filename) if filename is not None else None)
        current = current.__cause__ or current.__context__
    return None

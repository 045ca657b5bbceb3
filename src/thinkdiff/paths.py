"""Confining a file to a folder: what a command may read, serve or publish from a folder it was given.

A folder handed to ``thinkdiff push`` (or a job folder the app serves) may hold a symlink to
``/etc/passwd``, to another run's weights, or a FIFO that blocks the reader forever. Every such
file is refused here, in one place, before anything is read, served or uploaded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path, PurePosixPath

from thinkdiff.console import escaped


class UnsafePathError(ValueError):
    """A path that leaves its folder, is a symlink, or is not a regular file (one line, exit 2)."""


def confined_file(root: str | Path, relative: str | Path, *, max_bytes: int | None = None) -> Path:
    """The real path of the regular file ``relative`` inside the folder ``root``.

    ``root`` itself may be reached through a symlink (the user named it); below it nothing may be:
    a symlink anywhere on the way, a ``..`` or absolute ``relative``, a real location outside
    ``root``, anything but a regular file (FIFO, socket, device, folder), a file with several hard
    links (it is also a file elsewhere) and, with ``max_bytes``, a larger file are refused with :class:`UnsafePathError`, whose message names the path. A missing
    file is ``FileNotFoundError``. The file itself is never opened.
    """
    root_real = Path(os.path.realpath(root))
    if not root_real.is_dir():
        raise FileNotFoundError(f"folder {escaped(root)} does not exist")
    parts = _plain_parts(root, relative)
    shown = Path(root) / relative
    current = root_real
    for depth, part in enumerate(parts, start=1):
        current = current / part
        try:
            info = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"{escaped(shown)} does not exist") from None
        if stat.S_ISLNK(info.st_mode):
            raise _symlink_error(Path(root, *parts[:depth]), os.readlink(current), root)
    real = Path(os.path.realpath(current))
    if not real.is_relative_to(root_real):  # cannot happen without a symlink; checked all the same
        raise UnsafePathError(f"{escaped(shown)} lies outside {escaped(root)} (really {escaped(real)})")
    _check_plain_file(shown, info, max_bytes)
    return real


def read_confined_file(root: str | Path, relative: str | Path, *, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``relative`` inside the folder ``root``, opened once.

    What :func:`confined_file` checks, checked on the open file itself: every component is opened
    relative to the one before it (``dir_fd``) without following a symlink (``O_NOFOLLOW``), and
    the kind, hard-link count and size come from ``fstat`` of the open descriptor. A file swapped
    for a symlink after a check therefore cannot be what is read: use these bytes for everything
    that follows (loading, printing, uploading), never the path again. Refusals are
    :class:`UnsafePathError`; a missing file is ``FileNotFoundError``.
    """
    parts = _plain_parts(root, relative)
    shown = Path(root) / relative
    try:
        folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # the user named it: it may be a symlink
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"folder {escaped(root)} does not exist") from None
    try:
        for depth, part in enumerate(parts, start=1):
            last = depth == len(parts)
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                # Never opens a device or FIFO for reading before it is known to be a plain file.
                info = os.stat(part, dir_fd=folder, follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    raise OSError(errno.ELOOP, "symlink")
                if last and not stat.S_ISREG(info.st_mode):
                    _check_plain_file(shown, info, max_bytes)
                opened = os.open(part, flags, dir_fd=folder)
            except (FileNotFoundError, NotADirectoryError):
                raise FileNotFoundError(f"{escaped(shown)} does not exist") from None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                link = Path(root, *parts[:depth])
                raise _symlink_error(link, _read_link(part, folder), root) from None
            os.close(folder)
            folder = opened
        info = os.fstat(folder)  # the file that was opened, whatever the path names now
        _check_plain_file(shown, info, max_bytes)
        with os.fdopen(os.dup(folder), "rb") as file:
            data = file.read() if max_bytes is None else file.read(max_bytes + 1)
    finally:
        os.close(folder)
    if max_bytes is not None and len(data) > max_bytes:  # it grew after the fstat
        raise UnsafePathError(
            f"{escaped(shown)} is more than {max_bytes} bytes, above the limit for this file"
        )
    return data


def _plain_parts(root: str | Path, relative: str | Path) -> tuple[str, ...]:
    """The components of ``relative``, refused unless it is a plain relative name."""
    parts = PurePosixPath(Path(relative).as_posix()).parts
    if (
        not parts
        or Path(relative).is_absolute()
        or any(part in ("..", ".") for part in parts)
        or "\0" in str(relative)
    ):
        raise UnsafePathError(f"{escaped(Path(root) / relative)}: not a plain file name inside {escaped(root)}")
    return parts


def _read_link(name: str, folder: int) -> str:
    try:
        return os.readlink(name, dir_fd=folder)
    except OSError:  # replaced again meanwhile
        return "somewhere"


def _symlink_error(link: Path, target: str, root: str | Path, kind: str = "files") -> UnsafePathError:
    # The target is whatever the folder's writer chose, newlines included: shown escaped.
    return UnsafePathError(
        f"{escaped(link)} is a symlink (to {target!r}); only {kind} that really live in {escaped(root)} are used"
    )


def _check_plain_file(shown: Path, info: os.stat_result, max_bytes: int | None) -> None:
    """Refuse anything but a regular file with one hard link and, with ``max_bytes``, at most that size."""
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePathError(f"{escaped(shown)} is not a regular file ({_kind(info.st_mode)})")
    if info.st_nlink > 1:
        # A hard link is the same file under another name too, e.g. /etc/passwd linked in.
        raise UnsafePathError(
            f"{escaped(shown)} has {info.st_nlink} hard links (it is also a file elsewhere); copy it to give it its own"
        )
    if max_bytes is not None and info.st_size > max_bytes:
        raise UnsafePathError(
            f"{escaped(shown)} is {info.st_size} bytes, above the {max_bytes}-byte limit for this file"
        )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def confined_folder(root: str | Path, name: str, *, create: bool = False) -> Path:
    """The real path of the folder ``name``, an entry directly inside the folder ``root``.

    Where a command writes into a subfolder of a folder it serves, the subfolder must be a real one:
    a symlink named like it (``out/examples -> /elsewhere``) would carry the writes outside ``root``.
    ``name`` is one plain entry name; a symlink, or anything but a folder, is :class:`UnsafePathError`.
    A missing folder is created with ``create`` (``mkdir`` never follows a symlink put there
    meanwhile: the check after it still sees it), else ``FileNotFoundError``.
    """
    root_real = Path(os.path.realpath(root))
    shown = Path(root) / name
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UnsafePathError(f"{escaped(shown)}: not a plain folder name inside {escaped(root)}")
    path = root_real / name
    if create:
        with contextlib.suppress(FileExistsError):  # whatever is there is checked below
            os.mkdir(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{escaped(shown)} does not exist") from None
    if stat.S_ISLNK(info.st_mode):
        raise _symlink_error(shown, os.readlink(path), root, "folders")
    if not stat.S_ISDIR(info.st_mode):
        kind = "a file" if stat.S_ISREG(info.st_mode) else _kind(info.st_mode)
        raise UnsafePathError(f"{escaped(shown)} is not a folder ({kind})")
    return path

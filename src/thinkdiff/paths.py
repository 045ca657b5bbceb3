"""Confining a file to a folder: what a command may read, serve or publish from a folder it was given.

A folder handed to ``thinkdiff push`` (or a job folder the app serves) may hold a symlink to
``/etc/passwd``, to another run's weights, or a FIFO that blocks the reader forever. Every such
file is refused here, in one place, before anything is read, served or uploaded.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path, PurePosixPath


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
        raise FileNotFoundError(f"folder {root} does not exist")
    parts = PurePosixPath(Path(relative).as_posix()).parts
    shown = Path(root) / relative
    if (
        not parts
        or Path(relative).is_absolute()
        or any(part in ("..", ".") for part in parts)
        or "\0" in str(relative)
    ):
        raise UnsafePathError(f"{shown}: not a plain file name inside {root}")
    current = root_real
    for depth, part in enumerate(parts, start=1):
        current = current / part
        try:
            info = os.lstat(current)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"{shown} does not exist") from None
        if stat.S_ISLNK(info.st_mode):
            link = Path(root, *parts[:depth])
            raise UnsafePathError(
                f"{link} is a symlink (to {os.readlink(current)}); only files that really live in {root} are used"
            )
    real = Path(os.path.realpath(current))
    if not real.is_relative_to(root_real):  # cannot happen without a symlink; checked all the same
        raise UnsafePathError(f"{shown} lies outside {root} (really {real})")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePathError(f"{shown} is not a regular file ({_kind(info.st_mode)})")
    if info.st_nlink > 1:
        # A hard link is the same file under another name too, e.g. /etc/passwd linked in.
        raise UnsafePathError(
            f"{shown} has {info.st_nlink} hard links (it is also a file elsewhere); copy it to give it its own"
        )
    if max_bytes is not None and info.st_size > max_bytes:
        raise UnsafePathError(
            f"{shown} is {info.st_size} bytes, above the {max_bytes}-byte limit for this file"
        )
    return real


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
        raise UnsafePathError(f"{shown}: not a plain folder name inside {root}")
    path = root_real / name
    if create:
        with contextlib.suppress(FileExistsError):  # whatever is there is checked below
            os.mkdir(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{shown} does not exist") from None
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePathError(
            f"{shown} is a symlink (to {os.readlink(path)!r}); only folders that really live in {root} are used"
        )
    if not stat.S_ISDIR(info.st_mode):
        kind = "a file" if stat.S_ISREG(info.st_mode) else _kind(info.st_mode)
        raise UnsafePathError(f"{shown} is not a folder ({kind})")
    return path

"""File-system helpers shared by the client memory stores, the server checkpoints and the data cache:
the one implementation of an atomic file write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(path: Path) -> None:
    """fsync a directory, which makes the renames and creations inside it durable (without it a
    power cut can bring back the file a rename replaced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: Path, write: Callable[[BinaryIO], object], *, sync: bool) -> Path:
    """Write a new temporary file beside ``path`` with ``write(fh)`` (flushed, and fsynced if ``sync``)
    and return its path; it is removed if writing fails (one left behind by a kill is never read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def replace(tmp: Path, path: Path, *, sync: bool) -> None:
    """Rename ``tmp`` over ``path`` (atomic on POSIX: readers see the old file or the new one, never a
    torn one) and, if ``sync``, fsync the directory so the rename survives a power cut."""
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(Path(path).parent)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], *, sync: bool = True) -> None:
    """Write ``path`` atomically with ``write(fh)``: :func:`write_temp`, then :func:`replace`.

    ``sync=False`` skips the fsyncs: still atomic for a killed process (the page cache outlives it),
    not durable across a power cut."""
    replace(write_temp(path, write, sync=sync), Path(path), sync=sync)

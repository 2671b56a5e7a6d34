"""Durable file replacement, shared by the block map, the source gate and `config --in-place`.

`write_file_atomically` writes a temporary file in the target's directory, fsyncs it, renames it
over the target and fsyncs the directory: once it returns, the new content survives a crash, and a
reader sees either the old file or the new one, never a half-written one.  A failed fsync raises
`SyncError` (an OSError): Linux reports a writeback error to fsync only once, so a caller that
must never take a retry's success for durability (the block map) treats it as permanent, while a
failed write (ENOSPC...) leaves the old file in place and may be retried.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class SyncError(OSError):
    """An fsync failed: what it covered may be lost, and a retry's success would not say
    otherwise."""


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise SyncError(exc.errno, exc.strerror) from exc


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new name inside `directory` durable (`SyncError` if fsync fails)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` durably (see the module docstring)."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            _fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)

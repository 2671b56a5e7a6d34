"""The source gate: has the operator declared the source disk frozen?

`postcopy receive --wait-for-source` keeps nothing from the source until a file named
`source-frozen` exists in the state directory.  `declare_source_frozen` creates it atomically
(write a temporary file, fsync it, rename it into place, fsync the directory), so that the
declaration survives a crash once the call returns, and a reader never sees a half-made file.
The engine polls `is_source_frozen` (a single `stat`) and opens the gate when it turns true.
"""

from __future__ import annotations

import os
from pathlib import Path

from postcopy.errors import UserError

SOURCE_FROZEN_FILENAME = "source-frozen"


def source_frozen_path(state_dir: Path) -> Path:
    """Where the gate file of `state_dir` lives."""
    return Path(state_dir) / SOURCE_FROZEN_FILENAME


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new name inside `directory` durable."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def declare_source_frozen(state_dir: Path) -> None:
    """Declare the source frozen: from now on the destination keeps what it fetches.

    Idempotent.  Raises `UserError` when `state_dir` is not an existing directory.
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise UserError(f"state directory {state_dir} does not exist")
    final_path = source_frozen_path(state_dir)
    temp_path = state_dir / f".{SOURCE_FROZEN_FILENAME}.{os.getpid()}.tmp"
    fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"frozen\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp_path, final_path)
    fsync_directory(state_dir)


def is_source_frozen(state_dir: Path) -> bool:
    """True once `declare_source_frozen(state_dir)` has completed (or the file was made by hand)."""
    return os.path.exists(source_frozen_path(state_dir))

"""The source gate: has the operator declared the source disk frozen?

`postcopy receive --wait-for-source` keeps nothing from the source until a file named
`source-frozen` exists in the state directory.  `declare_source_frozen` creates it atomically
(write a temporary file, fsync it, rename it into place, fsync the directory), so that the
declaration survives a crash once the call returns, and a reader never sees a half-made file.
The engine polls `is_source_frozen` (a single `stat`) and opens the gate when it turns true.
Declaring is the one write into a state directory that does not conflict with its live engine,
so it takes no lock (`postcopy.destination.statelock`): it is how an operator opens the gate of a
running receive.
A declaration that fails (a full disk, a failed fsync) is a one-line `UserError` and leaves no
new gate file behind: when the rename happened but the directory's fsync failed, the file is
removed again, so that a gate that may not survive a crash is not acted upon.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from postcopy.errors import UserError
from postcopy.fsutil import SyncError, write_file_atomically

SOURCE_FROZEN_FILENAME = "source-frozen"


def source_frozen_path(state_dir: Path) -> Path:
    """Where the gate file of `state_dir` lives."""
    return Path(state_dir) / SOURCE_FROZEN_FILENAME


def declare_source_frozen(state_dir: Path) -> None:
    """Declare the source frozen: from now on the destination keeps what it fetches.

    Idempotent.  Raises `UserError` when `state_dir` is not an existing directory.
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise UserError(f"state directory {state_dir} does not exist")
    path = source_frozen_path(state_dir)
    existed = os.path.lexists(path)
    try:
        write_file_atomically(path, b"frozen\n")
    except OSError as exc:
        if isinstance(exc, SyncError) and not existed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise UserError(
            f"cannot declare the source frozen in {state_dir}: {exc.strerror or exc}"
        ) from None


def is_source_frozen(state_dir: Path) -> bool:
    """True once `declare_source_frozen(state_dir)` has completed (or the file was made by hand)."""
    return os.path.exists(source_frozen_path(state_dir))

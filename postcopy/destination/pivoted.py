"""The pivoted mark: the domain now uses the destination file directly, not through receive.

Once a disk is `complete` and its domain has been switched from the NBD disk to the local file
(`postcopy pivot`, or the pivot step of `postcopy migrate`), the state directory is marked with a
file named `pivoted` (written atomically and durably, like the source gate).  From then on the file
belongs to the domain: `postcopy receive` refuses a pivoted state directory with one line, because
an engine serving that file again would write fetched or guest data into a disk that the
hypervisor already writes directly.

`mark_pivoted` checks first that the map is complete (a disk that is not complete cannot be
pivoted: the missing chunks exist only on the source); `check_not_pivoted` is receive's refusal.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from postcopy.errors import StateError, UserError
from postcopy.fsutil import write_file_atomically

PIVOTED_FILENAME = "pivoted"


def pivoted_path(state_dir: Path) -> Path:
    return Path(state_dir) / PIVOTED_FILENAME


def is_pivoted(state_dir: Path) -> bool:
    return os.path.exists(pivoted_path(state_dir))


def mark_pivoted(state_dir: Path, dest: Path, how: str) -> None:
    """Record that the domain now opens `dest` directly (`how`: e.g. the QEMU node it uses).
    Idempotent; UserError when the state directory does not exist."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise UserError(f"state directory {state_dir} does not exist")
    record = {"dest": str(dest), "how": how, "pivoted_at": time.time()}
    write_file_atomically(pivoted_path(state_dir), (json.dumps(record) + "\n").encode())


def check_not_pivoted(state_dir: Path) -> None:
    """Refuse (StateError, one line) a state directory whose disk the domain already uses
    directly."""
    if not is_pivoted(state_dir):
        return
    try:
        dest = json.loads(pivoted_path(state_dir).read_text()).get("dest", "its file")
    except (OSError, ValueError, AttributeError):
        dest = "its file"
    raise StateError(
        f"state directory {state_dir} is pivoted: the domain uses {dest} directly, so no receive "
        "may serve it again (remove the state directory to start a new migration of that file)"
    )

"""What each host records about a migration, so that a detached or crashed one can be resumed.

Both records are one JSON object written atomically and durably (`fsutil.write_file_atomically`):

- Host A: `<record dir>/<domain>.json` (`--record-dir`, default /var/lib/postcopy/outgoing): how
  B is reached, the serve process, the disks, the phase, the figures measured so far.
- Host B: `<migration dir>/incoming.json`, where the migration dir is `<state_root>/<domain>` of
  the domain's policy (the parent of the disks' state directories): the receive processes and
  their command lines, B's QEMU, which paths this migration created, the phase.

Phases, in order: `preparing` (before switchover: any failure undoes everything), `switched` (the
domain runs on B: nothing may be undone), `pivoted` (every disk is B's own file), `done`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from postcopy.errors import UserError
from postcopy.fsutil import write_file_atomically

PHASES = ("preparing", "switched", "pivoted", "done")
INCOMING_RECORD = "incoming.json"


@dataclass(frozen=True)
class DiskPlan:
    """One disk of the migration, as both hosts see it (paths on B are B's)."""

    device: str
    source_image: str  # on A
    export: str  # the random export name serve offers it under
    dest_file: str  # on B
    state_dir: str  # on B
    socket: str  # on B: the Unix socket receive serves the domain's disk on
    chunk_size: int
    bandwidth: int | None
    source_id: str  # the receive's stable source identity (<domain>/<device>)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiskPlan:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def save_record(path: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    write_file_atomically(Path(path), text.encode())


def load_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no migration record {path}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the migration record {path}: {exc}") from None
    if not isinstance(record, dict) or record.get("phase") not in PHASES:
        raise UserError(f"{path} is not a migration record")
    return record

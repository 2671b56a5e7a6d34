"""The status record of one destination disk, in `<state dir>/status.json`.

The engine writes it atomically (temporary file + rename, no fsync: it is a live view, not state)
at least twice a second while anything changes, and every 5 s otherwise.  Readers
(`fetch-progress`, tools) call `read_status`.  Fields (all present in every record):

    state                    waiting-for-source | fetching | source-unreachable | complete | failed
                             (failed: the source changed identity, or a sync of the local file
                             or of the block map failed; after a failed sync every flush, read
                             and write gets EIO, and a restart of receive once the disk is fixed
                             fetches again whatever was not durable; `error` says which)
    size_bytes               disk size
    present_bytes            bytes whose chunks are PRESENT (fetched, holes, or guest-written)
    missing_bytes            size_bytes - present_bytes
    transferred_bytes        bytes read from the source by this run (fetches and pass-through)
    demand_fetches           fetch requests started for guest misses (shared misses count once)
    demand_bytes             bytes fetched for guest misses
    drain_bytes              bytes fetched by the background drain
    hole_bytes_skipped       bytes that became PRESENT holes from the source's block status
    discarded_fetch_bytes    fetched bytes thrown away because a guest write got there first
    passthrough_reads        reads served from the source before `source-frozen` (not kept)
    faults                   guest reads that touched a missing chunk
    fault_latency_p50_ms     median latency of those reads (last 2048), null before any
    fault_latency_p99_ms     99th percentile of the same
    transfer_rate_bytes_per_second   source bytes per second over the last ~5 s
    present_rate_bytes_per_second    growth of present_bytes per second over the last ~5 s
    eta_seconds              missing_bytes / present rate; 0 when complete; null when unknown
    reconnects               successful reconnections to the source by this run
    stalls                   source requests or handshakes dropped at their deadline (a stall)
    bandwidth_bytes_per_second   the drain's cap (null: none)
    source_down_seconds      how long the source has been unreachable (0 when connected)
    unreachable_timeout_seconds  how long a guest read waits for an unreachable source
    error                    the last error (failure reason or connection error), or null
    chunk_size               block map chunk size in bytes
    guest_written_chunks     chunks the guest has written here (what a rollback must copy back)
    source, dest             the source URI and the local file
    pid                      the serving process (nbdkit)
    started_at, updated_at   Unix times
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from postcopy.errors import UserError

STATUS_FILENAME = "status.json"
STATES = ("waiting-for-source", "fetching", "source-unreachable", "complete", "failed")


def status_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATUS_FILENAME


def write_status(state_dir: Path, record: dict[str, Any]) -> None:
    """Replace the status record atomically (readers see the old or the new one, whole)."""
    path = status_path(state_dir)
    temp = path.with_name(f".{STATUS_FILENAME}.{os.getpid()}.tmp")
    try:
        temp.write_text(json.dumps(record, sort_keys=True) + "\n")
        os.rename(temp, path)
    except BaseException:
        # a full disk: leave no half-written temporary file behind (it would hold the space)
        temp.unlink(missing_ok=True)
        raise


def read_status(state_dir: Path) -> dict[str, Any]:
    """The current record; `UserError` (one line) when the directory or record is unusable."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise UserError(f"state directory {state_dir} does not exist")
    path = status_path(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"no status in {state_dir} (is postcopy receive running?)") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    try:
        record = json.loads(text)
    except ValueError:
        raise UserError(f"{path} is not a valid status record") from None
    if not isinstance(record, dict) or record.get("state") not in STATES:
        raise UserError(f"{path} is not a valid status record")
    return record


def process_alive(pid: int) -> bool:
    """Is the process that wrote a record still there?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

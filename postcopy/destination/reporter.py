"""What the engine reports: its state and the status record, and the task that writes it.

`StatusReporter.record` builds the record `postcopy.destination.status` describes (and writes,
and `fetch-progress` reads) from the shared state: the block map, the fetch tallies, the links.
The rates are over the last ~5 s of the samples the record calls take; the state is derived, in
this order: failed (a failure or a failed sync), complete, waiting-for-source, failed (a link's
fatal error), source-unreachable, fetching.  The trio thread writes the record whenever it
changes, and `Engine.stop` once more at the end; tests and `Engine.statistics` call `record`
from any thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

import trio

from postcopy.destination import status
from postcopy.destination.links import percentile
from postcopy.destination.shared import SharedState

log = logging.getLogger(__name__)


class StatusReporter:
    """The state and the status record of one engine."""

    def __init__(self, shared: SharedState) -> None:
        self._shared = shared
        self._started_at = time.time()  # Unix time, in every record
        # (time.monotonic(), present bytes, transferred bytes) of the last records, for the
        # rates; appended by every record() call, from any thread (a deque: appends are atomic)
        self._progress_samples: deque[tuple[float, int, int]] = deque(maxlen=64)

    async def run(self) -> None:
        """(trio thread) Write the record whenever it changes (at most every `status_interval`)
        and every 5 s anyway."""
        shared = self._shared
        last_record: dict[str, Any] | None = None
        last_written = 0.0
        while True:
            shared.check_complete()  # guest writes may have made the last chunks present
            record = self.record()
            changed = last_record is None or {
                k: v for k, v in record.items() if k != "updated_at"
            } != {k: v for k, v in last_record.items() if k != "updated_at"}
            now = time.monotonic()
            if changed or now - last_written > 5.0:
                try:
                    await trio.to_thread.run_sync(
                        status.write_status, shared.config.state_dir, record
                    )
                except OSError as exc:  # retried at the next tick
                    log.warning("postcopy: cannot write the status record: %s", exc)
                else:
                    last_record, last_written = record, now
            await trio.sleep(shared.config.status_interval)

    def write_now(self) -> None:
        """Write the record now (at stop)."""
        status.write_status(self._shared.config.state_dir, self.record())

    def state(self) -> str:
        """waiting-for-source | fetching | source-unreachable | complete | failed"""
        shared = self._shared
        if shared.failure is not None or shared.map.durability_failure is not None:
            return "failed"
        if shared.map.is_complete:
            return "complete"
        if not shared.frozen:
            return "waiting-for-source"
        if any(link.fatal_error for link in shared.links):
            return "failed"
        if any(link.seconds_down() >= 0.5 for link in shared.links):
            return "source-unreachable"  # (not during the first connection's set-up)
        return "fetching"

    def record(self) -> dict[str, Any]:
        """The status record (see `postcopy.destination.status` for the fields)."""
        shared = self._shared
        counters = shared.counters
        links = shared.links
        now = time.monotonic()
        present = shared.map.present_bytes
        transferred = counters.transferred_bytes
        self._progress_samples.append((now, present, transferred))
        oldest = self._progress_samples[0]
        for sample in self._progress_samples:
            if now - sample[0] <= 5.0:
                oldest = sample
                break
        elapsed = now - oldest[0]
        present_rate = (present - oldest[1]) / elapsed if elapsed > 0.2 else 0.0
        transfer_rate = (transferred - oldest[2]) / elapsed if elapsed > 0.2 else 0.0
        missing = shared.size - present
        if missing == 0:
            eta: float | None = 0.0
        elif present_rate > 0:
            eta = round(missing / present_rate, 1)
        else:
            eta = None
        latencies = sorted(counters.fault_latencies)
        p50 = percentile(latencies, 0.5)
        p99 = percentile(latencies, 0.99)
        down = max((link.seconds_down() for link in links), default=0.0)
        errors = [link.fatal_error or link.last_error for link in links if not link.is_connected]
        return {
            "state": self.state(),
            "size_bytes": shared.size,
            "present_bytes": present,
            "missing_bytes": missing,
            "transferred_bytes": transferred,
            "demand_fetches": counters.demand_fetches,
            "demand_bytes": counters.demand_bytes,
            "drain_bytes": counters.drain_bytes,
            "hole_bytes_skipped": counters.hole_bytes_skipped,
            "discarded_fetch_bytes": counters.discarded_fetch_bytes,
            "passthrough_reads": counters.passthrough_reads,
            "faults": counters.faults,
            "fault_latency_p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "fault_latency_p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "transfer_rate_bytes_per_second": round(transfer_rate),
            "present_rate_bytes_per_second": round(present_rate),
            "eta_seconds": eta,
            "reconnects": sum(max(0, link.connects - 1) for link in shared.links_ever),
            "stalls": sum(link.stalls for link in shared.links_ever),
            "bandwidth_bytes_per_second": shared.config.bandwidth,
            "source_down_seconds": round(down, 3),
            "unreachable_timeout_seconds": shared.config.unreachable_timeout,
            "error": (
                shared.failure
                or shared.map.durability_failure
                or (errors[0] if errors and down > 0 else None)
            ),
            "chunk_size": shared.map.chunk_size,
            "guest_written_chunks": shared.map.guest_written_count,
            "source": shared.config.source_uri,
            "dest": str(shared.config.dest_path),
            "pid": os.getpid(),
            "started_at": self._started_at,
            "updated_at": time.time(),
        }

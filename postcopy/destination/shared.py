"""The state the engine's parts share, one object: each field with its invariant.

`Engine` (the facade nbdkit's plugin calls) creates one `SharedState` and hands it to its parts:
the trio-side fetcher (`fetcher`), the worker-thread miss path (`misses`), the drain
(`drain`) and the status reporter (`reporter`).  Which thread writes which field, and under
which lock, is the table at the top of `postcopy.destination.engine`; the comment on each field
below says what always holds.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import trio

from postcopy.destination import planner
from postcopy.destination.blockmap import BlockMap
from postcopy.destination.inflight import InFlightTable
from postcopy.destination.links import SourceLink
from postcopy.destination.localdisk import LocalDisk
from postcopy.destination.ratelimit import TokenBucket

if TYPE_CHECKING:
    from postcopy.destination.engine import EngineConfig

log = logging.getLogger(__name__)


class SharedState:
    """What the engine's parts share (see the module docstring)."""

    def __init__(
        self,
        config: EngineConfig,
        block_map: BlockMap,
        disk: LocalDisk,
        *,
        frozen: bool,
    ) -> None:
        # ---- fixed at construction ---------------------------------------------------------
        self.config = config  # read only
        self.map = block_map  # bits only ever get set; MISSING -> PRESENT under commit_lock
        self.disk = disk  # the data file; its size is the disk's
        self.size = disk.size
        self.limits = planner.FetchLimits.compute(
            block_map.chunk_shift,
            demand_fetch_bytes=config.demand_fetch_bytes,
            drain_request_bytes=config.drain_request_bytes,
            block_status_window_bytes=config.block_status_window_bytes,
            drain_requests_in_flight=config.drain_requests_in_flight,
            drain_requests_during_faults=config.drain_requests_during_faults,
            fault_quiet_seconds=config.fault_quiet_seconds,
        )
        # Held across "is the chunk still MISSING?" + its data write + its PRESENT mark, by
        # every path that makes MISSING chunks PRESENT (fetch commits, guest writes, zeroes,
        # trims, source holes): so a guest write that lands first always wins.  Never held
        # together with `in_flight.lock`.
        self.commit_lock = threading.Lock()
        # chunk -> its one fetch in flight, the jobs per kind, the fetch tallies (own lock)
        self.in_flight = InFlightTable()
        self.counters = self.in_flight.counters

        # ---- flags: each only ever goes one way ---------------------------------------------
        # the source is frozen (the gate is open): misses are fetched and kept; False -> True
        self.frozen = frozen
        # why the engine failed for good (a source mismatch, the loop crashed; a failed sync
        # is `map.durability_failure`); None -> a message, never back
        self.failure: str | None = None
        self.stopped = False  # stop() began: no new work from worker threads; False -> True

        # ---- set by the trio thread at start (None before; readers check) ------------------
        self.token: trio.lowlevel.TrioToken | None = None  # set before `start()` returns
        self.frozen_event: trio.Event | None = None  # set once `frozen` is True
        self.complete_event: trio.Event | None = None  # set once every chunk is PRESENT
        # set and replaced each time a fetch job ends (wakes the drain and its yielding)
        self.job_finished: trio.Event | None = None
        self.bucket: TokenBucket | None = None  # the drain's bandwidth cap (None: no cap)
        self.demand_link: SourceLink | None = None  # guest fetches; never queues behind drain
        self.drain_link: SourceLink | None = None  # the drain's fetches and block status
        self.links: list[SourceLink] = []  # the links while they run; [] after completion
        self.links_ever: list[SourceLink] = []  # every link of this run (for the tallies)

        # ---- hints from guest misses to the drain (a stale value is harmless) ----------------
        self.drain_hint: int | None = None  # the drain's cursor jumps here: after a miss
        self.last_fault_at = -1e9  # trio clock of the last guest fetch started or served
        self.last_miss_end: int | None = None  # the chunk after the last guest miss
        self.sequential_misses = False  # the last miss started where the one before ended

    def chunk_span(self, first: int, end: int) -> tuple[int, int]:
        """Byte offsets `[start, stop)` of chunks `[first, end)`."""
        return planner.chunk_span(first, end, self.map.chunk_shift, self.size)

    def fail(self, message: str) -> None:
        """The engine fails for good (the first reason is kept)."""
        if self.failure is None:
            self.failure = message
            log.error("postcopy: %s", message)

    def open_gate(self) -> None:
        """(trio thread) The source is frozen: misses are fetched and kept from now on."""
        self.frozen = True
        if self.frozen_event is not None:
            self.frozen_event.set()

    def check_complete(self) -> None:
        """(trio thread) Every chunk PRESENT: the source task winds down."""
        if self.map.is_complete and self.complete_event is not None:
            self.complete_event.set()

    def signal_job_finished(self) -> None:
        """(trio thread) A fetch job ended: wake whoever waits for one."""
        if self.job_finished is not None:
            self.job_finished.set()
            self.job_finished = trio.Event()

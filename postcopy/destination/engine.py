"""The lazy destination engine: serves a disk from a local sparse file, fetching what is missing.

`Engine` is the facade nbdkit's plugin calls: create, `start()`, serve, `stop()`.  nbdkit's worker
threads call the synchronous operations (`pread_into`, `pwrite`, `flush`, `trim`, `zero`,
`extents`, `cache`).  A read whose chunks are all PRESENT never leaves the worker thread: it checks
the block map (lock-free: bits are only ever set) and `os.preadv`s straight into nbdkit's buffer.
Only work that needs the source hops to the engine's trio loop, which runs `trio.run` in a daemon
thread, via `trio.from_thread.run` and a token captured at start.

The parts (each module says how it works):

    engine.py     this facade: lifecycle, the guest operations, durability
    shared.py     SharedState: what the parts share, each field with its invariant
    localdisk.py  LocalDisk: the data file (reads, writes, holes, zeroing, fdatasync, the
                  DataFileObserver seam) and the release fence before a PRESENT mark
    inflight.py   FetchJob, the in-flight table (the one place chunks are handed out), tallies
    fetcher.py    the trio side: misses that hop there, pass-through, fetch jobs, the commit rule
    misses.py     misses served on the worker thread over a blocking connection
    drain.py      the background drain, and holes from the source's block status
    planner.py    the pure decisions (what to fetch, split, skip, answer), tested on their own
    reporter.py   StatusReporter: the state and the status record, and the task writing it

#### Threads, fields and locks ####

Three kinds of thread: the *trio* thread (the engine loop and its `trio.to_thread` helpers, which
run drain commits and syncs), nbdkit's *worker* threads (the guest operations), and the *main*
thread (nbdkit's: `start` in after_fork, `stop` in cleanup).  Three locks of the engine, never
held together (and never across an await): `commit_lock` (MISSING -> PRESENT with its data
write), `in_flight.lock` (the in-flight table and the fetch tallies),
`BlockingMisses._sources_lock` (the worker threads' connections).  `BlockMap` takes its own lock
inside `mark` and `make_durable` (so within `commit_lock` too).

    field (owner)                          written by               under            read by
    map bits MISSING -> PRESENT            trio, worker             commit_lock      all, no lock
    map GUEST_WRITTEN on PRESENT chunks    worker                   (map's own)      all, no lock
    data file, MISSING chunks              trio, worker             commit_lock      all
    data file, PRESENT chunks              worker (guest writes)    none: no fetch   all
                                                                    writes them
    in_flight.jobs / demand_jobs /         trio (claim, release),   in_flight.lock   drain: peeks
      drain_jobs / thread_jobs             worker (blocking miss)                    with no lock,
                                                                                     claims re-check
    counters: transferred, demand, drain,  trio, worker             in_flight.lock   statistics
      demand_fetches, blocking_misses,
      passthrough_reads
    counters: discarded_fetch_bytes,       trio, worker             commit_lock      statistics
      hole_bytes_skipped
    counters: faults, fault_latencies      worker                   GIL only         statistics
    frozen (False -> True)                 trio (open_gate)         none             all
    failure (None -> message)              trio, worker (flush),    none: first      all
                                           main (stop)              one kept
    stopped (False -> True)                main (stop)              none             worker
    token, events, bucket, links           trio (at start; links    none: set        worker reads
                                           emptied at completion)   before started   links, token
    drain_hint                             worker, trio             none: a hint     trio (drain)
    last_fault_at                          trio                     none             trio (drain)
    last_miss_end, sequential_misses       worker (_note_miss)      none: a hint     trio (drain)
    Fetcher.nursery                        trio                     none             trio
    BlockingMisses._sources, _idle,        worker, trio/main        _sources_lock    worker
      _opening, _closed                    (close)                  (+ each source's
                                                                    own lock to use it)
    BlockingMisses._retry_at               worker                   none: a hint     worker
    Engine._thread                         main (start)             none             main (stop)
    Engine._started (set once)             trio (loop running)      none: an Event   main (start)
    Engine._cancel_scope                   trio                     none             trio (via
                                                                                     run_sync)
    StatusReporter._progress_samples       any caller of record()   none (a deque)   record()
                                           (trio's status task, main
                                           at stop, tests)

#### The rules ####

The race rule.  A fetched chunk is written only if it is still MISSING, checked and written under
`commit_lock` (`Fetcher.commit_fetched`).  Guest writes, zeroes and trims that make a MISSING
chunk PRESENT take the same lock, so a guest write that lands first always wins and a late fetch
is discarded.  Partial writes (and zeroes) on a MISSING chunk fetch it first (read-modify-write,
`planner.partial_edge_chunks`).  Chunks already PRESENT are written without the lock: nothing else
writes them.

Durability.  `flush()` (and FUA) call `BlockMap.make_durable` with the data file's fdatasync: data
first, then the map.  A periodic task does the same every `sync_interval` seconds.  Every change
to the data file goes through `LocalDisk`, so that a test's `DataFileObserver` can simulate a
power loss exactly.  A failed sync (of the data file or of the map) fails the engine for good,
whoever hit it (the periodic task or a guest flush): Linux reports a writeback error only once, so
a later sync's success proves nothing.  From then on every flush, FUA, read, write, zero and trim
fails with EIO (reads too: a chunk fetched or written since the last good sync may read back stale
bytes once its pages are evicted; the block map stops the C filter's fast path as well), nothing
more is fetched or persisted (the map on disk keeps only what was provably durable, so a restart
fetches the rest again), and the status says `failed` with the reason.

The gate.  Until the source is frozen (`postcopy.destination.gate`), a read of a MISSING chunk is
read from the source straight into the guest's buffer: not stored, not marked; the drain waits.

Completion.  When every chunk is PRESENT the state becomes `complete`, the map is compacted, the
source connections close, and everything is served by the fast path.

Failures.  A dropped source connection is re-established with backoff and pending fetches are
re-sent; a stalled one (no answer within `request_timeout`, or no handshake) is dropped and
treated the same (`postcopy.destination.links.SourceLink`).  A guest read waits for a missing chunk
at most `unreachable_timeout` seconds, then fails with EIO; once the source has been down for longer
than that, reads of missing data wait only `UNREACHABLE_GRACE_SECONDS` (the link retries at once),
so they fail fast during a long outage and succeed as soon as the source is back.  PRESENT data and
guest writes that need no fetch keep working throughout.

Bandwidth.  With `bandwidth` set, the drain takes its bytes from a token bucket
(`postcopy.destination.ratelimit`) before each request; guest misses take theirs without waiting.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import logging
import os
import platform
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from postcopy.destination import gate as source_gate
from postcopy.destination import planner
from postcopy.destination.blockmap import (
    GUEST_WRITTEN,
    PRESENT,
    BlockMap,
    DurabilityError,
    MapIdentity,
)
from postcopy.destination.drain import Drain
from postcopy.destination.fetcher import Fetcher
from postcopy.destination.inflight import FetchJob
from postcopy.destination.links import SourceLink, SourceOpener, nbd_source_opener
from postcopy.destination.localdisk import (
    DataFileObserver,
    EngineIOError,
    LocalDisk,
    fallocate,
    punch_hole,
    release_fence_for,
)
from postcopy.destination.misses import (
    BLOCKING_RETRY_SECONDS,
    MAX_BLOCKING_SOURCES,
    BlockingMisses,
    blocking_address,
)
from postcopy.destination.planner import EXTENT_HOLE, EXTENT_ZERO, UNREACHABLE_GRACE_SECONDS
from postcopy.destination.ratelimit import TokenBucket
from postcopy.destination.reporter import StatusReporter
from postcopy.destination.settings import DestinationSettings, setting_default
from postcopy.destination.shared import SharedState
from postcopy.errors import UserError

__all__ = [  # what moved to the parts stays importable from here
    "BLOCKING_RETRY_SECONDS",
    "EXTENT_HOLE",
    "EXTENT_ZERO",
    "MAX_BLOCKING_SOURCES",
    "UNREACHABLE_GRACE_SECONDS",
    "DataFileObserver",
    "Engine",
    "EngineConfig",
    "EngineIOError",
    "FetchJob",
    "fallocate",
    "punch_hole",
    "release_fence_for",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class EngineConfig:
    """The engine's configuration: the disk's settings (`DestinationSettings`, whose defaults
    these are, under the engine's names; `from_settings` is the one place that maps them) and
    the engine's internal tuning, which no operator sets."""

    source_uri: str
    dest_path: Path
    state_dir: Path
    chunk_size: int = setting_default("chunk_size")
    wait_for_source: bool = setting_default("wait_for_source")
    export_name: str | None = setting_default("export_name")  # None: the one in the URI
    source_id: str | None = setting_default("source_id")  # identifies the source; None: the URI
    demand_fetch_bytes: int = 256 * 1024  # largest single fetch for a guest miss
    drain_request_bytes: int = setting_default("drain_request_size")
    drain_requests_in_flight: int = setting_default("drain_requests")
    # after a guest miss the drain keeps at most this many requests in flight for a while
    # (see DestinationSettings.drain_requests_during_faults)
    drain_requests_during_faults: int = setting_default("drain_requests_during_faults")
    fault_quiet_seconds: float = 0.05
    block_status_window_bytes: int = 1024 * 1024 * 1024
    # how long a guest read waits for the source (the setting source_timeout)
    unreachable_timeout: float = setting_default("source_timeout")
    # a source request (or handshake) unanswered this long: stalled
    request_timeout: float = setting_default("request_timeout")
    bandwidth: int | None = setting_default("bandwidth")  # drain cap in bytes/s (None: no cap)
    sync_interval: float = 1.0
    status_interval: float = 0.25
    gate_poll_interval: float = 0.1
    drain: bool = True
    # serve guest misses on nbdkit's worker threads over blocking connections (plain nbd://
    # and nbd+unix:// sources opened by the default opener; the trio path otherwise)
    blocking_misses: bool = setting_default("blocking_misses")

    @classmethod
    def from_settings(cls, settings: DestinationSettings) -> EngineConfig:
        """The engine's configuration for `settings` (its tuning at the defaults)."""
        return cls(
            source_uri=settings.source,
            dest_path=settings.dest,
            state_dir=settings.state_dir,
            chunk_size=settings.chunk_size,
            wait_for_source=settings.wait_for_source,
            export_name=settings.export_name,
            source_id=settings.source_id,
            drain_request_bytes=settings.drain_request_size,
            drain_requests_in_flight=settings.drain_requests,
            drain_requests_during_faults=settings.drain_requests_during_faults,
            unreachable_timeout=settings.source_timeout,
            request_timeout=settings.request_timeout,
            bandwidth=settings.bandwidth,
            blocking_misses=settings.blocking_misses,
        )

    def map_identity(self, disk_size: int) -> MapIdentity:
        """The identity of the block map of a disk of `disk_size` bytes under this
        configuration (what a state directory must match)."""
        return MapIdentity(
            disk_size=disk_size,
            chunk_size=self.chunk_size,
            source_size=disk_size,
            export_name=self.export_name or "",
            source_id=self.source_id or self.source_uri,
        )


def _tally(name: str) -> property:
    """A read-only attribute of Engine: the `FetchCounters` field `name`."""
    return property(lambda engine: getattr(engine._shared.counters, name))


class Engine:
    """One destination disk.  Create, `start()`, serve, `stop()`."""

    def __init__(
        self,
        config: EngineConfig,
        source_opener: SourceOpener | None = None,
        *,
        data_observer: DataFileObserver | None = None,
    ) -> None:
        self.config = config  # read only
        # opens a trio connection to the source (the links call it on every (re)connect)
        self._opener = source_opener or nbd_source_opener(config.source_uri, config.export_name)
        try:
            fd = os.open(config.dest_path, os.O_RDWR)
        except OSError as exc:
            raise UserError(f"cannot open {config.dest_path}: {exc.strerror}") from None
        self.size = os.fstat(fd).st_size  # the disk's size (the data file's)
        identity = MapIdentity(
            disk_size=self.size,
            chunk_size=config.chunk_size,
            source_size=self.size,
            export_name=config.export_name or "",
            source_id=config.source_id or config.source_uri,
        )
        try:
            # which chunks are PRESENT (bits only ever set); also `_shared.map`
            self.map = BlockMap.open(config.state_dir, identity, live_mirror=True)
        except BaseException:
            os.close(fd)
            raise
        try:
            release_fence = release_fence_for(
                platform.machine(), ctypes.util.find_library("atomic")
            )
        except BaseException:
            self.map.close()
            os.close(fd)
            raise
        self._disk = LocalDisk(fd, self.size, data_observer, release_fence)  # closed by stop()
        frozen = not config.wait_for_source or source_gate.is_source_frozen(config.state_dir)
        # the parts, made once; they share `_shared` (its fields: see SharedState)
        self._shared = SharedState(config, self.map, self._disk, frozen=frozen)
        self._fetcher = Fetcher(self._shared)
        self._misses = BlockingMisses(
            self._shared,
            self._fetcher,
            blocking_address(config.source_uri, config.export_name)
            if config.blocking_misses and source_opener is None
            else None,
        )
        self._drain = Drain(self._shared, self._fetcher)
        self._thread: threading.Thread | None = None  # the trio thread, once started
        self._started = threading.Event()  # set once the loop runs (or failed to start)
        self._cancel_scope: trio.CancelScope | None = None  # the loop's; cancelled by stop()
        self._reporter = StatusReporter(self._shared)

    # the fetch tallies, as read-only attributes (the status record has them too; tests read them)
    transferred_bytes = _tally("transferred_bytes")
    demand_bytes = _tally("demand_bytes")
    drain_bytes = _tally("drain_bytes")
    demand_fetches = _tally("demand_fetches")
    blocking_misses = _tally("blocking_misses")  # misses served on a worker thread
    passthrough_reads = _tally("passthrough_reads")
    hole_bytes_skipped = _tally("hole_bytes_skipped")
    discarded_fetch_bytes = _tally("discarded_fetch_bytes")
    faults = _tally("faults")

    @property
    def _in_flight(self) -> dict[int, FetchJob]:
        """Chunk -> its fetch in flight (tests peek at it; changed under the table's lock)."""
        return self._shared.in_flight.jobs

    # #### lifecycle ############################################################################

    def start(self, timeout: float = 10.0) -> None:
        """Start the trio thread (call it in the process that serves: after nbdkit forks)."""
        self._thread = threading.Thread(
            target=self._thread_main, name="postcopy-engine", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout):
            raise EngineIOError(errno.EIO, "engine thread did not start")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop fetching, make everything durable, close.  Idempotent."""
        shared = self._shared
        if shared.stopped:
            return
        shared.stopped = True
        self._misses.close()
        if self._thread is not None and self._thread.is_alive() and shared.token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel_main, trio_token=shared.token)
            self._thread.join(timeout)
        try:
            try:
                self._make_durable(compact=True)
            except DurabilityError:
                pass  # failed before or now: nothing is persisted any more (the status says why)
            finally:
                try:
                    self._reporter.write_now()
                except OSError as exc:
                    log.warning("postcopy: cannot write the status record: %s", exc)
        finally:
            self.map.close()
            self._disk.close()

    def _cancel_main(self) -> None:
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException:  # pragma: no cover - logged, the thread must not die silently
            log.exception("postcopy engine loop failed")
            self._shared.failure = self._shared.failure or "engine loop crashed"
        finally:
            self._started.set()

    async def _main(self) -> None:
        shared = self._shared
        shared.token = trio.lowlevel.current_trio_token()
        shared.frozen_event = trio.Event()
        shared.complete_event = trio.Event()
        shared.job_finished = trio.Event()
        if self.config.bandwidth:
            shared.bucket = TokenBucket(
                self.config.bandwidth,
                capacity=max(self.config.bandwidth // 4, self.config.drain_request_bytes),
            )
        if shared.frozen:
            shared.frozen_event.set()
        if self.map.is_complete:
            shared.complete_event.set()
        with trio.CancelScope() as self._cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reporter.run)
                nursery.start_soon(self._sync_task)
                if not self.map.is_complete:
                    await nursery.start(self._source_task)
                self._started.set()

    async def _source_task(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Everything that needs the source (links, fetch jobs, drain), torn down at completion."""
        shared = self._shared
        assert shared.complete_event is not None and shared.frozen_event is not None
        timeouts = {
            "request_timeout": self.config.request_timeout,
            "connect_timeout": self.config.request_timeout,
        }
        shared.demand_link = SourceLink("demand", self._opener, self.size, **timeouts)
        shared.drain_link = SourceLink("drain", self._opener, self.size, **timeouts)
        shared.links = [shared.demand_link, shared.drain_link]
        shared.links_ever = list(shared.links)  # (`links` empties at completion)
        async with trio.open_nursery() as nursery:
            self._fetcher.nursery = nursery
            for link in shared.links:
                await nursery.start(link.run)
            task_status.started()
            if not shared.frozen:
                nursery.start_soon(self._gate_task)
            if self.config.drain:
                nursery.start_soon(self._drain.run)
            await shared.complete_event.wait()
            nursery.cancel_scope.cancel()
        self._fetcher.nursery = None
        # complete: every chunk is present; the connections are closed by now
        shared.links = []
        await trio.to_thread.run_sync(self._misses.close)
        try:
            await trio.to_thread.run_sync(self._make_durable_compact)
        except DurabilityError:
            pass  # the engine is failed (logged, in the status)
        except OSError as exc:  # a write error: the changes stay pending, the sync task retries
            log.error("postcopy: cannot compact the block map: %s", exc)
        log.info("postcopy: complete, source closed")

    async def _gate_task(self) -> None:
        shared = self._shared
        while not shared.frozen:
            if source_gate.is_source_frozen(self.config.state_dir):
                shared.open_gate()
                return
            await trio.sleep(self.config.gate_poll_interval)

    def _make_durable_compact(self) -> None:
        self._make_durable(compact=True)

    def _make_durable(self, *, compact: bool = False) -> None:
        """`BlockMap.make_durable` with the data file's sync; a failed sync fails the engine."""
        try:
            self.map.make_durable(self._disk.sync, compact=compact)
        except DurabilityError as exc:
            self._shared.fail(exc.strerror or "a sync failed")
            raise

    def _refuse_if_failed(self) -> None:
        """After a failed sync the local file cannot be trusted (what it reads back since the
        last good sync may be stale) and nothing written can become durable: refuse (EIO)."""
        failure = self.map.durability_failure
        if failure is not None:
            raise EngineIOError(errno.EIO, failure)

    # #### calls from nbdkit's worker threads ###################################################

    def _call_trio(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        token = self._shared.token
        if token is None or self._shared.stopped:
            raise EngineIOError(errno.ESHUTDOWN, "engine not running")
        try:
            return trio.from_thread.run(async_fn, *args, trio_token=token)
        except EngineIOError:
            raise
        except trio.RunFinishedError:
            raise EngineIOError(errno.ESHUTDOWN, "engine stopped") from None
        except trio.Cancelled:
            raise EngineIOError(errno.ESHUTDOWN, "engine stopping") from None
        except OSError as exc:
            raise EngineIOError(exc.errno or errno.EIO, str(exc)) from None

    def pread_into(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill `buf` with the disk's bytes at `offset`."""
        length = len(buf)
        if length == 0:
            return
        self._refuse_if_failed()
        first, end = self.map.chunk_range(offset, length)
        if not self.map.all_present(first, end):
            counters = self._shared.counters
            started = time.monotonic()
            self._note_miss(first, end)
            served, notify_trio = self._misses.serve(first, end)
            if served:
                try:
                    self._disk.read_into(buf, offset)
                finally:
                    # only now: the trio thread waking up would contend for the GIL meanwhile
                    if notify_trio is not None:
                        notify_trio()
                    counters.fault_latencies.append(time.monotonic() - started)
                    counters.faults += 1
                return
            if notify_trio is not None:
                notify_trio()
            waited = time.monotonic() - started
            filled = self._call_trio(self._fetcher.prepare_read, buf, offset, first, end, waited)
            counters.fault_latencies.append(time.monotonic() - started)
            counters.faults += 1
            if filled:
                return
        self._disk.read_into(buf, offset)

    def _note_miss(self, first: int, end: int) -> None:
        """Is the guest reading missing data sequentially?  (Then the drain's read-ahead
        after the miss goes on during the miss burst; see `planner.drain_yield_until`.)"""
        shared = self._shared
        shared.sequential_misses = planner.is_sequential_miss(
            shared.last_miss_end, first, shared.limits.request_chunks
        )
        shared.last_miss_end = end

    def pwrite(self, buf: memoryview | bytes | bytearray, offset: int, fua: bool = False) -> None:
        """A guest write: it always wins over a fetch of the same chunk."""
        length = len(buf)
        if length == 0:
            return
        self._refuse_if_failed()
        first, end = self.map.chunk_range(offset, length)
        if self.map.all_present(first, end):
            self._disk.write(buf, offset)
            if not self.map.all_guest_written(first, end):
                self.map.mark(first, end, GUEST_WRITTEN)
        else:
            self._fetch_partial_edges(offset, length)
            with self._shared.commit_lock:
                self._disk.write(buf, offset)
                self._disk.mark_present(self.map, first, end, PRESENT | GUEST_WRITTEN)
        if fua:
            self.flush()

    def zero(
        self,
        offset: int,
        count: int,
        may_trim: bool = True,
        fua: bool = False,
        fast_only: bool = False,
    ) -> None:
        """Make `[offset, offset+count)` read as zeros; punches holes when allowed.

        `fast_only` (NBD's FAST_ZERO): fail with EOPNOTSUPP instead of fetching partial chunks.
        """
        if count == 0:
            return
        self._refuse_if_failed()
        first, end = self.map.chunk_range(offset, count)
        if not self.map.all_present(first, end):
            if fast_only and self._partial_edges(offset, count):
                raise EngineIOError(errno.EOPNOTSUPP, "zeroing would need a fetch")
            self._fetch_partial_edges(offset, count)
        with self._shared.commit_lock:
            if may_trim:
                try:
                    self._disk.punch_hole(offset, count)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    self._disk.zero_range(offset, count)
            else:
                self._disk.zero_range(offset, count)
            self._disk.mark_present(self.map, first, end, PRESENT | GUEST_WRITTEN)
        if fua:
            self.flush()

    def trim(self, offset: int, count: int, fua: bool = False) -> None:
        """Discard whole chunks (punch holes, mark PRESENT): advisory, partial chunks are kept."""
        if count == 0:
            return
        self._refuse_if_failed()
        first, end = planner.whole_chunks_within(
            offset, offset + count, self.map.chunk_size, self.size
        )
        if first < end:
            start_byte, stop_byte = self._shared.chunk_span(first, end)
            with self._shared.commit_lock:
                try:
                    self._disk.punch_hole(start_byte, stop_byte - start_byte)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    return  # trim is advisory: keep the data and the map as they are
                self._disk.mark_present(self.map, first, end, PRESENT | GUEST_WRITTEN)
        if fua:
            self.flush()

    def flush(self) -> None:
        """Make every acknowledged write durable: data first, then the map.  EIO for good once
        a sync has failed."""
        self._make_durable()

    def cache(self, offset: int, count: int) -> None:
        """Prefetch: fetch the missing chunks of the range now (once the source is frozen)."""
        if count == 0:
            return
        first, end = self.map.chunk_range(offset, min(count, self.size - offset))
        if not self.map.all_present(first, end) and self._shared.frozen:
            self._call_trio(self._fetcher.ensure_present, first, end, True)

    def extents(self, offset: int, count: int) -> list[tuple[int, int, int]]:
        """(offset, length, type) runs from `offset`: local allocation for PRESENT chunks;
        MISSING chunks are holes only where the source said so, data otherwise."""
        result: list[tuple[int, int, int]] = []
        end = min(offset + count, self.size)
        runs = planner.extent_runs(offset, end, self.map.chunk_shift, self.map.run_from)
        for start, stop, kind in runs:
            if kind is None:
                result.extend(self._disk.allocated_extents(start, stop))
            else:
                result.append((start, stop - start, kind))
            if len(result) >= 256:
                break
        return planner.merge_extents(result)

    def _fetch_partial_edges(self, offset: int, length: int) -> None:
        """Read-modify-write: fetch the MISSING chunks that the range covers only in part."""
        for chunk in self._partial_edges(offset, length):
            self._call_trio(self._fetcher.ensure_present_frozen, chunk, chunk + 1)

    def _partial_edges(self, offset: int, length: int) -> list[int]:
        """The MISSING chunks that `[offset, offset+length)` covers only in part."""
        edges = planner.partial_edge_chunks(offset, length, self.map.chunk_size, self.size)
        return [chunk for chunk in edges if not self.map.is_present(chunk)]

    # #### durability and status ################################################################

    def state(self) -> str:
        """waiting-for-source | fetching | source-unreachable | complete | failed"""
        return self._reporter.state()

    def statistics(self) -> dict[str, Any]:
        """The status record (see `postcopy.destination.status` for the fields)."""
        return self._reporter.record()

    async def _sync_task(self) -> None:
        while self.map.durability_failure is None:
            await trio.sleep(self.config.sync_interval)
            if self.map.pending_changes:
                try:
                    await trio.to_thread.run_sync(self._make_durable)
                except DurabilityError:
                    return  # the engine is failed for good (logged, in the status)
                except OSError as exc:
                    # a write error (ENOSPC...): the journal is back at its last good record
                    # and the changes stay pending; retried here, and a guest flush reports it
                    log.error("postcopy: cannot make the block map durable: %s", exc)

"""The lazy destination engine: serves a disk from a local sparse file, fetching what is missing.

Threads.  nbdkit's worker threads call the synchronous operations (`pread_into`, `pwrite`,
`flush`, `trim`, `zero`, `extents`, `cache`).  A read whose chunks are all PRESENT never leaves
the worker thread: it checks the block map (lock-free: bits are only ever set) and `os.preadv`s
straight into nbdkit's buffer.  Only work that needs the source hops to the engine's trio loop,
which runs `trio.run` in a daemon thread, via `trio.from_thread.run` and a token captured at start.

Fetching. Each missing chunk has at most one fetch in flight (`_in_flight`: chunk -> FetchJob,
changed only under `_flight_lock`, since worker threads register fetches too); a second miss on it
waits for the same job. Guest misses use their own source connections and are never queued behind
the drain. A miss whose chunks no fetch covers yet is served on the worker thread itself: it
registers a job, reads the chunks over that thread's blocking connection
(`postcopy.destination.links.BlockingSource`, keyed by `threading.get_ident()`), commits them under
the commit lock, and tells the trio side (`run_sync_soon`, no waiting) that the job is done, so
misses on the same chunks that went to the trio side meanwhile share it. That saves the worker ->
trio -> worker hand-off (two cross-thread wake-ups). Anything else (a chunk already in flight, a
long or split read, the gate closed, any error of the blocking connection, an outage) takes the trio
path, which owns reconnects, stall deadlines and the unreachable window; a failed blocking attempt
only counts against that window. While a miss is in flight (and for `fault_quiet_seconds` after) the
drain keeps at most `drain_requests_during_faults` requests going (default 0: it yields completely,
but never for more than a second at a time), and drain commits (MiB-sized writes) run in a worker
thread, so the trio thread answers misses first. The drain (one task, `drain_requests_in_flight`
requests of up to `drain_request_bytes`) walks the map from a cursor, first asking the source's
block status for a window so that holes become PRESENT holes without any transfer (the local file
stays sparse), then fetching coalesced missing runs. After a guest miss the cursor jumps to the
chunk after it (guests read sequentially more often than not).

The race rule.  A fetched chunk is written only if it is still MISSING, checked and written under
`_commit_lock`.  Guest writes, zeroes and trims that make a MISSING chunk PRESENT take the same
lock, so a guest write that lands first always wins and a late fetch is discarded.  Partial writes
(and zeroes) on a MISSING chunk fetch it first (read-modify-write).  Chunks already PRESENT are
written without the lock: nothing else writes them.

Durability.  `flush()` (and FUA) call `BlockMap.make_durable` with the data file's fdatasync: data
first, then the map.  A periodic task does the same every `sync_interval` seconds.  Every change
to the data file goes through `LocalDisk` (`postcopy.destination.localdisk`: `write`, `punch_hole`,
`zero_range`, and every sync through `sync`), so that a test's `DataFileObserver` can simulate a
power loss exactly.
A failed sync (of the data file or of the map) fails the engine for good, whoever hit it (the
periodic task or a guest flush): Linux reports a writeback error only once, so a later sync's
success proves nothing.  From then on every flush, FUA, read, write, zero and trim fails with
EIO (reads too: a chunk fetched or written since the last good sync may read back stale bytes
once its pages are evicted; the block map stops the C filter's fast path as well),
nothing more is fetched or persisted (the map on disk keeps only what was provably durable, so a
restart fetches the rest again), and the status says `failed` with the reason.

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
import ctypes
import ctypes.util
import errno
import logging
import os
import platform
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from nbdsrv.errors import CommandError
from nbdsrv.uri import NBDAddress, parse_nbd_uri
from postcopy.destination import gate as source_gate
from postcopy.destination import planner, status
from postcopy.destination.blockmap import (
    DEFAULT_CHUNK_SIZE,
    GUEST_WRITTEN,
    PRESENT,
    SOURCE_HOLE,
    BlockMap,
    DurabilityError,
    MapIdentity,
)
from postcopy.destination.links import (
    BlockingSource,
    SourceLink,
    SourceMismatch,
    SourceOpener,
    nbd_source_opener,
    percentile,
)
from postcopy.destination.localdisk import (
    DataFileObserver,
    EngineIOError,
    LocalDisk,
    fallocate,
    punch_hole,
    release_fence_for,
)
from postcopy.destination.planner import EXTENT_HOLE, EXTENT_ZERO, UNREACHABLE_GRACE_SECONDS
from postcopy.destination.ratelimit import TokenBucket
from postcopy.errors import UserError

__all__ = [  # what moved to the planner and to localdisk stays importable from here
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

# after a blocking connection failed, misses take the trio path for this long
BLOCKING_RETRY_SECONDS = 1.0
# at most this many blocking source connections (one per nbdkit worker thread that missed)
MAX_BLOCKING_SOURCES = 16


@dataclass
class EngineConfig:
    source_uri: str
    dest_path: Path
    state_dir: Path
    chunk_size: int = DEFAULT_CHUNK_SIZE
    wait_for_source: bool = False
    export_name: str | None = None  # None: the one in the URI
    source_id: str | None = None  # identifies the source in the state; None: the URI
    demand_fetch_bytes: int = 256 * 1024  # largest single fetch for a guest miss
    drain_request_bytes: int = 1024 * 1024
    drain_requests_in_flight: int = 4
    # after a guest miss the drain keeps at most this many requests in flight for a while,
    # so that the source and this process answer the guest first (0: the drain yields
    # completely during a burst of misses, but never for more than a second at a time)
    drain_requests_during_faults: int = 0
    fault_quiet_seconds: float = 0.05
    block_status_window_bytes: int = 1024 * 1024 * 1024
    unreachable_timeout: float = 180.0  # how long a guest read waits for the source
    request_timeout: float = 10.0  # a source request (or handshake) unanswered this long: stalled
    bandwidth: int | None = None  # drain cap in bytes per second (None: no cap)
    sync_interval: float = 1.0
    status_interval: float = 0.25
    gate_poll_interval: float = 0.1
    drain: bool = True
    # serve guest misses on nbdkit's worker threads over blocking connections (plain nbd://
    # and nbd+unix:// sources opened by the default opener; the trio path otherwise)
    blocking_misses: bool = True


@dataclass
class FetchJob:
    """One read from the source covering chunks `[first, end)`."""

    first: int
    end: int
    demand: bool
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class Engine:
    """One destination disk.  Create, `start()`, serve, `stop()`."""

    def __init__(
        self,
        config: EngineConfig,
        source_opener: SourceOpener | None = None,
        *,
        data_observer: DataFileObserver | None = None,
    ) -> None:
        self.config = config
        self._opener = source_opener or nbd_source_opener(config.source_uri, config.export_name)
        try:
            fd = os.open(config.dest_path, os.O_RDWR)
        except OSError as exc:
            raise UserError(f"cannot open {config.dest_path}: {exc.strerror}") from None
        self.size = os.fstat(fd).st_size
        identity = MapIdentity(
            disk_size=self.size,
            chunk_size=config.chunk_size,
            source_size=self.size,
            export_name=config.export_name or "",
            source_id=config.source_id or config.source_uri,
        )
        try:
            self.map = BlockMap.open(config.state_dir, identity, live_mirror=True)
        except BaseException:
            os.close(fd)
            raise
        self._limits = planner.FetchLimits.compute(
            self.map.chunk_shift,
            demand_fetch_bytes=config.demand_fetch_bytes,
            drain_request_bytes=config.drain_request_bytes,
            block_status_window_bytes=config.block_status_window_bytes,
            drain_requests_in_flight=config.drain_requests_in_flight,
            drain_requests_during_faults=config.drain_requests_during_faults,
            fault_quiet_seconds=config.fault_quiet_seconds,
        )
        self._commit_lock = threading.Lock()
        try:
            release_fence = release_fence_for(
                platform.machine(), ctypes.util.find_library("atomic")
            )
        except BaseException:
            self.map.close()
            os.close(fd)
            raise
        self._disk = LocalDisk(fd, self.size, data_observer, release_fence)
        self._frozen = not config.wait_for_source or source_gate.is_source_frozen(config.state_dir)
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._stopped = False
        self._cancel_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._in_flight: dict[int, FetchJob] = {}
        self._flight_lock = threading.Lock()  # `_in_flight`, `_thread_jobs_in_flight`, byte counts
        self._thread_jobs_in_flight = 0
        self._blocking_address: NBDAddress | None = None
        self._blocking_export = ""
        if config.blocking_misses and source_opener is None:
            try:
                address = parse_nbd_uri(config.source_uri)
            except ValueError:
                address = None
            if address is not None and not address.tls:
                self._blocking_address = address
                self._blocking_export = (
                    address.export_name if config.export_name is None else config.export_name
                )
        self._blocking_sources: dict[int, BlockingSource] = {}
        self._blocking_sources_lock = threading.Lock()
        self._blocking_closed = False
        self._blocking_retry_at = 0.0
        self.blocking_misses = 0  # misses served on a worker thread (statistics for tests)
        self._demand_jobs_in_flight = 0
        self._drain_jobs_in_flight = 0
        self._last_fault_at = -1e9
        self._last_miss_end: int | None = None  # chunk after the last guest miss
        self._sequential_misses = False  # the last miss started where the one before ended
        self._drain_hint: int | None = None
        self._failure: str | None = None
        # statistics (ints updated under the GIL from the trio thread; see statistics())
        self._started_at = time.time()
        self.transferred_bytes = 0
        self.demand_bytes = 0
        self.drain_bytes = 0
        self.demand_fetches = 0
        self.passthrough_reads = 0
        self.hole_bytes_skipped = 0
        self.discarded_fetch_bytes = 0
        self.faults = 0
        self._fault_latencies: deque[float] = deque(maxlen=2048)
        self._progress_samples: deque[tuple[float, int, int]] = deque(maxlen=64)
        self._links: list[SourceLink] = []
        self._links_ever: list[SourceLink] = []
        self._demand_link: SourceLink | None = None
        self._drain_link: SourceLink | None = None
        self._frozen_event: trio.Event | None = None
        self._complete_event: trio.Event | None = None
        self._job_finished: trio.Event | None = None
        self._bucket: TokenBucket | None = None

    # ===== lifecycle =============================================================================

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
        if self._stopped:
            return
        self._stopped = True
        self._close_blocking_sources()
        if self._thread is not None and self._thread.is_alive() and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel_main, trio_token=self._token)
            self._thread.join(timeout)
        try:
            try:
                self._make_durable(compact=True)
            except DurabilityError:
                pass  # failed before or now: nothing is persisted any more (the status says why)
            finally:
                try:
                    self._write_status()
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
            self._failure = self._failure or "engine loop crashed"
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._frozen_event = trio.Event()
        self._complete_event = trio.Event()
        self._job_finished = trio.Event()
        if self.config.bandwidth:
            self._bucket = TokenBucket(
                self.config.bandwidth,
                capacity=max(self.config.bandwidth // 4, self.config.drain_request_bytes),
            )
        if self._frozen:
            self._frozen_event.set()
        if self.map.is_complete:
            self._complete_event.set()
        with trio.CancelScope() as self._cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._status_task)
                nursery.start_soon(self._sync_task)
                if not self.map.is_complete:
                    await nursery.start(self._source_task)
                self._started.set()

    async def _source_task(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Everything that needs the source (links, fetch jobs, drain), torn down at completion."""
        assert self._complete_event is not None and self._frozen_event is not None
        timeouts = {
            "request_timeout": self.config.request_timeout,
            "connect_timeout": self.config.request_timeout,
        }
        self._demand_link = SourceLink("demand", self._opener, self.size, **timeouts)
        self._drain_link = SourceLink("drain", self._opener, self.size, **timeouts)
        self._links = [self._demand_link, self._drain_link]
        self._links_ever = list(self._links)  # (`_links` empties at completion)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for link in self._links:
                await nursery.start(link.run)
            task_status.started()
            if not self._frozen:
                nursery.start_soon(self._gate_task)
            if self.config.drain:
                nursery.start_soon(self._drain_task)
            await self._complete_event.wait()
            nursery.cancel_scope.cancel()
        self._nursery = None
        # complete: every chunk is present; the connections are closed by now
        self._links = []
        await trio.to_thread.run_sync(self._close_blocking_sources)
        try:
            await trio.to_thread.run_sync(self._make_durable_compact)
        except DurabilityError:
            pass  # the engine is failed (logged, in the status)
        except OSError as exc:  # a write error: the changes stay pending, the sync task retries
            log.error("postcopy: cannot compact the block map: %s", exc)
        log.info("postcopy: complete, source closed")

    def _make_durable_compact(self) -> None:
        self._make_durable(compact=True)

    def _make_durable(self, *, compact: bool = False) -> None:
        """`BlockMap.make_durable` with the data file's sync; a failed sync fails the engine."""
        try:
            self.map.make_durable(self._disk.sync, compact=compact)
        except DurabilityError as exc:
            self._fail(exc.strerror or "a sync failed")
            raise

    def _refuse_if_failed(self) -> None:
        """After a failed sync the local file cannot be trusted (what it reads back since the
        last good sync may be stale) and nothing written can become durable: refuse (EIO)."""
        failure = self.map.durability_failure
        if failure is not None:
            raise EngineIOError(errno.EIO, failure)

    # ===== calls from nbdkit's worker threads ====================================================

    def _call_trio(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._token is None or self._stopped:
            raise EngineIOError(errno.ESHUTDOWN, "engine not running")
        try:
            return trio.from_thread.run(async_fn, *args, trio_token=self._token)
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
            started = time.monotonic()
            self._note_miss(first, end)
            served, notify_trio = self._blocking_miss(first, end)
            if served:
                try:
                    self._disk.read_into(buf, offset)
                finally:
                    # only now: the trio thread waking up would contend for the GIL meanwhile
                    if notify_trio is not None:
                        notify_trio()
                    self._fault_latencies.append(time.monotonic() - started)
                    self.faults += 1
                return
            if notify_trio is not None:
                notify_trio()
            waited = time.monotonic() - started
            filled = self._call_trio(self._prepare_read, buf, offset, first, end, waited)
            self._fault_latencies.append(time.monotonic() - started)
            self.faults += 1
            if filled:
                return
        self._disk.read_into(buf, offset)

    def _note_miss(self, first: int, end: int) -> None:
        """Is the guest reading missing data sequentially?  (Then the drain's read-ahead
        after the miss goes on during the miss burst; see `planner.drain_yield_until`.)"""
        self._sequential_misses = planner.is_sequential_miss(
            self._last_miss_end, first, self._limits.request_chunks
        )
        self._last_miss_end = end

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
            with self._commit_lock:
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
        with self._commit_lock:
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
            start_byte, stop_byte = self._chunk_span(first, end)
            with self._commit_lock:
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
        if not self.map.all_present(first, end) and self._frozen:
            self._call_trio(self._ensure_present, first, end, True)

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
            self._call_trio(self._ensure_present_frozen, chunk, chunk + 1)

    def _partial_edges(self, offset: int, length: int) -> list[int]:
        """The MISSING chunks that `[offset, offset+length)` covers only in part."""
        edges = planner.partial_edge_chunks(offset, length, self.map.chunk_size, self.size)
        return [chunk for chunk in edges if not self.map.is_present(chunk)]

    # ===== the trio side: reads, fetches =========================================================

    async def _prepare_read(
        self, buf: memoryview | bytearray, offset: int, first: int, end: int, waited: float = 0.0
    ) -> bool:
        """Make the read servable.  Returns True when it filled `buf` itself (pass-through).
        `waited`: seconds the read already spent on a failed blocking attempt (counted against
        the unreachable window)."""
        if not self._frozen and source_gate.is_source_frozen(self.config.state_dir):
            self._open_gate()
        if not self._frozen:
            await self._read_passthrough(buf, offset)
            return True
        self._drain_hint = end
        await self._ensure_present(first, end, True, waited)
        return False

    async def _ensure_present_frozen(self, first: int, end: int) -> None:
        """Fetch for a read-modify-write: waits (bounded) for the gate first."""
        assert self._frozen_event is not None
        if not self._frozen and source_gate.is_source_frozen(self.config.state_dir):
            self._open_gate()
        with trio.move_on_after(self.config.unreachable_timeout):
            await self._frozen_event.wait()
        if not self._frozen:
            raise EngineIOError(errno.EIO, "partial write to a missing chunk before source-frozen")
        await self._ensure_present(first, end, True)

    async def _read_passthrough(self, buf: memoryview | bytearray, offset: int) -> None:
        """Before the source is frozen: missing chunks come from the source, nothing is kept."""
        view = memoryview(buf).cast("B")
        link = self._demand_link
        if link is None:
            raise EngineIOError(errno.EIO, "no source")
        pieces = planner.read_pieces(
            offset, len(view), self.map.chunk_shift, self.size, self.map.run_from
        )
        for start_byte, stop_byte, whole in pieces:
            part = view[start_byte - offset:stop_byte - offset]
            if whole is None:
                self._disk.read_into(part, start_byte)
            else:
                run_start, run_stop = whole
                whole_buffer = bytearray(run_stop - run_start)
                await self._source_read(link, memoryview(whole_buffer), run_start)
                part[:] = memoryview(whole_buffer)[start_byte - run_start:stop_byte - run_start]
                with self._flight_lock:
                    self.passthrough_reads += 1
                    self.transferred_bytes += len(whole_buffer)

    async def _source_read(self, link: SourceLink, part: memoryview, offset: int) -> None:
        """Read from the source, retrying over reconnects, within the unreachable window."""
        with trio.move_on_at(self._guest_deadline(link)):
            try:
                await link.pread_into(part, offset)
            except SourceMismatch as exc:
                raise EngineIOError(errno.EIO, str(exc)) from None
            except CommandError as exc:
                raise EngineIOError(exc.errno, str(exc)) from None
            return
        raise EngineIOError(errno.EIO, "source unreachable")

    def _guest_deadline(self, link: SourceLink | None, waited: float = 0.0) -> float:
        """When a guest request that needs the source gives up (trio clock), see
        `planner.guest_deadline`; a link that is down is told to retry at once."""
        down: float | None = None
        if link is not None and link.down_since is not None:
            link.retry_now()
            down = link.seconds_down()
        return planner.guest_deadline(
            trio.current_time(), self.config.unreachable_timeout, waited, down
        )

    async def _ensure_present(
        self, first: int, end: int, demand: bool, waited: float = 0.0
    ) -> None:
        """Wait until chunks `[first, end)` are PRESENT, starting fetches for uncovered ones."""
        if self._failure is not None:
            raise EngineIOError(errno.EIO, self._failure)
        link = self._demand_link if demand else self._drain_link
        with trio.move_on_at(self._guest_deadline(link, waited)) as timeout_scope:
            while not self.map.all_present(first, end):
                jobs = self._start_fetches(first, end, demand)
                for job in jobs:
                    await job.done.wait()
                for job in jobs:
                    if job.error is not None:
                        error = job.error
                        if isinstance(error, OSError):
                            raise EngineIOError(error.errno or errno.EIO, str(error))
                        raise EngineIOError(errno.EIO, str(error))
        if timeout_scope.cancelled_caught:
            raise EngineIOError(errno.EIO, "source unreachable: missing data not fetched in time")

    def _start_fetches(self, first: int, end: int, demand: bool) -> list[FetchJob]:
        """Jobs covering every missing chunk of `[first, end)`: existing ones, or new ones."""
        assert self._nursery is not None
        jobs: list[FetchJob] = []
        with self._flight_lock:
            missing = self.map.missing_ranges(first, end)
            plan = planner.plan_fetches(missing, self._in_flight, self._limits.demand_chunks)
            for step in plan:
                jobs.append(step if isinstance(step, FetchJob) else self._new_job(*step, demand))
        return jobs

    def _new_job(self, first: int, end: int, demand: bool) -> FetchJob:
        """Register and start a fetch of chunks `[first, end)` (hold `_flight_lock`)."""
        assert self._nursery is not None
        job = FetchJob(first, end, demand)
        for chunk in range(first, end):
            self._in_flight[chunk] = job
        if demand:
            if self._bucket is not None:
                self._bucket.take(self._job_bytes(first, end))  # counted, never waited for
            self.demand_fetches += 1
            self._demand_jobs_in_flight += 1
            self._last_fault_at = trio.current_time()
        else:
            self._drain_jobs_in_flight += 1
        self._nursery.start_soon(self._run_fetch, job)
        return job

    def _job_bytes(self, first: int, end: int) -> int:
        start, stop = self._chunk_span(first, end)
        return stop - start

    def _chunk_span(self, first: int, end: int) -> tuple[int, int]:
        return planner.chunk_span(first, end, self.map.chunk_shift, self.size)

    async def _run_fetch(self, job: FetchJob) -> None:
        link = self._demand_link if job.demand else self._drain_link
        start = job.first << self.map.chunk_shift
        stop = min(job.end << self.map.chunk_shift, self.size)
        buffer = bytearray(stop - start)
        try:
            assert link is not None
            try:
                # re-sent on every new connection until it succeeds (a stalled request is
                # dropped at its deadline): a fetch is never lost across a reconnect
                await link.pread_into(buffer, start)
            except SourceMismatch as exc:
                self._fail(str(exc))
                raise EngineIOError(errno.EIO, str(exc)) from None
            except CommandError as exc:
                raise EngineIOError(exc.errno, f"source: {exc}") from None
            self._count_fetched(len(buffer), job.demand)
            if job.demand:
                self._commit_fetched(job.first, job.end, buffer, start)
            else:
                # a drain commit writes MiBs: off the trio thread, so that guest misses
                # arriving meanwhile are not held up behind it
                await trio.to_thread.run_sync(
                    self._commit_fetched, job.first, job.end, buffer, start
                )
            self._check_complete()
        except Exception as exc:
            job.error = exc
        finally:
            with self._flight_lock:
                for chunk in range(job.first, job.end):
                    if self._in_flight.get(chunk) is job:
                        del self._in_flight[chunk]
            if job.demand:
                self._demand_jobs_in_flight -= 1
            else:
                self._drain_jobs_in_flight -= 1
            job.done.set()
            self._signal_job_finished()

    def _count_fetched(self, length: int, demand: bool) -> None:
        with self._flight_lock:
            self.transferred_bytes += length
            if demand:
                self.demand_bytes += length
            else:
                self.drain_bytes += length

    # ===== guest misses served on the worker thread ==============================================

    def _blocking_miss(self, first: int, end: int) -> tuple[bool, Callable[[], None] | None]:
        """Serve a miss on the calling worker thread.  (True, notify): chunks `[first, end)` are
        PRESENT now.  (False, notify): take the trio path (nothing was left half done).  The
        caller must call `notify` (when not None) soon, and before waiting for the trio side: it
        wakes the misses that shared this fetch and the drain."""
        link = self._demand_link
        if (
            self._blocking_address is None
            or not self._frozen
            or self._failure is not None
            or self._stopped
            or self._blocking_closed
            or self._token is None
            or link is None
            or time.monotonic() < self._blocking_retry_at
        ):
            return False, None
        if link.down_since is not None and (
            link.connects > 0 or link.seconds_down() > BLOCKING_RETRY_SECONDS
        ):
            return False, None
        missing = list(self.map.missing_ranges(first, end))
        if not missing:
            return True, None
        run = planner.blocking_fetch_run(
            missing, self.map.chunk_shift, self._limits.blocking_max_bytes
        )
        if run is None:
            return False, None
        run_first, run_end = run
        with self._flight_lock:
            if any(chunk in self._in_flight for chunk in range(run_first, run_end)):
                return False, None  # a fetch is on its way: the trio path waits for it
            job = FetchJob(run_first, run_end, True)
            for chunk in range(run_first, run_end):
                self._in_flight[chunk] = job
            self._thread_jobs_in_flight += 1
        self._drain_hint = end
        start, stop = self._chunk_span(run_first, run_end)
        length = stop - start
        token = self._token
        served = False

        def notify_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._blocking_job_finished, job, length if served else 0)

        failed = True
        try:
            buffer = self._blocking_read(length, start)
            if buffer is not None:
                self._count_fetched(length, True)
                # a local write error here reaches the guest (as on the trio path)
                self._commit_fetched(run_first, run_end, buffer, start)
                served = True
            failed = False
        finally:
            with self._flight_lock:
                for chunk in range(run_first, run_end):
                    if self._in_flight.get(chunk) is job:
                        del self._in_flight[chunk]
                self._thread_jobs_in_flight -= 1
                if served:
                    self.demand_fetches += 1
                    self.blocking_misses += 1
            if failed:
                notify_trio()  # the error goes to the guest: wake the sharers now
        return served, notify_trio

    def _blocking_read(self, length: int, offset: int) -> bytearray | None:
        """Read from the source over this thread's blocking connection; None on any failure
        (the connection is dropped and the trio path is used for a while)."""
        try:
            source = self._blocking_source()
            if source is None:
                return None
            with source.lock:
                return None if source.closed else source.pread(length, offset)
        except Exception as exc:
            log.info("postcopy: blocking source read failed (%s); using the trio path", exc)
            self._blocking_retry_at = time.monotonic() + BLOCKING_RETRY_SECONDS
            self._drop_blocking_source()
            return None

    def _blocking_job_finished(self, job: FetchJob, fetched: int) -> None:
        """(trio thread) Wake the misses that shared a worker thread's fetch, and the drain."""
        job.done.set()
        self._last_fault_at = trio.current_time()
        if fetched and self._bucket is not None:
            self._bucket.take(fetched)  # counted, never waited for
        self._check_complete()
        self._signal_job_finished()

    def _blocking_source(self) -> BlockingSource | None:
        """This worker thread's blocking connection (connected on first use), or None."""
        key = threading.get_ident()
        with self._blocking_sources_lock:
            source = self._blocking_sources.get(key)
            if source is not None or len(self._blocking_sources) >= MAX_BLOCKING_SOURCES:
                return source
        assert self._blocking_address is not None
        timeout = min(self.config.request_timeout, self.config.unreachable_timeout)
        source = BlockingSource(
            self._blocking_address,
            self._blocking_export,
            self.size,
            connect_timeout=timeout,
            request_timeout=timeout,
        )
        with self._blocking_sources_lock:
            if self._blocking_closed:
                source.close()
                return None
            self._blocking_sources[key] = source
        return source

    def _drop_blocking_source(self) -> None:
        with self._blocking_sources_lock:
            source = self._blocking_sources.pop(threading.get_ident(), None)
        if source is not None:
            source.close()

    def _close_blocking_sources(self) -> None:
        """Close every blocking connection (at completion and stop; waits for reads in use)."""
        with self._blocking_sources_lock:
            self._blocking_closed = True
            sources = list(self._blocking_sources.values())
            self._blocking_sources.clear()
        for source in sources:
            with source.lock:
                source.close()

    def _commit_fetched(self, first: int, end: int, buffer: bytearray, start: int) -> None:
        """Write the fetched chunks that are still MISSING; a guest write that came first wins."""
        shift = self.map.chunk_shift
        view = memoryview(buffer)
        with self._commit_lock:
            committed = 0
            for run_first, run_end in self.map.missing_ranges(first, end):
                run_start = run_first << shift
                run_stop = min(run_end << shift, self.size)
                self._disk.write(view[run_start - start:run_stop - start], run_start)
                self._disk.mark_present(self.map, run_first, run_end, PRESENT)
                committed += run_stop - run_start
            self.discarded_fetch_bytes += len(buffer) - committed

    def _check_complete(self) -> None:
        if self.map.is_complete and self._complete_event is not None:
            self._complete_event.set()

    def _signal_job_finished(self) -> None:
        if self._job_finished is not None:
            self._job_finished.set()
            self._job_finished = trio.Event()

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = message
            log.error("postcopy: %s", message)

    def _open_gate(self) -> None:
        self._frozen = True
        if self._frozen_event is not None:
            self._frozen_event.set()

    async def _gate_task(self) -> None:
        while not self._frozen:
            if source_gate.is_source_frozen(self.config.state_dir):
                self._open_gate()
                return
            await trio.sleep(self.config.gate_poll_interval)

    # ===== the drain =============================================================================

    async def _drain_task(self) -> None:
        assert self._frozen_event is not None and self._drain_link is not None
        await self._frozen_event.wait()
        limits = self._limits
        walk = planner.DrainWalk(self.map.chunk_count, limits.window_chunks)
        slots = trio.Semaphore(limits.drain_requests)
        async with trio.open_nursery() as nursery:
            while not self.map.is_complete and self._failure is None:
                await slots.acquire()
                await self._wait_demand_quiet()
                if self._bucket is not None:
                    await self._bucket.wait_for_credit()  # the bandwidth cap
                if self._drain_hint is not None:
                    walk.cursor, self._drain_hint = self._drain_hint, None
                picked = None
                walk.start_pass()
                while picked is None:
                    window = walk.window()
                    if window is None:
                        break
                    window_first, window_end = window
                    if walk.first_look(window_first) and self.map.next_missing_range(
                        window_first, window_end
                    ):
                        await self._skip_source_holes(window_first, window_end)
                    picked = planner.pick_drain_range(
                        self.map.missing_ranges(walk.cursor, window_end),
                        self._in_flight,
                        limits.request_chunks,
                    )
                    if picked is None:
                        walk.cursor = window_end
                if picked is None:
                    slots.release()
                    if self.map.is_complete:
                        break
                    assert self._job_finished is not None
                    with trio.move_on_after(0.2):
                        await self._job_finished.wait()
                    walk.cursor = 0
                    continue
                first, end = picked
                walk.cursor = end
                with self._flight_lock:  # a worker thread may have taken some chunks since
                    first, stop = planner.first_free_run(first, end, self._in_flight)
                    job = self._new_job(first, stop, False) if first < stop else None
                if job is None:
                    slots.release()
                    continue
                if self._bucket is not None:
                    self._bucket.take(self._job_bytes(first, stop))
                nursery.start_soon(self._release_when_done, job, slots)
        self._check_complete()

    async def _wait_demand_quiet(self) -> None:
        """Guest misses have priority: yield while `planner.drain_yield_until` says so, for at
        most `DRAIN_YIELD_MAX_SECONDS` (never starve the drain completely)."""
        deadline = trio.current_time() + planner.DRAIN_YIELD_MAX_SECONDS
        while trio.current_time() < deadline:
            until = planner.drain_yield_until(
                trio.current_time(),
                deadline,
                limits=self._limits,
                drain_jobs=self._drain_jobs_in_flight,
                demand_jobs=self._demand_jobs_in_flight + self._thread_jobs_in_flight,
                sequential_misses=self._sequential_misses,
                last_fault_at=self._last_fault_at,
            )
            if until is None:
                return
            assert self._job_finished is not None
            with trio.move_on_at(until):
                await self._job_finished.wait()

    async def _release_when_done(self, job: FetchJob, slots: trio.Semaphore) -> None:
        try:
            await job.done.wait()
            if job.error is not None:
                log.warning("postcopy: drain fetch failed: %s", job.error)
                await trio.sleep(0.5)  # do not spin on a source that refuses a range
        finally:
            slots.release()

    async def _skip_source_holes(self, first: int, end: int) -> None:
        """Ask the source's block status for chunks `[first, end)`; whole chunks that read as
        zeros become PRESENT holes without any transfer (punched locally in case old data lies
        there).  Only the ZERO flag says that (NBD `base:allocation`): HOLE alone means
        "unallocated", whose bytes may be anything (a backing file's, a plugin's), so a HOLE-only
        extent is data and is copied."""
        link = self._drain_link
        assert link is not None
        start, stop = self._chunk_span(first, end)
        try:
            extents = await link.extents(start, stop - start)
        except SourceMismatch as exc:
            self._fail(str(exc))
            return
        except CommandError as exc:
            log.info("postcopy: source block status failed (%s); copying everything", exc)
            return
        for extent in extents:
            if extent.flags & EXTENT_ZERO:
                self._mark_source_hole(extent.offset, extent.offset + extent.length)

    def _mark_source_hole(self, hole_start: int, hole_end: int) -> None:
        first, end = planner.whole_chunks_within(
            hole_start, hole_end, self.map.chunk_size, self.size
        )
        if first >= end:
            return
        with self._commit_lock:
            for run_first, run_end in list(self.map.missing_ranges(first, end)):
                # a fetch in flight commits its own chunks
                parts = planner.split_around_in_flight(run_first, run_end, self._in_flight)
                for part_first, part_end in parts:
                    part_start, part_stop = self._chunk_span(part_first, part_end)
                    try:
                        self._disk.punch_hole(part_start, part_stop - part_start)
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                            log.warning("postcopy: cannot punch a source hole: %s", exc)
                            continue  # stays missing: the drain copies its zeros instead
                        self._disk.zero_range(part_start, part_stop - part_start)
                    self._disk.mark_present(self.map, part_first, part_end, PRESENT | SOURCE_HOLE)
                    self.hole_bytes_skipped += part_stop - part_start
        self._check_complete()

    # ===== durability and status =================================================================

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

    async def _status_task(self) -> None:
        last_record: dict[str, Any] | None = None
        last_written = 0.0
        while True:
            self._check_complete()  # guest writes may have made the last chunks present
            record = self.statistics()
            changed = last_record is None or {
                k: v for k, v in record.items() if k != "updated_at"
            } != {k: v for k, v in last_record.items() if k != "updated_at"}
            now = time.monotonic()
            if changed or now - last_written > 5.0:
                try:
                    await trio.to_thread.run_sync(
                        status.write_status, self.config.state_dir, record
                    )
                except OSError as exc:  # retried at the next tick
                    log.warning("postcopy: cannot write the status record: %s", exc)
                else:
                    last_record, last_written = record, now
            await trio.sleep(self.config.status_interval)

    def _write_status(self) -> None:
        status.write_status(self.config.state_dir, self.statistics())

    def state(self) -> str:
        if self._failure is not None or self.map.durability_failure is not None:
            return "failed"
        if self.map.is_complete:
            return "complete"
        if not self._frozen:
            return "waiting-for-source"
        if any(link.fatal_error for link in self._links):
            return "failed"
        if any(link.seconds_down() >= 0.5 for link in self._links):
            return "source-unreachable"  # (not during the first connection's set-up)
        return "fetching"

    def statistics(self) -> dict[str, Any]:
        """The status record (see `postcopy.destination.status` for the fields)."""
        now = time.monotonic()
        present = self.map.present_bytes
        self._progress_samples.append((now, present, self.transferred_bytes))
        oldest = self._progress_samples[0]
        for sample in self._progress_samples:
            if now - sample[0] <= 5.0:
                oldest = sample
                break
        elapsed = now - oldest[0]
        present_rate = (present - oldest[1]) / elapsed if elapsed > 0.2 else 0.0
        transfer_rate = (self.transferred_bytes - oldest[2]) / elapsed if elapsed > 0.2 else 0.0
        missing = self.size - present
        if missing == 0:
            eta: float | None = 0.0
        elif present_rate > 0:
            eta = round(missing / present_rate, 1)
        else:
            eta = None
        latencies = sorted(self._fault_latencies)
        p50 = percentile(latencies, 0.5)
        p99 = percentile(latencies, 0.99)
        down = max((link.seconds_down() for link in self._links), default=0.0)
        errors = [
            link.fatal_error or link.last_error for link in self._links if not link.is_connected
        ]
        return {
            "state": self.state(),
            "size_bytes": self.size,
            "present_bytes": present,
            "missing_bytes": missing,
            "transferred_bytes": self.transferred_bytes,
            "demand_fetches": self.demand_fetches,
            "demand_bytes": self.demand_bytes,
            "drain_bytes": self.drain_bytes,
            "hole_bytes_skipped": self.hole_bytes_skipped,
            "discarded_fetch_bytes": self.discarded_fetch_bytes,
            "passthrough_reads": self.passthrough_reads,
            "faults": self.faults,
            "fault_latency_p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "fault_latency_p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "transfer_rate_bytes_per_second": round(transfer_rate),
            "present_rate_bytes_per_second": round(present_rate),
            "eta_seconds": eta,
            "reconnects": sum(max(0, link.connects - 1) for link in self._links_ever),
            "stalls": sum(link.stalls for link in self._links_ever),
            "bandwidth_bytes_per_second": self.config.bandwidth,
            "source_down_seconds": round(down, 3),
            "unreachable_timeout_seconds": self.config.unreachable_timeout,
            "error": (
                self._failure
                or self.map.durability_failure
                or (errors[0] if errors and down > 0 else None)
            ),
            "chunk_size": self.map.chunk_size,
            "guest_written_chunks": self.map.guest_written_count,
            "source": self.config.source_uri,
            "dest": str(self.config.dest_path),
            "pid": os.getpid(),
            "started_at": self._started_at,
            "updated_at": time.time(),
        }


"""Guest misses served on nbdkit's worker thread itself, over a blocking source connection.

A miss whose chunks no fetch covers yet is served on the worker thread that got it: it claims
the whole run in the in-flight table (`InFlightTable.claim_whole_run`), reads the chunks over a
blocking connection (`postcopy.destination.links.BlockingSource`, libnbd) checked out of a pool
that all worker threads share (at most `MAX_BLOCKING_SOURCES`, connected on first need: nbdkit
runs up to 128 threads per connection, and a connection per thread would leave most misses on
the slow path), commits them with the fetcher's commit rule, and tells the trio side
(`run_sync_soon`, no waiting) that the job is done, so misses on the same chunks that went to the
trio side meanwhile share it.  That saves the worker -> trio -> worker hand-off (two cross-thread
wake-ups).

Anything else takes the trio path (`Fetcher.prepare_read`), which owns reconnects, stall
deadlines and the unreachable window: a chunk already in flight, a long or split read
(`planner.blocking_fetch_run`), the gate closed, a TLS or custom source, a link that is down, or
any error of the blocking connection (after which misses take the trio path for
`BLOCKING_RETRY_SECONDS`; a failed attempt only counts against the unreachable window).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import trio

from nbdsrv.uri import NBDAddress, parse_nbd_uri
from postcopy.destination import planner
from postcopy.destination.fetcher import Fetcher
from postcopy.destination.inflight import FetchJob
from postcopy.destination.links import BlockingSource
from postcopy.destination.shared import SharedState

log = logging.getLogger(__name__)

# after a blocking connection failed, misses take the trio path for this long
BLOCKING_RETRY_SECONDS = 1.0
# at most this many blocking source connections (one per miss served on a worker thread at once)
MAX_BLOCKING_SOURCES = 16


def blocking_address(
    source_uri: str, export_name: str | None
) -> tuple[NBDAddress, str] | None:
    """Where worker threads connect for blocking misses, and the export: plain nbd:// and
    nbd+unix:// sources only (None for TLS and for anything that does not parse)."""
    try:
        address = parse_nbd_uri(source_uri)
    except ValueError:
        return None
    if address.tls:
        return None
    return address, address.export_name if export_name is None else export_name


class BlockingMisses:
    """The worker-thread miss path of one engine, and its pool of blocking connections."""

    def __init__(
        self, shared: SharedState, fetcher: Fetcher, source: tuple[NBDAddress, str] | None
    ) -> None:
        self._shared = shared
        self._fetcher = fetcher
        self._source_address = source  # None: every miss takes the trio path
        # every open connection, and those not checked out by a worker thread; both under
        # `_sources_lock`; `_opening` counts connections being made (outside the lock), so that
        # len(_sources) + _opening <= MAX_BLOCKING_SOURCES; a connection is used only under its
        # own `lock` (close() waits for a read in use)
        self._sources: set[BlockingSource] = set()
        self._idle: list[BlockingSource] = []
        self._opening = 0
        self._sources_lock = threading.Lock()
        self._closed = False  # close() began: no new connections; False -> True, under the lock
        self._retry_at = 0.0  # time.monotonic() before which misses take the trio path

    def serve(self, first: int, end: int) -> tuple[bool, Callable[[], None] | None]:
        """(worker thread) Serve a miss on the calling thread.  (True, notify): chunks
        `[first, end)` are PRESENT now.  (False, notify): take the trio path (nothing was left
        half done).  The caller must call `notify` (when not None) soon, and before waiting for
        the trio side: it wakes the misses that shared this fetch and the drain."""
        shared = self._shared
        link = shared.demand_link
        if (
            self._source_address is None
            or not shared.frozen
            or shared.failure is not None
            or shared.stopped
            or self._closed
            or shared.token is None
            or link is None
            or time.monotonic() < self._retry_at
        ):
            return False, None
        if link.down_since is not None and (
            link.connects > 0 or link.seconds_down() > BLOCKING_RETRY_SECONDS
        ):
            return False, None
        missing = list(shared.map.missing_ranges(first, end))
        if not missing:
            return True, None
        run = planner.blocking_fetch_run(
            missing, shared.map.chunk_shift, shared.limits.blocking_max_bytes
        )
        if run is None:
            return False, None
        job = shared.in_flight.claim_whole_run(*run)
        if job is None:
            return False, None  # a fetch is on its way: the trio path waits for it
        shared.drain_hint = end
        start, stop = shared.chunk_span(job.first, job.end)
        length = stop - start
        token = shared.token
        served = False

        def notify_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._job_finished, job, length if served else 0)

        failed = True
        try:
            buffer = self._read(length, start)
            if buffer is not None:
                shared.in_flight.count_fetched(length, True)
                # a local write error here reaches the guest (as on the trio path)
                self._fetcher.commit_fetched(job.first, job.end, buffer, start)
                served = True
            failed = False
        finally:
            shared.in_flight.release(job, served=served)
            if failed:
                notify_trio()  # the error goes to the guest: wake the sharers now
        return served, notify_trio

    def _read(self, length: int, offset: int) -> bytearray | None:
        """Read from the source over a pooled blocking connection; None when none is free or on
        any failure (then the connection is dropped and the trio path is used for a while)."""
        source = None
        try:
            source = self._check_out()
            if source is None:
                return None
            with source.lock:
                data = None if source.closed else source.pread(length, offset)
            self._check_in(source)
            return data
        except Exception as exc:
            log.info("postcopy: blocking source read failed (%s); using the trio path", exc)
            self._retry_at = time.monotonic() + BLOCKING_RETRY_SECONDS
            if source is not None:
                self._discard(source)
            return None

    def _job_finished(self, job: FetchJob, fetched: int) -> None:
        """(trio thread) Wake the misses that shared a worker thread's fetch, and the drain."""
        shared = self._shared
        job.done.set()
        shared.last_fault_at = trio.current_time()
        if fetched and shared.bucket is not None:
            shared.bucket.take(fetched)  # counted, never waited for
        shared.check_complete()
        shared.signal_job_finished()

    # #### the connections #########################################################################

    def _check_out(self) -> BlockingSource | None:
        """An idle connection of the pool, a new one while the pool is not full, else None."""
        with self._sources_lock:
            if self._closed:
                return None
            if self._idle:
                return self._idle.pop()
            if len(self._sources) + self._opening >= MAX_BLOCKING_SOURCES:
                return None
            self._opening += 1
        try:
            assert self._source_address is not None
            address, export = self._source_address
            config = self._shared.config
            timeout = min(config.request_timeout, config.unreachable_timeout)
            source = BlockingSource(
                address,
                export,
                self._shared.size,
                connect_timeout=timeout,
                request_timeout=timeout,
            )
        finally:
            with self._sources_lock:
                self._opening -= 1
        with self._sources_lock:
            if not self._closed:
                self._sources.add(source)
                return source
        source.close()
        return None

    def _check_in(self, source: BlockingSource) -> None:
        """Give a connection back to the pool (close() may have closed it meanwhile)."""
        with self._sources_lock:
            if not self._closed and not source.closed:
                self._idle.append(source)

    def _discard(self, source: BlockingSource) -> None:
        with self._sources_lock:
            self._sources.discard(source)
        with source.lock:
            source.close()

    def close(self) -> None:
        """Close every blocking connection (at completion and stop; waits for reads in use)."""
        with self._sources_lock:
            self._closed = True
            sources = list(self._sources)
            self._sources.clear()
            self._idle.clear()
        for source in sources:
            with source.lock:
                source.close()

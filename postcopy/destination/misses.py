"""Guest misses served on nbdkit's worker thread itself, over a blocking source connection.

A miss whose chunks no fetch covers yet is served on the worker thread that got it: it claims
the whole run in the in-flight table (`InFlightTable.claim_whole_run`), reads the chunks over that
thread's own blocking connection (`postcopy.destination.links.BlockingSource`, libnbd, keyed by
`threading.get_ident()`, at most `MAX_BLOCKING_SOURCES`), commits them with the fetcher's commit
rule, and tells the trio side (`run_sync_soon`, no waiting) that the job is done, so misses on
the same chunks that went to the trio side meanwhile share it.  That saves the worker -> trio ->
worker hand-off (two cross-thread wake-ups).

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
# at most this many blocking source connections (one per nbdkit worker thread that missed)
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
        # thread id -> that worker thread's connection; under `_sources_lock`, and each
        # connection is used only under its own `lock` (close() waits for a read in use)
        self._sources: dict[int, BlockingSource] = {}
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
        """Read from the source over this thread's blocking connection; None on any failure
        (the connection is dropped and the trio path is used for a while)."""
        try:
            source = self._source()
            if source is None:
                return None
            with source.lock:
                return None if source.closed else source.pread(length, offset)
        except Exception as exc:
            log.info("postcopy: blocking source read failed (%s); using the trio path", exc)
            self._retry_at = time.monotonic() + BLOCKING_RETRY_SECONDS
            self._drop_source()
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

    def _source(self) -> BlockingSource | None:
        """This worker thread's blocking connection (connected on first use), or None."""
        key = threading.get_ident()
        with self._sources_lock:
            source = self._sources.get(key)
            if source is not None or len(self._sources) >= MAX_BLOCKING_SOURCES:
                return source
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
        with self._sources_lock:
            if self._closed:
                source.close()
                return None
            self._sources[key] = source
        return source

    def _drop_source(self) -> None:
        with self._sources_lock:
            source = self._sources.pop(threading.get_ident(), None)
        if source is not None:
            source.close()

    def close(self) -> None:
        """Close every blocking connection (at completion and stop; waits for reads in use)."""
        with self._sources_lock:
            self._closed = True
            sources = list(self._sources.values())
            self._sources.clear()
        for source in sources:
            with source.lock:
                source.close()

"""The drain: one trio task that copies everything still missing, in the background.

It waits for the gate (the source frozen), then walks the block map from a cursor
(`planner.DrainWalk`; after a guest miss the cursor jumps to the chunk after it, since guests read
sequentially more often than not).  The first time it looks at a block-status window it asks the
source's block status for it, so that holes become PRESENT holes without any transfer and the
local file stays sparse (`_skip_source_holes`).  Then it picks the next coalesced run of missing
chunks that no fetch holds (`planner.pick_drain_range`, up to `drain_request_bytes`), claims it
(`InFlightTable.claim_free_run`) and runs it as a fetch job on the drain link, with at most
`drain_requests_in_flight` requests going.

Guest misses come first: while one is in flight, and for `fault_quiet_seconds` after, the drain
keeps at most `drain_requests_during_faults` requests going (default 0: it yields completely,
but never for more than a second at a time; see `planner.drain_yield_until`).  With a bandwidth
cap the drain takes its bytes from the token bucket before each request.
"""

from __future__ import annotations

import errno
import logging

import trio

from nbdsrv.errors import CommandError
from postcopy.destination import planner
from postcopy.destination.blockmap import PRESENT, SOURCE_HOLE
from postcopy.destination.fetcher import Fetcher
from postcopy.destination.inflight import FetchJob
from postcopy.destination.links import SourceMismatch
from postcopy.destination.shared import SharedState

log = logging.getLogger(__name__)


class Drain:
    """The drain of one engine (runs on its trio thread)."""

    def __init__(self, shared: SharedState, fetcher: Fetcher) -> None:
        self._shared = shared
        self._fetcher = fetcher

    async def run(self) -> None:
        """Drain until every chunk is PRESENT (or the engine fails)."""
        shared = self._shared
        assert shared.frozen_event is not None and shared.drain_link is not None
        await shared.frozen_event.wait()
        block_map = shared.map
        limits = shared.limits
        walk = planner.DrainWalk(block_map.chunk_count, limits.window_chunks)
        slots = trio.Semaphore(limits.drain_requests)
        async with trio.open_nursery() as nursery:
            while not block_map.is_complete and shared.failure is None:
                await slots.acquire()
                await self._wait_demand_quiet()
                if shared.bucket is not None:
                    await shared.bucket.wait_for_credit()  # the bandwidth cap
                if shared.drain_hint is not None:
                    walk.cursor, shared.drain_hint = shared.drain_hint, None
                picked = None
                walk.start_pass()
                while picked is None:
                    window = walk.window()
                    if window is None:
                        break
                    window_first, window_end = window
                    if walk.first_look(window_first) and block_map.next_missing_range(
                        window_first, window_end
                    ):
                        await self._skip_source_holes(window_first, window_end)
                    picked = planner.pick_drain_range(
                        block_map.missing_ranges(walk.cursor, window_end),
                        shared.in_flight.jobs,
                        limits.request_chunks,
                    )
                    if picked is None:
                        walk.cursor = window_end
                if picked is None:
                    slots.release()
                    if block_map.is_complete:
                        break
                    assert shared.job_finished is not None
                    with trio.move_on_after(0.2):
                        await shared.job_finished.wait()
                    walk.cursor = 0
                    continue
                first, end = picked
                walk.cursor = end
                # a worker thread may have claimed some of its chunks since
                job = shared.in_flight.claim_free_run(first, end)
                if job is None:
                    slots.release()
                    continue
                self._fetcher.start(job)
                if shared.bucket is not None:
                    shared.bucket.take(self._fetcher.job_bytes(job))
                nursery.start_soon(self._release_when_done, job, slots)
        shared.check_complete()

    async def _wait_demand_quiet(self) -> None:
        """Guest misses have priority: yield while `planner.drain_yield_until` says so, for at
        most `DRAIN_YIELD_MAX_SECONDS` (never starve the drain completely)."""
        shared = self._shared
        table = shared.in_flight
        deadline = trio.current_time() + planner.DRAIN_YIELD_MAX_SECONDS
        while trio.current_time() < deadline:
            until = planner.drain_yield_until(
                trio.current_time(),
                deadline,
                limits=shared.limits,
                drain_jobs=table.drain_jobs,
                demand_jobs=table.demand_jobs + table.thread_jobs,
                sequential_misses=shared.sequential_misses,
                last_fault_at=shared.last_fault_at,
            )
            if until is None:
                return
            assert shared.job_finished is not None
            with trio.move_on_at(until):
                await shared.job_finished.wait()

    async def _release_when_done(self, job: FetchJob, slots: trio.Semaphore) -> None:
        try:
            await job.done.wait()
            if job.error is not None:
                log.warning("postcopy: drain fetch failed: %s", job.error)
                await trio.sleep(0.5)  # do not spin on a source that refuses a range
        finally:
            slots.release()

    # #### holes from the source's block status ####################################################

    async def _skip_source_holes(self, first: int, end: int) -> None:
        """Ask the source's block status for chunks `[first, end)`; whole chunks that read as
        zeros become PRESENT holes without any transfer (punched locally in case old data lies
        there).  Only the ZERO flag says that (NBD `base:allocation`): HOLE alone means
        "unallocated", whose bytes may be anything (a backing file's, a plugin's), so a HOLE-only
        extent is data and is copied."""
        shared = self._shared
        link = shared.drain_link
        assert link is not None
        start, stop = shared.chunk_span(first, end)
        try:
            extents = await link.extents(start, stop - start)
        except SourceMismatch as exc:
            shared.fail(str(exc))
            return
        except CommandError as exc:
            log.info("postcopy: source block status failed (%s); copying everything", exc)
            return
        for extent in extents:
            if extent.flags & planner.EXTENT_ZERO:
                self._mark_source_hole(extent.offset, extent.offset + extent.length)

    def _mark_source_hole(self, hole_start: int, hole_end: int) -> None:
        shared = self._shared
        block_map = shared.map
        first, end = planner.whole_chunks_within(
            hole_start, hole_end, block_map.chunk_size, shared.size
        )
        if first >= end:
            return
        with shared.commit_lock:
            for run_first, run_end in list(block_map.missing_ranges(first, end)):
                # a fetch in flight commits its own chunks (read without the table's lock:
                # a chunk claimed just after is committed only if still MISSING, and zeros
                # either way)
                parts = planner.split_around_in_flight(run_first, run_end, shared.in_flight.jobs)
                for part_first, part_end in parts:
                    part_start, part_stop = shared.chunk_span(part_first, part_end)
                    try:
                        shared.disk.punch_hole(part_start, part_stop - part_start)
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                            log.warning("postcopy: cannot punch a source hole: %s", exc)
                            continue  # stays missing: the drain copies its zeros instead
                        shared.disk.zero_range(part_start, part_stop - part_start)
                    shared.disk.mark_present(block_map, part_first, part_end, PRESENT | SOURCE_HOLE)
                    shared.counters.hole_bytes_skipped += part_stop - part_start
        shared.check_complete()

"""Fetching on the trio thread: guest misses that hop there, fetch jobs, and the commit rule.

A guest read whose chunks are missing comes here (`prepare_read`, via `trio.from_thread`) when
the worker thread did not serve it itself (`postcopy.destination.misses`).  Before the source is
frozen the read is passed through: read from the source into the guest's buffer, not stored, not
marked (`read_passthrough`).  After, `ensure_present` claims fetch jobs for the chunks no job
holds and shares the jobs in flight for the others (`InFlightTable.claim_for_read`), then waits
for all of them, at most the unreachable window (`planner.guest_deadline`).  A job runs as a task
(`_run_fetch`) on the *demand* link (guests) or the *drain* link; the link re-sends it on every
new connection until it succeeds, so a fetch is never lost across a reconnect.

The commit rule (`commit_fetched`, from any thread): under the commit lock, only the chunks of a
fetch that are still MISSING are written and marked PRESENT; a guest write that came first wins
and the fetched bytes of its chunks are discarded.  A drain commit (MiBs) runs in a worker thread
so that the trio thread answers misses meanwhile.
"""

from __future__ import annotations

import errno

import trio

from nbdsrv.errors import CommandError
from postcopy.destination import gate as source_gate
from postcopy.destination import planner
from postcopy.destination.blockmap import PRESENT
from postcopy.destination.inflight import FetchJob
from postcopy.destination.links import SourceLink, SourceMismatch
from postcopy.destination.localdisk import EngineIOError
from postcopy.destination.shared import SharedState


class Fetcher:
    """The trio side of fetching for one engine (every async method runs on its trio thread)."""

    def __init__(self, shared: SharedState) -> None:
        self._shared = shared
        # the source task's nursery, where fetch jobs run: set while it runs, None otherwise
        self.nursery: trio.Nursery | None = None

    # #### guest requests ##########################################################################

    async def prepare_read(
        self, buf: memoryview | bytearray, offset: int, first: int, end: int, waited: float = 0.0
    ) -> bool:
        """Make the read servable.  Returns True when it filled `buf` itself (pass-through).
        `waited`: seconds the read already spent on a failed blocking attempt (counted against
        the unreachable window)."""
        shared = self._shared
        if not shared.frozen and source_gate.is_source_frozen(shared.config.state_dir):
            shared.open_gate()
        if not shared.frozen:
            await self.read_passthrough(buf, offset)
            return True
        shared.drain_hint = end
        await self.ensure_present(first, end, True, waited)
        return False

    async def ensure_present_frozen(self, first: int, end: int) -> None:
        """Fetch for a read-modify-write: waits (bounded) for the gate first."""
        shared = self._shared
        assert shared.frozen_event is not None
        if not shared.frozen and source_gate.is_source_frozen(shared.config.state_dir):
            shared.open_gate()
        with trio.move_on_after(shared.config.unreachable_timeout):
            await shared.frozen_event.wait()
        if not shared.frozen:
            raise EngineIOError(errno.EIO, "partial write to a missing chunk before source-frozen")
        await self.ensure_present(first, end, True)

    async def read_passthrough(self, buf: memoryview | bytearray, offset: int) -> None:
        """Before the source is frozen: missing chunks come from the source, nothing is kept."""
        shared = self._shared
        view = memoryview(buf).cast("B")
        link = shared.demand_link
        if link is None:
            raise EngineIOError(errno.EIO, "no source")
        pieces = planner.read_pieces(
            offset, len(view), shared.map.chunk_shift, shared.size, shared.map.run_from
        )
        for start_byte, stop_byte, whole in pieces:
            part = view[start_byte - offset:stop_byte - offset]
            if whole is None:
                shared.disk.read_into(part, start_byte)
            else:
                run_start, run_stop = whole
                whole_buffer = bytearray(run_stop - run_start)
                await self._source_read(link, memoryview(whole_buffer), run_start)
                part[:] = memoryview(whole_buffer)[start_byte - run_start:stop_byte - run_start]
                shared.in_flight.count_passthrough(len(whole_buffer))

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
            trio.current_time(), self._shared.config.unreachable_timeout, waited, down
        )

    async def ensure_present(
        self, first: int, end: int, demand: bool, waited: float = 0.0
    ) -> None:
        """Wait until chunks `[first, end)` are PRESENT, starting fetches for uncovered ones."""
        shared = self._shared
        if shared.failure is not None:
            raise EngineIOError(errno.EIO, shared.failure)
        link = shared.demand_link if demand else shared.drain_link
        with trio.move_on_at(self._guest_deadline(link, waited)) as timeout_scope:
            while not shared.map.all_present(first, end):
                jobs = self.start_fetches(first, end, demand)
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

    # #### fetch jobs ##############################################################################

    def start_fetches(self, first: int, end: int, demand: bool) -> list[FetchJob]:
        """Jobs covering every missing chunk of `[first, end)`: existing ones, or new ones."""
        assert self.nursery is not None
        shared = self._shared
        claimed = shared.in_flight.claim_for_read(
            shared.map.missing_ranges(first, end), demand, shared.limits.demand_chunks
        )
        for job, new in claimed:
            if new:
                self.start(job)
        return [job for job, _ in claimed]

    def start(self, job: FetchJob) -> None:
        """Run a job claimed in the in-flight table (a guest's counts against the bandwidth
        cap, never waiting for it, and holds the drain back for a while)."""
        assert self.nursery is not None
        shared = self._shared
        if job.demand:
            if shared.bucket is not None:
                shared.bucket.take(self.job_bytes(job))  # counted, never waited for
            shared.last_fault_at = trio.current_time()
        self.nursery.start_soon(self._run_fetch, job)

    def job_bytes(self, job: FetchJob) -> int:
        start, stop = self._shared.chunk_span(job.first, job.end)
        return stop - start

    async def _run_fetch(self, job: FetchJob) -> None:
        shared = self._shared
        link = shared.demand_link if job.demand else shared.drain_link
        start, stop = shared.chunk_span(job.first, job.end)
        buffer = bytearray(stop - start)
        try:
            assert link is not None
            try:
                # re-sent on every new connection until it succeeds (a stalled request is
                # dropped at its deadline): a fetch is never lost across a reconnect
                await link.pread_into(buffer, start)
            except SourceMismatch as exc:
                shared.fail(str(exc))
                raise EngineIOError(errno.EIO, str(exc)) from None
            except CommandError as exc:
                raise EngineIOError(exc.errno, f"source: {exc}") from None
            shared.in_flight.count_fetched(len(buffer), job.demand)
            if job.demand:
                self.commit_fetched(job.first, job.end, buffer, start)
            else:
                # a drain commit writes MiBs: off the trio thread, so that guest misses
                # arriving meanwhile are not held up behind it
                await trio.to_thread.run_sync(
                    self.commit_fetched, job.first, job.end, buffer, start
                )
            shared.check_complete()
        except Exception as exc:
            job.error = exc
        finally:
            shared.in_flight.release(job)
            job.done.set()
            shared.signal_job_finished()

    # #### the commit rule #########################################################################

    def commit_fetched(self, first: int, end: int, buffer: bytearray, start: int) -> None:
        """(any thread) Write the fetched chunks that are still MISSING; a guest write that
        came first wins."""
        shared = self._shared
        view = memoryview(buffer)
        with shared.commit_lock:
            committed = 0
            for run_first, run_end in shared.map.missing_ranges(first, end):
                run_start, run_stop = shared.chunk_span(run_first, run_end)
                shared.disk.write(view[run_start - start:run_stop - start], run_start)
                shared.disk.mark_present(shared.map, run_first, run_end, PRESENT)
                committed += run_stop - run_start
            shared.counters.discarded_fetch_bytes += len(buffer) - committed

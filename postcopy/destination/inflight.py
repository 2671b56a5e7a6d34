"""The in-flight table: which fetch holds which chunk, and the one place that hands out chunks.

Each MISSING chunk has at most one fetch in flight.  A fetch is a `FetchJob` for chunks
`[first, end)`; it holds them from the moment it is claimed here until it is released here.
Three kinds of job claim chunks, each through its own method, all under the table's `lock` (the
trio thread and nbdkit's worker threads both claim):

    claim_for_read     trio side, a guest miss or prefetch (demand) or `ensure_present`: new
                       jobs for the chunks no job holds, and the jobs it can share for the rest
    claim_free_run     the drain: the first run of a picked range that no job holds
    claim_whole_run    a worker thread's blocking miss: the whole run, or nothing at all

The decisions are the planner's (`plan_fetches`, `first_free_run`); the table applies them
atomically and counts the jobs in flight per kind, which the drain reads to yield to guest
misses.  The fetch tallies of the status record (`FetchCounters`) are kept under the same lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from postcopy.destination import planner


@dataclass
class FetchJob:
    """One read from the source covering chunks `[first, end)`."""

    first: int
    end: int
    demand: bool  # for a guest (miss, read-modify-write, prefetch), not for the drain
    done: trio.Event = field(default_factory=trio.Event)  # set (trio thread) once released
    error: BaseException | None = None  # why it failed; set before `done`
    on_worker_thread: bool = False  # a blocking miss: fetched by an nbdkit worker thread


@dataclass
class FetchCounters:
    """The fetch tallies of the status record (`postcopy.destination.status`); they only grow.
    The lock each one is changed under is named; readers (statistics) read without it."""

    transferred_bytes: int = 0  # bytes read from the source (fetches, pass-through): table lock
    demand_bytes: int = 0  # fetched for guests: table lock
    drain_bytes: int = 0  # fetched by the drain: table lock
    demand_fetches: int = 0  # guest fetches started (trio) or served (worker): table lock
    blocking_misses: int = 0  # misses served on a worker thread: table lock
    passthrough_reads: int = 0  # source reads before source-frozen: table lock
    discarded_fetch_bytes: int = 0  # fetched, but a guest write came first: the commit lock
    hole_bytes_skipped: int = 0  # PRESENT holes from the source's block status: commit lock
    # worker threads that missed, GIL only (a statistic: a rare lost increment is tolerated)
    faults: int = 0
    fault_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2048))


class InFlightTable:
    """Chunk -> the one FetchJob holding it; every change under `lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards everything below, and `counters`' table fields
        # chunk -> its job; a job holds exactly its chunks `[first, end)` from claim to release
        self.jobs: dict[int, FetchJob] = {}
        self.demand_jobs = 0  # trio-side demand jobs claimed, not yet released
        self.drain_jobs = 0  # drain jobs claimed, not yet released
        self.thread_jobs = 0  # worker-thread (blocking miss) jobs claimed, not yet released
        self.counters = FetchCounters()

    def __contains__(self, chunk: int) -> bool:
        return chunk in self.jobs  # (lock-free peek: the claims re-check under the lock)

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def claim_for_read(
        self, missing_runs: Iterable[tuple[int, int]], demand: bool, max_chunks: int
    ) -> list[tuple[FetchJob, bool]]:
        """The jobs that fetch every chunk of `missing_runs`, in chunk order, as (job, new):
        jobs in flight that hold some of them, and new ones (at most `max_chunks` chunks each)
        claimed for the rest.  The caller starts the new ones."""
        jobs: list[tuple[FetchJob, bool]] = []
        with self.lock:
            for step in planner.plan_fetches(missing_runs, self.jobs, max_chunks):
                if isinstance(step, FetchJob):
                    jobs.append((step, False))
                else:
                    jobs.append((self._register(FetchJob(step[0], step[1], demand)), True))
        return jobs

    def claim_free_run(self, first: int, end: int) -> FetchJob | None:
        """A drain job for the first run of `[first, end)` that no job holds (a worker thread
        may have claimed some of its chunks since the drain picked it), or None."""
        with self.lock:
            start, stop = planner.first_free_run(first, end, self.jobs)
            if start >= stop:
                return None
            return self._register(FetchJob(start, stop, False))

    def claim_whole_run(self, first: int, end: int) -> FetchJob | None:
        """A worker thread's job for all of `[first, end)`, or None when any of its chunks is
        held already (a fetch is on its way: the trio side waits for it)."""
        with self.lock:
            if any(chunk in self.jobs for chunk in range(first, end)):
                return None
            return self._register(FetchJob(first, end, True, on_worker_thread=True))

    def _register(self, job: FetchJob) -> FetchJob:
        for chunk in range(job.first, job.end):
            self.jobs[chunk] = job
        if job.on_worker_thread:
            self.thread_jobs += 1
        elif job.demand:
            self.demand_jobs += 1
            self.counters.demand_fetches += 1
        else:
            self.drain_jobs += 1
        return job

    def release(self, job: FetchJob, *, served: bool = False) -> None:
        """The job is over (fetched and committed, or failed): its chunks are free again.
        `served`: a worker thread's job made its miss PRESENT (it counts as a demand fetch)."""
        with self.lock:
            for chunk in range(job.first, job.end):
                if self.jobs.get(chunk) is job:
                    del self.jobs[chunk]
            if job.on_worker_thread:
                self.thread_jobs -= 1
                if served:
                    self.counters.demand_fetches += 1
                    self.counters.blocking_misses += 1
            elif job.demand:
                self.demand_jobs -= 1
            else:
                self.drain_jobs -= 1

    def count_fetched(self, length: int, demand: bool) -> None:
        with self.lock:
            self.counters.transferred_bytes += length
            if demand:
                self.counters.demand_bytes += length
            else:
                self.counters.drain_bytes += length

    def count_passthrough(self, length: int) -> None:
        with self.lock:
            self.counters.passthrough_reads += 1
            self.counters.transferred_bytes += length

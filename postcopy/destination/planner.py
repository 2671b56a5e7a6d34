"""The engine's decisions, as pure functions: no threads, no I/O, no trio, no clock.

The engine's parts (`engine`, `fetcher`, `misses`, `drain`) ask here what to do and then do it:
which chunks a read has to fetch and which fetches in flight it can share (`plan_fetches`),
which chunks of a guest write are covered only in part (`partial_edge_chunks`, read-modify-write),
which whole chunks a trim or a source hole covers (`whole_chunks_within`), what the drain fetches
next (`DrainWalk`, `pick_drain_range`, `first_free_run`) and how long it yields to guest misses
(`FetchLimits.drain_requests_allowed`, `drain_yield_until`), how a range splits around the fetches
in flight (`split_around_in_flight`), how long a guest request waits for the source
(`guest_deadline`), and the extents answered for block status (`extent_runs`, `merge_extents`).

Inputs are plain values: chunk numbers, byte offsets, the in-flight table as a container of chunk
numbers (or a mapping chunk -> job), the block map's missing runs as an iterable of `[first, end)`
pairs and its `run_from` as a function.  Chunks are numbered from 0; `[first, end)` is half-open;
the last chunk of a disk may be short (`disk_size` is not a multiple of the chunk size).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

J = TypeVar("J")

# extent types, as nbdkit spells them (nbdkit.EXTENT_HOLE, nbdkit.EXTENT_ZERO)
EXTENT_HOLE = 1
EXTENT_ZERO = 2
# once the source has been unreachable for the whole window, a guest read of missing data waits
# only this long (for a reconnection attempt made at once) before it fails with EIO
UNREACHABLE_GRACE_SECONDS = 1.0
# the drain never yields to guest misses for longer than this at a time
DRAIN_YIELD_MAX_SECONDS = 1.0

# `run_from(chunk) -> (end chunk, present, source hole)`, as `BlockMap.run_from`
RunFrom = Callable[[int], tuple[int, bool, bool]]


# #### limits ####################################################################################


@dataclass(frozen=True)
class FetchLimits:
    """Every size and in-flight limit of fetching, in chunks, computed in one place."""

    demand_chunks: int  # largest trio-side fetch for a guest miss (>= 1)
    blocking_max_bytes: int  # largest miss a worker thread serves itself (>= one chunk)
    request_chunks: int  # largest drain request (>= 1)
    window_chunks: int  # the drain asks the source's block status this many chunks at a time
    drain_requests: int  # drain requests in flight, normally
    drain_requests_during_faults: int  # ... while guest misses are in flight or recent
    fault_quiet_seconds: float  # how long after a miss the drain still counts it as recent

    @classmethod
    def compute(
        cls,
        chunk_shift: int,
        *,
        demand_fetch_bytes: int,
        drain_request_bytes: int,
        block_status_window_bytes: int,
        drain_requests_in_flight: int,
        drain_requests_during_faults: int,
        fault_quiet_seconds: float,
    ) -> FetchLimits:
        return cls(
            demand_chunks=max(1, demand_fetch_bytes >> chunk_shift),
            blocking_max_bytes=max(demand_fetch_bytes, 1 << chunk_shift),
            request_chunks=max(1, drain_request_bytes >> chunk_shift),
            window_chunks=max(1, block_status_window_bytes >> chunk_shift),
            drain_requests=drain_requests_in_flight,
            drain_requests_during_faults=drain_requests_during_faults,
            fault_quiet_seconds=fault_quiet_seconds,
        )

    def drain_requests_allowed(self, sequential_misses: bool) -> int:
        """How many drain requests may stay in flight while guest misses are in flight or
        recent: at least one while the guest misses sequentially (the drain's read-ahead from
        the chunk after the last miss is what turns the guest's next reads into hits)."""
        if sequential_misses:
            return max(self.drain_requests_during_faults, 1)
        return self.drain_requests_during_faults


# #### chunks and bytes ###########################################################################


def chunk_span(first: int, end: int, chunk_shift: int, disk_size: int) -> tuple[int, int]:
    """Byte offsets `[start, stop)` of chunks `[first, end)` (the last chunk may be short)."""
    return first << chunk_shift, min(end << chunk_shift, disk_size)


def whole_chunks_within(
    start: int, stop: int, chunk_size: int, disk_size: int
) -> tuple[int, int]:
    """The chunks `[first, end)` that the byte range `[start, stop)` covers completely (the short
    last chunk counts as covered when the range reaches the disk's end).  `first >= end`: none."""
    chunk_count = -(-disk_size // chunk_size)
    first = -(-start // chunk_size)
    stop = min(stop, disk_size)
    end = stop // chunk_size if stop < disk_size else chunk_count
    return first, end


def partial_edge_chunks(offset: int, length: int, chunk_size: int, disk_size: int) -> list[int]:
    """The chunks that `[offset, offset+length)` (length > 0, within the disk) touches but does
    not cover completely: at most its first and its last.  A write there is a read-modify-write
    when the chunk is MISSING."""
    first = offset // chunk_size
    last = (offset + length - 1) // chunk_size
    stop = offset + length
    edges = []
    start_of_first = first * chunk_size
    end_of_first = min(start_of_first + chunk_size, disk_size)
    if offset > start_of_first or stop < end_of_first:
        edges.append(first)
    end_of_last = min(last * chunk_size + chunk_size, disk_size)
    if last != first and stop < end_of_last:
        edges.append(last)
    return edges


def is_sequential_miss(last_miss_end: int | None, first: int, request_chunks: int) -> bool:
    """Does a miss at chunk `first` continue the last one (it starts at the chunk after it, or
    at most one drain request further)?"""
    return last_miss_end is not None and last_miss_end <= first <= last_miss_end + request_chunks


# #### the in-flight table ########################################################################


def split_around_in_flight(
    first: int, end: int, in_flight: Container[int]
) -> list[tuple[int, int]]:
    """The maximal sub-runs of `[first, end)` whose chunks have no fetch in flight, in order."""
    runs: list[tuple[int, int]] = []
    run_start: int | None = None
    for chunk in range(first, end):
        if chunk in in_flight:
            if run_start is not None:
                runs.append((run_start, chunk))
                run_start = None
        elif run_start is None:
            run_start = chunk
    if run_start is not None:
        runs.append((run_start, end))
    return runs


def first_free_run(first: int, end: int, in_flight: Container[int]) -> tuple[int, int]:
    """The first run of chunks of `[first, end)` with no fetch in flight, as `(start, stop)`;
    empty (`start == stop`) when every chunk is in flight."""
    while first < end and first in in_flight:
        first += 1
    stop = first
    while stop < end and stop not in in_flight:
        stop += 1
    return first, stop


def plan_fetches(
    missing_runs: Iterable[tuple[int, int]], in_flight: Mapping[int, J], max_chunks: int
) -> list[tuple[int, int] | J]:
    """What a read of the given missing runs waits for, in chunk order: a job in flight that
    holds some of its chunks (each named once per stretch it holds), or a new fetch `(first,
    end)` of at most `max_chunks` chunks that no job holds.  Together they cover every chunk of
    the runs exactly once."""
    plan: list[tuple[int, int] | J] = []
    for run_first, run_end in missing_runs:
        chunk = run_first
        while chunk < run_end:
            existing = in_flight.get(chunk)
            if existing is not None:
                if not plan or plan[-1] is not existing:
                    plan.append(existing)
                chunk += 1
                continue
            stop = chunk + 1
            while stop < run_end and stop - chunk < max_chunks and stop not in in_flight:
                stop += 1
            plan.append((chunk, stop))
            chunk = stop
    return plan


def blocking_fetch_run(
    missing_runs: list[tuple[int, int]], chunk_shift: int, max_bytes: int
) -> tuple[int, int] | None:
    """The one fetch a worker thread makes for a miss whose range has these missing runs (at
    least one): the run itself when it is the only one and at most `max_bytes` long; None when
    the miss is for the trio side (a split read, or a long one)."""
    if len(missing_runs) != 1:
        return None
    run_first, run_end = missing_runs[0]
    if (run_end - run_first) << chunk_shift > max_bytes:
        return None
    return run_first, run_end


# #### the drain ##################################################################################


def pick_drain_range(
    missing_runs: Iterable[tuple[int, int]], in_flight: Container[int], request_chunks: int
) -> tuple[int, int] | None:
    """The drain's next request: the first stretch of the missing runs (in order) that no fetch
    holds, at most `request_chunks` long; None when every missing chunk is in flight."""
    for first, end in missing_runs:
        while first < end and first in in_flight:
            first += 1
        if first < end:
            stop = first + 1
            while stop < end and stop - first < request_chunks and stop not in in_flight:
                stop += 1
            return first, stop
    return None


class DrainWalk:
    """Where the drain looks for work: a cursor over the chunks that wraps around once per pass,
    and which block-status windows it has looked at (each one is asked for its holes once)."""

    def __init__(self, chunk_count: int, window_chunks: int) -> None:
        self.chunk_count = chunk_count
        self.window_chunks = window_chunks
        self.cursor = 0  # the next chunk to look at; 0 <= cursor (may be == chunk_count)
        self._looked_at = bytearray(-(-chunk_count // window_chunks))  # 1: holes asked already
        self._wrapped = False  # this pass went past the end and restarted at chunk 0

    def start_pass(self) -> None:
        """A new search for one request: it may wrap around the end once."""
        self._wrapped = False

    def window(self) -> tuple[int, int] | None:
        """The window `[first, end)` holding the cursor (wrapping to chunk 0 once per pass);
        None when this pass has been all the way around."""
        if self.cursor >= self.chunk_count:
            if self._wrapped:
                return None
            self.cursor, self._wrapped = 0, True
        index = self.cursor // self.window_chunks
        return index * self.window_chunks, min((index + 1) * self.window_chunks, self.chunk_count)

    def first_look(self, window_first: int) -> bool:
        """True the first time the drain looks at the window starting at `window_first`."""
        index = window_first // self.window_chunks
        if self._looked_at[index]:
            return False
        self._looked_at[index] = 1
        return True


def drain_yield_until(
    now: float,
    deadline: float,
    *,
    limits: FetchLimits,
    drain_jobs: int,
    demand_jobs: int,
    sequential_misses: bool,
    last_fault_at: float,
) -> float | None:
    """Guest misses have priority: until when the drain waits before its next request (None: go
    now).  `demand_jobs`: guest-miss fetches in flight (trio side and worker threads); while
    one is, and for `fault_quiet_seconds` after the last one started, the drain keeps at most
    `drain_requests_allowed` requests in flight.  Never later than `deadline`."""
    if drain_jobs < limits.drain_requests_allowed(sequential_misses):
        return None
    if demand_jobs:
        return deadline
    if now - last_fault_at < limits.fault_quiet_seconds:
        return min(last_fault_at + limits.fault_quiet_seconds, deadline)
    return None


# #### guest deadlines ############################################################################


def guest_deadline(
    now: float, window: float, waited: float, source_down_seconds: float | None
) -> float:
    """When a guest request that needs the source gives up: the unreachable `window` from now
    (less what it `waited` already), but once the source has been down for longer than the
    window, only a short grace (`UNREACHABLE_GRACE_SECONDS`, in which the link retries at once),
    so that reads of missing data fail quickly during a long outage and succeed as soon as the
    source is back.  `source_down_seconds`: None while the link is up."""
    grace = min(window, UNREACHABLE_GRACE_SECONDS)
    if source_down_seconds is None:
        return now + max(window - waited, grace)
    remaining = window - max(source_down_seconds, waited)
    return now + max(remaining, grace)


# #### reads and extents ##########################################################################


def read_pieces(
    offset: int, length: int, chunk_shift: int, disk_size: int, run_from: RunFrom
) -> Iterator[tuple[int, int, tuple[int, int] | None]]:
    """The pieces `(start, stop, whole)` of a read of `[offset, offset+length)` by chunk class,
    in order: `whole` is None for a piece of PRESENT chunks, else the byte span of the whole
    missing chunks that hold it (sources may refuse reads not aligned to their block size).
    Lazy: each piece is classified when it is reached."""
    first = offset >> chunk_shift
    end = ((offset + length - 1) >> chunk_shift) + 1
    position = first
    while position < end:
        run_end, present, _ = run_from(position)
        run_end = min(run_end, end)
        start = max(position << chunk_shift, offset)
        stop = min(run_end << chunk_shift, offset + length)
        whole = None if present else chunk_span(position, run_end, chunk_shift, disk_size)
        yield start, stop, whole
        position = run_end


def extent_runs(
    offset: int, end: int, chunk_shift: int, run_from: RunFrom
) -> Iterator[tuple[int, int, int | None]]:
    """Runs `(start, stop, type)` of `[offset, end)` by chunk class, in order: type None for
    PRESENT chunks (the local file's allocation answers), `EXTENT_HOLE | EXTENT_ZERO` for
    missing chunks the source said read as zeros, 0 (data) for other missing chunks."""
    position = offset
    while position < end:
        run_end_chunk, present, source_hole = run_from(position >> chunk_shift)
        run_end = min(run_end_chunk << chunk_shift, end)
        if present:
            kind: int | None = None
        elif source_hole:
            kind = EXTENT_HOLE | EXTENT_ZERO
        else:
            kind = 0
        yield position, run_end, kind
        position = run_end


def merge_extents(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Drop empty extents and join adjacent ones of the same type."""
    merged: list[tuple[int, int, int]] = []
    for offset, length, kind in extents:
        if length <= 0:
            continue
        if merged and merged[-1][2] == kind and merged[-1][0] + merged[-1][1] == offset:
            previous = merged[-1]
            merged[-1] = (previous[0], previous[1] + length, kind)
        else:
            merged.append((offset, length, kind))
    return merged

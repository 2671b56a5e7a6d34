"""The engine's pure decisions (`postcopy.destination.planner`), without threads, trio or I/O.

Chunk states are written as strings, one letter a chunk: `P` PRESENT, `M` MISSING, `H` MISSING
where the source said it reads as zeros.  The property tests compare each decision with the rule
it implements, spelled out chunk by chunk (brute force).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postcopy.destination.planner import (
    EXTENT_HOLE,
    EXTENT_ZERO,
    UNREACHABLE_GRACE_SECONDS,
    DrainWalk,
    FetchLimits,
    blocking_fetch_run,
    chunk_span,
    drain_yield_until,
    extent_runs,
    first_free_run,
    guest_deadline,
    is_sequential_miss,
    merge_extents,
    partial_edge_chunks,
    pick_drain_range,
    plan_fetches,
    read_pieces,
    split_around_in_flight,
    whole_chunks_within,
)

STATES = st.text(alphabet="PMH", min_size=1, max_size=40)


def missing_runs(states: str, first: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Coalesced runs of missing chunks within `[first, end)`, as `BlockMap.missing_ranges`."""
    end = len(states) if end is None else end
    runs: list[tuple[int, int]] = []
    for chunk in range(first, end):
        if states[chunk] == "P":
            continue
        if runs and runs[-1][1] == chunk:
            runs[-1] = (runs[-1][0], chunk + 1)
        else:
            runs.append((chunk, chunk + 1))
    return runs


def run_from_of(states: str):  # type: ignore[no-untyped-def]
    """`BlockMap.run_from` over the states: present chunks are one class, missing ones split
    on the source-hole bit."""

    def run_from(chunk: int) -> tuple[int, bool, bool]:
        letter = states[chunk]
        end = chunk
        while end < len(states) and (states[end] == letter or letter == states[end] == "P"):
            end += 1
        return end, letter == "P", letter == "H"

    return run_from


@st.composite
def disk_and_range(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(chunk_size, disk_size, offset, length) with `[offset, offset+length)` in the disk."""
    chunk_size = 1 << draw(st.integers(0, 6))
    disk_size = draw(st.integers(1, 20 * chunk_size))
    offset = draw(st.integers(0, disk_size - 1))
    length = draw(st.integers(1, disk_size - offset))
    return chunk_size, disk_size, offset, length


def chunk_bounds(chunk: int, chunk_size: int, disk_size: int) -> tuple[int, int]:
    return chunk * chunk_size, min((chunk + 1) * chunk_size, disk_size)


# #### partial edges of a guest write ############################################################


@given(disk_and_range())
def test_partial_edges_are_the_touched_chunks_not_covered_whole(
    case: tuple[int, int, int, int],
) -> None:
    chunk_size, disk_size, offset, length = case
    stop = offset + length
    touched = range(offset // chunk_size, (stop - 1) // chunk_size + 1)
    expected = []
    for chunk in touched:
        start, end = chunk_bounds(chunk, chunk_size, disk_size)
        if not (offset <= start and end <= stop):
            expected.append(chunk)
    assert partial_edge_chunks(offset, length, chunk_size, disk_size) == expected


def test_partial_edges_examples() -> None:
    chunk, size = 16, 100  # 7 chunks, the last one 4 bytes long
    assert partial_edge_chunks(0, 32, chunk, size) == []  # two whole chunks
    assert partial_edge_chunks(4, 8, chunk, size) == [0]  # inside one chunk
    assert partial_edge_chunks(8, 32, chunk, size) == [0, 2]  # both ends ragged
    assert partial_edge_chunks(16, 20, chunk, size) == [2]  # ends inside chunk 2
    assert partial_edge_chunks(96, 4, chunk, size) == []  # the short last chunk, whole
    assert partial_edge_chunks(90, 10, chunk, size) == [5]  # up to the disk's end


# #### whole chunks of a trim or a source hole ###################################################


@given(
    chunk_shift=st.integers(0, 6),
    chunks=st.integers(1, 20),
    short=st.integers(0, 63),
    start=st.integers(0, 1500),
    length=st.integers(0, 1500),
)
def test_whole_chunks_within_are_exactly_the_covered_chunks(
    chunk_shift: int, chunks: int, short: int, start: int, length: int
) -> None:
    chunk_size = 1 << chunk_shift
    disk_size = max(1, chunks * chunk_size - short % chunk_size)
    stop = start + length
    first, end = whole_chunks_within(start, stop, chunk_size, disk_size)
    chunk_count = -(-disk_size // chunk_size)
    covered = [
        chunk
        for chunk in range(chunk_count)
        if start <= chunk_bounds(chunk, chunk_size, disk_size)[0]
        and chunk_bounds(chunk, chunk_size, disk_size)[1] <= min(stop, disk_size)
    ]
    assert list(range(first, end)) == covered


def test_whole_chunks_within_counts_the_short_last_chunk_at_the_disk_end() -> None:
    assert whole_chunks_within(96, 200, 16, 100) == (6, 7)
    assert whole_chunks_within(96, 99, 16, 100) == (6, 6)  # one byte short: nothing
    assert whole_chunks_within(1, 31, 16, 100) == (1, 1)


def test_chunk_span_clips_the_last_chunk() -> None:
    assert chunk_span(0, 2, 4, 100) == (0, 32)
    assert chunk_span(6, 7, 4, 100) == (96, 100)


# #### splitting around fetches in flight ########################################################


@st.composite
def range_and_in_flight(draw: st.DrawFn) -> tuple[int, int, set[int]]:
    first = draw(st.integers(0, 30))
    end = draw(st.integers(first, 40))
    in_flight = draw(st.sets(st.integers(0, 45)))
    return first, end, in_flight


@given(range_and_in_flight())
def test_split_around_in_flight_gives_the_maximal_free_runs(
    case: tuple[int, int, set[int]],
) -> None:
    first, end, in_flight = case
    runs = split_around_in_flight(first, end, in_flight)
    free = [chunk for chunk in range(first, end) if chunk not in in_flight]
    assert [chunk for run_first, run_end in runs for chunk in range(run_first, run_end)] == free
    for (_, end_a), (start_b, _) in itertools.pairwise(runs):
        assert end_a < start_b  # not adjacent: maximal
    assert all(run_first < run_end for run_first, run_end in runs)


@given(range_and_in_flight())
def test_first_free_run_is_the_first_maximal_free_run(case: tuple[int, int, set[int]]) -> None:
    first, end, in_flight = case
    start, stop = first_free_run(first, end, in_flight)
    runs = split_around_in_flight(first, end, in_flight)
    if runs:
        assert (start, stop) == runs[0]
    else:
        assert start == stop


class Job:
    """A stand-in for a FetchJob: identity is all the planner looks at."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Job({self.name})"


@st.composite
def reads_with_jobs(
    draw: st.DrawFn,
) -> tuple[str, dict[int, Job], int, tuple[int, int]]:
    """Chunk states, jobs in flight (each holds a run of missing chunks), a chunk limit, and
    the chunk range of a read."""
    states = draw(STATES)
    in_flight: dict[int, Job] = {}
    for run_first, run_end in missing_runs(states):
        chunk = run_first
        while chunk < run_end:
            size = draw(st.integers(1, run_end - chunk))
            if draw(st.booleans()):
                job = Job(f"{chunk}-{chunk + size}")
                for held in range(chunk, chunk + size):
                    in_flight[held] = job
            chunk += size
    max_chunks = draw(st.integers(1, 6))
    first = draw(st.integers(0, len(states) - 1))
    end = draw(st.integers(first + 1, len(states)))
    return states, in_flight, max_chunks, (first, end)


@given(reads_with_jobs())
def test_plan_fetches_covers_every_missing_chunk_once(
    case: tuple[str, dict[int, Job], int, tuple[int, int]],
) -> None:
    states, in_flight, max_chunks, (first, end) = case
    runs = missing_runs(states, first, end)
    plan = plan_fetches(runs, in_flight, max_chunks)
    chunks = [chunk for a, b in runs for chunk in range(a, b)]  # what the read waits for
    position = 0  # walks `chunks` along the plan: each step takes the next ones
    for index, step in enumerate(plan):
        if isinstance(step, Job):
            assert index == 0 or plan[index - 1] is not step  # named once per stretch
            taken = 0
            while position < len(chunks) and in_flight.get(chunks[position]) is step:
                position, taken = position + 1, taken + 1
            assert taken >= 1, (step, plan)
        else:
            new_first, new_end = step
            assert chunks[position:position + new_end - new_first] == list(
                range(new_first, new_end)
            )
            position += new_end - new_first
            assert 1 <= new_end - new_first <= max_chunks
            assert all(chunk not in in_flight for chunk in range(new_first, new_end))
            (run_end,) = [b for a, b in runs if a <= new_first < b]
            assert new_end <= run_end  # inside one missing run
            # as long as it may be: up to the limit, the run's end or a chunk in flight
            assert new_end - new_first == max_chunks or new_end == run_end or new_end in in_flight
    assert position == len(chunks)


def test_plan_fetches_shares_jobs_and_fills_the_gaps() -> None:
    held = Job("held")
    in_flight = {3: held, 4: held}
    plan = plan_fetches([(1, 8)], in_flight, max_chunks=2)
    assert plan == [(1, 3), held, (5, 7), (7, 8)]


# #### a miss on the worker thread ###############################################################


def test_blocking_fetch_run_takes_one_short_run_only() -> None:
    shift = 4  # 16-byte chunks
    assert blocking_fetch_run([(2, 4)], shift, max_bytes=32) == (2, 4)
    assert blocking_fetch_run([(2, 5)], shift, max_bytes=32) is None  # too long
    assert blocking_fetch_run([(2, 3), (4, 5)], shift, max_bytes=64) is None  # split read


def test_fetch_limits_are_at_least_one_chunk() -> None:
    limits = FetchLimits.compute(
        16,
        demand_fetch_bytes=4096,
        drain_request_bytes=1024,
        block_status_window_bytes=100,
        drain_requests_in_flight=4,
        drain_requests_during_faults=0,
        fault_quiet_seconds=0.05,
    )
    assert limits.demand_chunks == limits.request_chunks == limits.window_chunks == 1
    assert limits.blocking_max_bytes == 1 << 16
    assert limits.drain_requests_allowed(sequential_misses=False) == 0
    assert limits.drain_requests_allowed(sequential_misses=True) == 1


def test_sequential_miss_continues_the_last_one_within_a_request() -> None:
    assert not is_sequential_miss(None, 0, 4)
    assert is_sequential_miss(10, 10, 4)
    assert is_sequential_miss(10, 14, 4)
    assert not is_sequential_miss(10, 15, 4)
    assert not is_sequential_miss(10, 9, 4)


# #### the drain #################################################################################


@given(
    states=STATES,
    in_flight=st.sets(st.integers(0, 40)),
    request_chunks=st.integers(1, 5),
    cursor=st.integers(0, 40),
)
def test_pick_drain_range_is_the_first_free_missing_stretch(
    states: str, in_flight: set[int], request_chunks: int, cursor: int
) -> None:
    cursor = min(cursor, len(states))
    picked = pick_drain_range(missing_runs(states, cursor), in_flight, request_chunks)
    wanted = [c for c in range(cursor, len(states)) if states[c] != "P" and c not in in_flight]
    if not wanted:
        assert picked is None
        return
    assert picked is not None
    first, stop = picked
    assert first == wanted[0]
    assert 1 <= stop - first <= request_chunks
    assert all(states[c] != "P" and c not in in_flight for c in range(first, stop))
    # it stops only at the limit, a chunk in flight, a present chunk or the end
    assert (
        stop - first == request_chunks
        or stop == len(states)
        or states[stop] == "P"
        or stop in in_flight
    )


def test_drain_walk_wraps_once_per_pass_and_looks_at_each_window_once() -> None:
    walk = DrainWalk(chunk_count=10, window_chunks=4)
    walk.cursor = 9
    walk.start_pass()
    assert walk.window() == (8, 10)
    assert walk.first_look(8)
    assert not walk.first_look(8)
    walk.cursor = 10
    assert walk.window() == (0, 4)  # wrapped around
    walk.cursor = 10
    assert walk.window() is None  # the second time round in one pass: done
    walk.start_pass()
    assert walk.window() == (0, 4)
    assert [walk.first_look(first) for first in (0, 4, 8)] == [True, True, False]


LIMITS = FetchLimits.compute(
    16,
    demand_fetch_bytes=1 << 18,
    drain_request_bytes=1 << 20,
    block_status_window_bytes=1 << 30,
    drain_requests_in_flight=4,
    drain_requests_during_faults=0,
    fault_quiet_seconds=0.05,
)


def yield_until(**changes: object) -> float | None:
    settings: dict[str, object] = {
        "limits": LIMITS,
        "drain_jobs": 1,
        "demand_jobs": 0,
        "sequential_misses": False,
        "last_fault_at": -1e9,
    }
    settings.update(changes)
    return drain_yield_until(100.0, 101.0, **settings)  # type: ignore[arg-type]


def test_the_drain_yields_while_a_miss_is_in_flight_and_just_after() -> None:
    assert yield_until() is None  # no miss: go
    assert yield_until(demand_jobs=1) == 101.0  # a miss in flight: until one ends, or 1 s
    assert yield_until(last_fault_at=99.98) == pytest.approx(100.03)  # a recent miss
    assert yield_until(last_fault_at=100.99, limits=LIMITS) == pytest.approx(101.0)  # capped
    assert yield_until(drain_jobs=0, demand_jobs=1, sequential_misses=True) is None
    assert yield_until(drain_jobs=1, demand_jobs=1, sequential_misses=True) == 101.0


# #### how long a guest waits for the source #####################################################


@given(
    window=st.floats(0.0, 500.0),
    waited=st.floats(0.0, 500.0),
    down=st.one_of(st.none(), st.floats(0.0, 1000.0)),
)
def test_guest_deadline_keeps_a_grace_and_counts_the_outage(
    window: float, waited: float, down: float | None
) -> None:
    now = 1000.0
    deadline = guest_deadline(now, window, waited, down)
    grace = min(window, UNREACHABLE_GRACE_SECONDS)
    assert deadline >= now + grace
    assert deadline <= now + max(window, grace)
    spent = waited if down is None else max(down, waited)
    if window - spent > grace:
        assert deadline == pytest.approx(now + window - spent)


def test_guest_deadline_during_a_long_outage_is_the_grace_only() -> None:
    assert guest_deadline(10.0, 180.0, 0.0, None) == 190.0
    assert guest_deadline(10.0, 180.0, 0.0, 500.0) == 10.0 + UNREACHABLE_GRACE_SECONDS


# #### reads and extents #########################################################################


@given(states=STATES, chunk_shift=st.integers(0, 4), data=st.data())
def test_read_pieces_tile_the_read_by_chunk_class(
    states: str, chunk_shift: int, data: st.DataObject
) -> None:
    chunk_size = 1 << chunk_shift
    disk_size = len(states) * chunk_size - data.draw(st.integers(0, chunk_size - 1))
    offset = data.draw(st.integers(0, disk_size - 1))
    length = data.draw(st.integers(1, disk_size - offset))
    pieces = list(read_pieces(offset, length, chunk_shift, disk_size, run_from_of(states)))
    assert pieces[0][0] == offset and pieces[-1][1] == offset + length
    for (_, stop_a, _), (start_b, _, _) in itertools.pairwise(pieces):
        assert stop_a == start_b
    for start, stop, whole in pieces:
        touched = range(start >> chunk_shift, ((stop - 1) >> chunk_shift) + 1)
        assert {states[chunk] == "P" for chunk in touched} == {whole is None}
        if whole is not None:
            whole_start, whole_stop = whole
            assert whole_start % chunk_size == 0
            assert whole_stop % chunk_size == 0 or whole_stop == disk_size
            assert whole_start <= start < stop <= whole_stop
            assert whole_start > start - chunk_size and whole_stop < stop + chunk_size


@given(states=STATES, data=st.data())
def test_extent_runs_follow_the_chunk_states(states: str, data: st.DataObject) -> None:
    shift = 2
    size = len(states) << shift
    offset = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(offset + 1, size))
    runs = list(extent_runs(offset, end, shift, run_from_of(states)))
    assert runs[0][0] == offset and runs[-1][1] == end
    expected_kind = {"P": None, "H": EXTENT_HOLE | EXTENT_ZERO, "M": 0}
    for start, stop, kind in runs:
        assert start < stop
        assert {expected_kind[states[b >> shift]] for b in range(start, stop)} == {kind}


def test_merge_extents_joins_neighbours_of_one_type_and_drops_empty_ones() -> None:
    zero = EXTENT_HOLE | EXTENT_ZERO
    extents = [(0, 4, 0), (4, 4, 0), (8, 0, zero), (8, 4, zero), (12, 4, 0), (20, 4, 0)]
    assert merge_extents(extents) == [(0, 8, 0), (8, 4, zero), (12, 4, 0), (20, 4, 0)]

"""The engine against an in-memory source: fetch rules, races, durability, gate, drain, failures.

The engine runs its own trio thread, so these tests are synchronous and play nbdkit's worker
threads themselves.  `FakeSource.pause()` holds fetches in flight so races happen for sure.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from postcopy.destination.blockmap import BlockMap
from postcopy.destination.engine import EXTENT_HOLE, EXTENT_ZERO, Engine, EngineIOError
from postcopy.destination.gate import declare_source_frozen
from postcopy.destination.status import read_status
from postcopy.errors import UserError
from tests.destination.conftest import EngineFactory
from tests.fakes import FakeSource

CHUNK = 64 * 1024
SIZE = 4 * 1024 * 1024


def random_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def status_state(state_dir: Path) -> str | None:
    try:
        return str(read_status(state_dir)["state"])
    except UserError:
        return None  # not written yet


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)




def read(engine: Engine, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    engine.pread_into(memoryview(buf), offset)
    return bytes(buf)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the test
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def requests_touching(source: FakeSource, chunk: int) -> int:
    start, end = chunk * CHUNK, (chunk + 1) * CHUNK
    return sum(1 for off, length in source.read_requests if off < end and off + length > start)


def test_miss_fetches_stores_and_then_serves_locally(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    assert read(engine, 100 * 1024, 4096) == source.data[100 * 1024:104 * 1024]
    assert engine.map.is_present(1) and not engine.map.is_present(0)
    fetched = source.bytes_read()
    assert fetched == CHUNK
    assert read(engine, 64 * 1024, CHUNK) == source.data[CHUNK:2 * CHUNK]
    assert source.bytes_read() == fetched  # present: served from the local file
    with open(engine.config.dest_path, "rb") as f:
        f.seek(CHUNK)
        assert f.read(CHUNK) == source.data[CHUNK:2 * CHUNK]


def test_read_spanning_present_and_missing_chunks(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    read(engine, 3 * CHUNK, 10)
    assert read(engine, 2 * CHUNK + 5, 3 * CHUNK) == source.data[2 * CHUNK + 5:5 * CHUNK + 5]
    assert list(engine.map.present_ranges()) == [(2, 6)]


def test_concurrent_misses_on_one_chunk_share_one_fetch(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    source.pause()
    readers = [
        in_thread(functools.partial(read, engine, 7 * CHUNK + i * 512, 512)) for i in range(6)
    ]
    source.wait_reads_in_flight(1)
    time.sleep(0.1)  # let every reader reach the engine while the fetch is held
    source.resume()
    for thread, _ in readers:
        thread.join(5)
    for i, (_, result) in enumerate(readers):
        assert result == [source.data[7 * CHUNK + i * 512:7 * CHUNK + (i + 1) * 512]]
    assert requests_touching(source, 7) == 1


def test_write_during_fetch_keeps_guest_data(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    source.pause()
    reader, result = in_thread(lambda: read(engine, 9 * CHUNK, CHUNK))
    source.wait_reads_in_flight(1)
    guest = b"G" * CHUNK
    engine.pwrite(guest, 9 * CHUNK)  # whole chunk: no fetch needed, lands first
    source.resume()
    reader.join(5)
    assert result[0] in (guest, source.data[9 * CHUNK:10 * CHUNK])
    assert read(engine, 9 * CHUNK, CHUNK) == guest
    assert engine.discarded_fetch_bytes == CHUNK
    assert engine.map.is_guest_written(9)


def test_partial_write_on_missing_chunk_reads_modify_writes(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    engine.pwrite(b"x" * 100, 3 * CHUNK + 1000)
    expected = bytearray(source.data[3 * CHUNK:4 * CHUNK])
    expected[1000:1100] = b"x" * 100
    assert read(engine, 3 * CHUNK, CHUNK) == bytes(expected)
    assert requests_touching(source, 3) == 1


def test_partial_write_during_fetch_waits_and_overlays(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    source.pause()
    reader, _ = in_thread(lambda: read(engine, 5 * CHUNK, 512))
    source.wait_reads_in_flight(1)
    writer, written = in_thread(lambda: engine.pwrite(b"w" * 10, 5 * CHUNK + 20))
    time.sleep(0.1)
    assert not written  # the partial write waits for the chunk's fetch
    source.resume()
    reader.join(5)
    writer.join(5)
    assert written == [None]
    expected = bytearray(source.data[5 * CHUNK:6 * CHUNK])
    expected[20:30] = b"w" * 10
    assert read(engine, 5 * CHUNK, CHUNK) == bytes(expected)
    assert requests_touching(source, 5) == 1


def test_write_spanning_chunks_fetches_only_partial_edges(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    engine.pwrite(b"a" * (3 * CHUNK), 10 * CHUNK + 100)  # partial 10, whole 11 and 12, partial 13
    assert requests_touching(source, 11) == requests_touching(source, 12) == 0
    expected = bytearray(source.data[10 * CHUNK:14 * CHUNK])
    expected[100:100 + 3 * CHUNK] = b"a" * (3 * CHUNK)
    assert read(engine, 10 * CHUNK, 4 * CHUNK) == bytes(expected)


def test_zero_punches_holes_without_fetching_whole_chunks(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    read(engine, 0, 16 * CHUNK)  # make 16 chunks present and allocated
    dest = engine.config.dest_path
    allocated_before = os.stat(dest).st_blocks
    engine.zero(2 * CHUNK, 8 * CHUNK, may_trim=True)
    assert os.stat(dest).st_blocks <= allocated_before - 8 * CHUNK // 512
    assert read(engine, 2 * CHUNK, 8 * CHUNK) == bytes(8 * CHUNK)
    engine.zero(20 * CHUNK, 4 * CHUNK, may_trim=True)  # whole missing chunks: no fetch
    assert source.bytes_read() == 16 * CHUNK
    engine.zero(30 * CHUNK + 10, 100, may_trim=False)  # partial missing chunk: fetched first
    expected = bytearray(source.data[30 * CHUNK:31 * CHUNK])
    expected[10:110] = bytes(100)
    assert read(engine, 30 * CHUNK, CHUNK) == bytes(expected)


def test_trim_discards_whole_chunks_only(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    engine.trim(CHUNK + 1, 3 * CHUNK)  # covers chunks 2 and 3 whole, 1 and 4 in part
    assert list(engine.map.present_ranges()) == [(2, 4)]
    assert read(engine, 2 * CHUNK, 2 * CHUNK) == bytes(2 * CHUNK)
    assert read(engine, CHUNK, CHUNK) == source.data[CHUNK:2 * CHUNK]


def test_extents_are_honest(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    read(engine, 0, 4 * CHUNK)
    engine.zero(CHUNK, CHUNK, may_trim=True)
    extents = engine.extents(0, 8 * CHUNK)
    assert extents == [
        (0, CHUNK, 0),
        (CHUNK, CHUNK, EXTENT_HOLE | EXTENT_ZERO),
        (2 * CHUNK, 2 * CHUNK, 0),
        (4 * CHUNK, 4 * CHUNK, 0),  # missing and not known to be a hole: data
    ] or extents == [
        (0, CHUNK, 0),
        (CHUNK, CHUNK, EXTENT_HOLE | EXTENT_ZERO),
        (2 * CHUNK, 6 * CHUNK, 0),
    ]


def test_flush_makes_map_durable(make_engine: EngineFactory, tmp_path: Path) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source, sync_interval=3600)
    read(engine, 0, CHUNK)
    engine.pwrite(b"q" * CHUNK, 6 * CHUNK)
    engine.flush()
    on_disk = BlockMap.open(tmp_path / "state", engine.map.identity)
    try:
        assert list(on_disk.present_ranges()) == [(0, 1), (6, 7)]
        assert list(on_disk.guest_written_ranges()) == [(6, 7)]
    finally:
        on_disk.close()


def test_drain_completes_skipping_holes_and_stays_sparse(make_engine: EngineFactory) -> None:
    size = 8 * 1024 * 1024
    holes = [(0, 1024 * 1024), (3 * 1024 * 1024, 2 * 1024 * 1024 + 5000)]
    source = FakeSource(random_bytes(size), holes=holes)
    engine = make_engine(source, drain=True, drain_request_bytes=512 * 1024)
    wait_until(lambda: engine.state() == "complete")
    data_bytes = size - 1024 * 1024 - 2 * 1024 * 1024  # a partial-hole chunk is copied whole
    assert data_bytes <= source.bytes_read() <= data_bytes + CHUNK
    with open(engine.config.dest_path, "rb") as f:
        assert f.read() == bytes(source.data)
    allocated = os.stat(engine.config.dest_path).st_blocks * 512
    assert allocated <= data_bytes + 2 * CHUNK
    wait_until(lambda: status_state(engine.config.state_dir) == "complete")
    record = read_status(engine.config.state_dir)
    assert record["present_bytes"] == record["size_bytes"] == size
    assert record["eta_seconds"] == 0


def test_drain_never_overwrites_guest_writes(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    source.pause()
    engine = make_engine(
        source, drain=True, drain_request_bytes=256 * 1024, drain_requests_in_flight=8
    )
    source.wait_reads_in_flight(8)  # the drain has 8 requests in flight, none answered
    guest = {}
    for chunk in (0, 1, 5, 17, 30):  # inside the ranges being drained right now
        guest[chunk] = bytes([chunk + 1]) * CHUNK
        engine.pwrite(guest[chunk], chunk * CHUNK)
    # a partial write to a chunk being drained waits for that fetch, then overlays it
    writer, written = in_thread(lambda: engine.pwrite(b"p" * 10, 20 * CHUNK + 7))
    time.sleep(0.1)
    assert not written
    source.resume()
    writer.join(5)
    assert written == [None]
    wait_until(lambda: engine.state() == "complete")
    for chunk, data in guest.items():
        assert read(engine, chunk * CHUNK, CHUNK) == data
    expected = bytearray(source.data[20 * CHUNK:21 * CHUNK])
    expected[7:17] = b"p" * 10
    assert read(engine, 20 * CHUNK, CHUNK) == bytes(expected)
    assert read(engine, 2 * CHUNK, 3 * CHUNK) == source.data[2 * CHUNK:5 * CHUNK]
    assert engine.discarded_fetch_bytes >= 4 * CHUNK


def test_restart_resumes_and_transfers_only_missing(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    source = FakeSource(random_bytes(SIZE))
    first = make_engine(source)
    read(first, 0, 10 * CHUNK)
    first.pwrite(b"z" * CHUNK, 20 * CHUNK)
    first.stop()
    again_source = FakeSource(bytes(source.data))
    second = make_engine(again_source, drain=True)
    wait_until(lambda: second.state() == "complete")
    assert again_source.bytes_read() == SIZE - 11 * CHUNK
    assert read(second, 20 * CHUNK, CHUNK) == b"z" * CHUNK
    assert read(second, 0, 10 * CHUNK) == source.data[:10 * CHUNK]


def test_wait_for_source_passes_reads_through_until_frozen(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source, wait_for_source=True, drain=True)
    assert read(engine, 0, 512) == source.data[:512]
    assert read(engine, 5 * CHUNK, CHUNK) == source.data[5 * CHUNK:6 * CHUNK]
    time.sleep(0.2)
    assert engine.map.present_count == 0  # nothing kept, nothing marked, no drain
    assert os.stat(engine.config.dest_path).st_blocks == 0
    assert source.bytes_read() == 2 * CHUNK  # pass-through reads whole chunks (alignment)
    wait_until(lambda: status_state(tmp_path / "state") == "waiting-for-source")
    source.data[:512] = b"n" * 512  # the source still changes before it is frozen
    assert read(engine, 0, 512) == b"n" * 512
    declare_source_frozen(tmp_path / "state")
    wait_until(lambda: engine.state() == "complete")
    with open(engine.config.dest_path, "rb") as f:
        assert f.read() == bytes(source.data)


def test_source_of_other_size_fails_reads_with_eio(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE // 2))
    engine = make_engine(source, unreachable_timeout=2, disk_size=SIZE)
    with pytest.raises(EngineIOError) as info:
        read(engine, 0, 512)
    assert info.value.errno == errno.EIO
    wait_until(lambda: engine.state() == "failed")


def test_unreachable_source_fails_after_window_present_data_still_served(
    make_engine: EngineFactory,
) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source, unreachable_timeout=0.5)
    read(engine, 0, CHUNK)
    source.unreachable = True
    started = time.monotonic()
    with pytest.raises(EngineIOError) as info:
        read(engine, 10 * CHUNK, 512)
    assert info.value.errno == errno.EIO
    assert 0.4 < time.monotonic() - started < 3
    assert read(engine, 0, CHUNK) == source.data[:CHUNK]  # present data still served
    engine.pwrite(b"k" * 512, 100)
    wait_until(lambda: engine.state() == "source-unreachable")
    source.unreachable = False
    assert read(engine, 10 * CHUNK, 512) == source.data[10 * CHUNK:10 * CHUNK + 512]
    wait_until(lambda: engine.statistics()["reconnects"] >= 1)


def test_fetch_in_flight_does_not_stall_present_reads(make_engine: EngineFactory) -> None:
    source = FakeSource(random_bytes(SIZE))
    engine = make_engine(source)
    read(engine, 0, CHUNK)
    source.pause()
    reader, _ = in_thread(lambda: read(engine, 50 * CHUNK, 512))
    source.wait_reads_in_flight(1)
    started = time.monotonic()
    for _ in range(100):
        assert read(engine, 0, 4096) == source.data[:4096]
    assert time.monotonic() - started < 1
    source.resume()
    reader.join(5)


@pytest.mark.parametrize("sequential", [False, True])
def test_drain_yields_to_random_misses_but_reads_ahead_of_sequential_ones(
    make_engine: EngineFactory, sequential: bool
) -> None:
    """During a burst of misses the drain starts nothing new (drain_requests_during_faults=0),
    except its read-ahead after misses that follow each other: that makes the next reads hits."""
    size = 64 * 1024 * 1024
    source = FakeSource(random_bytes(size))
    source.read_delay = 0.05
    engine = make_engine(
        source, drain=True, drain_request_bytes=4 * CHUNK, fault_quiet_seconds=5.0
    )
    wait_until(lambda: engine.drain_bytes > 0)  # the drain runs from chunk 0
    chunks = [600, 601, 602] if sequential else [900, 500, 700]
    for chunk in chunks:
        assert read(engine, chunk * CHUNK, 4096) == bytes(source.data[chunk * CHUNK:][:4096])
    requests_before = len(source.read_requests)
    time.sleep(0.3)  # within the drain's never-starve second
    started = source.read_requests[requests_before:]
    if sequential:
        assert requests_touching(source, 603) == 1  # read ahead (once) right after the misses
        assert started, "no read-ahead during the miss burst"
        assert all(offset >= 603 * CHUNK for offset, _ in started), started
    else:
        assert started == []

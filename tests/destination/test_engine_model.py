"""Random operation sequences against the engine while its drain runs, checked against a model.

The model is a bytearray that starts as the source and receives every write, zero and trim the
way the engine promises (trim zeroes the whole chunks it covers and leaves partial ones alone).
The source is paused and resumed at random so that operations meet fetches in flight.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from postcopy.destination.engine import Engine, EngineConfig
from tests.fakes import FakeSource

CHUNK = 4096 * 4  # small chunks: many chunk boundaries in a small disk
SIZE = 2 * 1024 * 1024 + 12345  # a short last chunk too


def in_flight_chunks(engine: Engine) -> list[int]:
    """Chunks with a fetch in flight now (peeked from the engine's thread, best effort)."""
    for _ in range(3):
        try:
            return sorted(engine._in_flight)
        except RuntimeError:  # changed size while copied
            continue
    return []


def run_random_operations(tmp_path: Path, seed: int, operations: int) -> None:
    rng = random.Random(seed)
    holes = [(0, 64 * 1024), (1024 * 1024, 300 * 1024)]
    source = FakeSource(rng.randbytes(SIZE), holes=holes)
    source.read_delay = 0.01  # the drain takes ~0.1-0.3 s: operations meet it in flight
    model = bytearray(source.data)
    dest = tmp_path / "disk.img"
    with open(dest, "wb") as f:
        f.truncate(SIZE)
    (tmp_path / "state").mkdir()
    engine = Engine(
        EngineConfig(
            source_uri="nbd://fake/", dest_path=dest, state_dir=tmp_path / "state",
            chunk_size=CHUNK, drain_request_bytes=4 * CHUNK, drain_requests_in_flight=3,
            block_status_window_bytes=256 * 1024, sync_interval=0.02, status_interval=0.05,
        ),
        source_opener=source.open_client,
    )
    source.pause()
    engine.start()
    try:
        # one sure race first: a whole-chunk write to a chunk the drain is fetching
        source.wait_reads_in_flight(1)
        deadline = time.monotonic() + 5
        while not in_flight_chunks(engine):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        chunk = in_flight_chunks(engine)[-1]
        data = rng.randbytes(CHUNK)
        engine.pwrite(data, chunk * CHUNK)
        model[chunk * CHUNK:(chunk + 1) * CHUNK] = data
        source.resume()
        for _ in range(operations):
            if rng.random() < 0.05:
                source.pause()
            elif rng.random() < 0.3:
                source.resume()
            if source.reads_in_flight and rng.random() < 0.5:
                source.resume()  # never let a blocking call below wait for a paused source
            offset = rng.randrange(0, SIZE - 1)
            in_flight = in_flight_chunks(engine)
            if in_flight and rng.random() < 0.4:  # aim at a chunk being fetched right now
                offset = rng.choice(in_flight) * CHUNK + rng.choice([0, 0, 100])
            length = min(rng.choice([1, 511, 4096, CHUNK, 3 * CHUNK + 7]), SIZE - offset)
            kind = rng.choice(["read", "read", "write", "zero", "trim", "flush", "extents"])
            needs_source = not engine.map.all_present(*engine.map.chunk_range(offset, length))
            if needs_source:
                source.resume()
            if kind == "read":
                buf = bytearray(length)
                engine.pread_into(memoryview(buf), offset)
                assert buf == model[offset:offset + length], (seed, offset, length)
            elif kind == "write":
                data = rng.randbytes(length)
                engine.pwrite(data, offset, fua=rng.random() < 0.1)
                model[offset:offset + length] = data
            elif kind == "zero":
                engine.zero(offset, length, may_trim=rng.random() < 0.5)
                model[offset:offset + length] = bytes(length)
            elif kind == "trim":
                engine.trim(offset, length)
                first = -(-offset // CHUNK) * CHUNK
                end = offset + length
                if end != SIZE:
                    end = end // CHUNK * CHUNK
                if first < end:
                    model[first:end] = bytes(end - first)
            elif kind == "flush":
                engine.flush()
            else:
                extents = engine.extents(offset, length)
                assert extents[0][0] == offset
                position = offset
                for start, size, kind_flags in extents:
                    assert start == position and size > 0
                    if kind_flags & 2:  # reported as zeros: must really read as zeros
                        assert model[start:start + size] == bytes(size), (seed, start, size)
                    position += size
        source.resume()
        assert engine.discarded_fetch_bytes > 0  # writes really raced fetches in flight
        deadline = time.monotonic() + 20
        while engine.state() != "complete":
            assert time.monotonic() < deadline, engine.statistics()
            time.sleep(0.01)
        with open(dest, "rb") as f:
            assert f.read() == bytes(model)
    finally:
        source.resume()
        engine.stop()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_operations_during_drain_match_the_model(tmp_path: Path, seed: int) -> None:
    run_random_operations(tmp_path, seed, 400)

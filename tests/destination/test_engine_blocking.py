"""Guest misses served on the worker thread over a blocking connection, against real nbdkit.

The engine serves a miss whose chunks no fetch covers yet on the calling thread itself (libnbd,
one connection per thread); these tests check that this path keeps the engine's rules: bytes
equal to the source's, concurrent misses on one chunk share one fetch, a guest write that lands
during the fetch wins, and a broken blocking connection falls back to the trio path (which
reconnects).  nbdkit's delay filter holds reads so that the races happen for sure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.destination.conftest import EngineFactory
from tests.destination.test_engine import read
from tests.peers import require_tools, running_nbdkit

CHUNK = 64 * 1024
SIZE = 2 * 1024 * 1024


@pytest.fixture
def source_image(tmp_path: Path) -> tuple[Path, bytes]:
    require_tools("nbdkit")
    data = random.Random(5).randbytes(SIZE)
    path = tmp_path / "source.img"
    path.write_bytes(data)
    return path, data


def run_threads(functions: list[Callable[[], Any]], timeout: float = 20.0) -> list[Any]:
    results: list[Any] = [None] * len(functions)

    def run(index: int) -> None:
        try:
            results[index] = functions[index]()
        except BaseException as exc:  # handed to the test
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(functions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a read did not finish"
    return results


def test_miss_is_served_on_the_worker_thread(
    make_engine: EngineFactory, source_image: tuple[Path, bytes]
) -> None:
    path, data = source_image
    with running_nbdkit(["file", str(path)]) as uri:
        engine = make_engine(uri, disk_size=SIZE)
        assert read(engine, 5 * CHUNK + 100, 4096) == data[5 * CHUNK + 100:5 * CHUNK + 4196]
        assert engine.blocking_misses == 1
        assert engine.demand_fetches == 1
        assert engine.transferred_bytes == CHUNK
        assert engine.map.is_present(5)
        assert not engine.map.is_present(4) and not engine.map.is_present(6)
        # a read across two missing chunks: one fetch of both
        assert read(engine, 7 * CHUNK - 10, 20) == data[7 * CHUNK - 10:7 * CHUNK + 10]
        assert engine.demand_fetches == 2
        assert engine.blocking_misses == 2
        # PRESENT now: served locally, no more fetches
        assert read(engine, 5 * CHUNK, CHUNK) == data[5 * CHUNK:6 * CHUNK]
        assert engine.demand_fetches == 2
        with open(engine.config.dest_path, "rb") as dest:
            assert os.pread(dest.fileno(), 2 * CHUNK, 6 * CHUNK) == data[6 * CHUNK:8 * CHUNK]
        assert engine.statistics()["faults"] == 2
        engine.stop()  # before nbdkit stops: it waits for open connections


def test_concurrent_misses_on_one_chunk_share_one_fetch(
    make_engine: EngineFactory, source_image: tuple[Path, bytes]
) -> None:
    path, data = source_image
    with running_nbdkit(["--filter=delay", "file", str(path), "rdelay=300ms"]) as uri:
        engine = make_engine(uri, disk_size=SIZE)
        offsets = [3 * CHUNK + i * 4096 for i in range(4)]
        results = run_threads([functools.partial(read, engine, offset, 4096) for offset in offsets])
        for offset, result in zip(offsets, results, strict=True):
            assert result == data[offset:offset + 4096]
        assert engine.demand_fetches == 1
        assert engine.transferred_bytes == CHUNK
        assert engine.blocking_misses == 1  # the others waited for its fetch on the trio side
        engine.stop()


def test_guest_write_during_blocking_fetch_wins(
    make_engine: EngineFactory, source_image: tuple[Path, bytes]
) -> None:
    path, data = source_image
    with running_nbdkit(["--filter=delay", "file", str(path), "rdelay=400ms"]) as uri:
        engine = make_engine(uri, disk_size=SIZE)
        guest = random.Random(9).randbytes(CHUNK)
        reader = threading.Thread(target=lambda: read(engine, 2 * CHUNK, 4096), daemon=True)
        reader.start()
        for _ in range(500):  # wait (at most 5 s) until the reader's fetch is registered
            if 2 in engine._in_flight:
                break
            time.sleep(0.01)
        assert 2 in engine._in_flight, "the miss never started a fetch"
        engine.pwrite(guest, 2 * CHUNK)  # a whole chunk: no fetch, wins at once
        reader.join(10)
        assert not reader.is_alive()
        assert read(engine, 2 * CHUNK, CHUNK) == guest
        assert engine.discarded_fetch_bytes == CHUNK
        assert engine.blocking_misses == 1
        assert read(engine, 3 * CHUNK, 4096) == data[3 * CHUNK:3 * CHUNK + 4096]
        engine.stop()


@contextlib.contextmanager
def killable_nbdkit(image: Path, socket_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """nbdkit serving `image` on `socket_path`; killed (SIGKILL) at the end at the latest."""
    socket_path.unlink(missing_ok=True)
    process = subprocess.Popen(["nbdkit", "-f", "-U", str(socket_path), "file", str(image)])
    try:
        for _ in range(1000):  # at most 10 s
            if socket_path.exists() or process.poll() is not None:
                break
            time.sleep(0.01)
        assert socket_path.exists(), "nbdkit did not start"
        yield process
    finally:
        process.kill()
        process.wait(10)


def test_broken_blocking_connection_falls_back_to_the_trio_path(
    make_engine: EngineFactory, source_image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, data = source_image
    socket_path = tmp_path / "source.sock"
    uri = f"nbd+unix:///?socket={socket_path}"
    with killable_nbdkit(path, socket_path):
        engine = make_engine(uri, disk_size=SIZE, unreachable_timeout=20.0)
        assert read(engine, 0, 4096) == data[:4096]
        assert engine.blocking_misses == 1
    # the source is killed and restarted: this thread's blocking connection is dead; the miss
    # must still be served (by the trio path, which reconnects), with the source's bytes
    with killable_nbdkit(path, socket_path):
        assert read(engine, 9 * CHUNK, 4096) == data[9 * CHUNK:9 * CHUNK + 4096]
        assert engine.blocking_misses == 1
        assert engine.demand_fetches == 2  # the failed blocking attempt is not counted
        assert engine.map.is_present(9)
        engine.stop()


def test_disabled_or_gated_misses_take_the_trio_path(
    make_engine: EngineFactory, source_image: tuple[Path, bytes]
) -> None:
    path, data = source_image
    with running_nbdkit(["file", str(path)]) as uri:
        engine = make_engine(uri, disk_size=SIZE, blocking_misses=False)
        assert read(engine, CHUNK, 4096) == data[CHUNK:CHUNK + 4096]
        assert engine.blocking_misses == 0 and engine.demand_fetches == 1
        engine.stop()


def test_misses_from_many_worker_threads_share_a_bounded_pool_of_connections(
    make_engine: EngineFactory, source_image: tuple[Path, bytes]
) -> None:
    """nbdkit runs up to 128 worker threads per connection: a miss on a thread that never
    missed before still takes the worker path (a connection per thread, capped at 16, sent the
    misses of every later thread over the trio hop), and the pool never outgrows its cap."""
    from postcopy.destination.misses import MAX_BLOCKING_SOURCES

    path, data = source_image
    chunks = SIZE // CHUNK - 8  # more than the cap, and not the whole disk (which would close it)
    assert chunks > MAX_BLOCKING_SOURCES
    with running_nbdkit(["file", str(path)]) as uri:
        engine = make_engine(uri, disk_size=SIZE)
        # every thread stays alive until all have missed (as nbdkit's do), and they miss one
        # after the other: each on a thread that has no connection of its own yet
        turns = [threading.Event() for _ in range(chunks + 1)]
        turns[0].set()

        def miss(chunk: int) -> bytes:
            assert turns[chunk].wait(10), "the previous miss did not finish"
            try:
                return read(engine, chunk * CHUNK + 512, 4096)
            finally:
                turns[chunk + 1].set()
                assert turns[chunks].wait(20)

        results = run_threads([functools.partial(miss, chunk) for chunk in range(chunks)], 30)
        for chunk, result in enumerate(results):
            assert result == data[chunk * CHUNK + 512:chunk * CHUNK + 4608]
        assert engine.blocking_misses == chunks
        pool = engine._misses._sources  # noqa: SLF001 (the pool's size is the point)
        assert 1 <= len(pool) <= MAX_BLOCKING_SOURCES
        engine.stop()  # closes the pool before nbdkit stops (it waits for connected clients)

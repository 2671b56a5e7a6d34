"""An in-memory NBD source with the `nbdsrv.open_client` client API, for engine unit tests.

`FakeSource` holds the disk bytes and its holes.  `FakeSource.open_client()` is an async context
manager yielding a `FakeClient` with the methods the engine uses (`size`, `export_name`,
`pread`, `pread_into`, `block_status`, `iter_extents`, `disconnect`).  Hooks, settable from any
thread:

- `pause()` / `resume()`: reads block (in a trio worker thread) until resumed, so a test can act
  while a fetch is provably in flight (`wait_reads_in_flight(n)` waits for that);
- `unreachable = True`: connecting raises `ConnectionRefusedError` and every pending or new read
  of an open client fails with `ConnectionClosedError`, like a dropped link;
- `read_delay`: seconds every read takes, like a slow link;
- `read_requests`: every (offset, length) read, to count what crossed the "network".
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from nbdsrv.errors import CommandError, ConnectionClosedError
from nbdsrv.extent import Extent


class FakeSource:
    def __init__(
        self, data: bytes, *, holes: list[tuple[int, int]] | None = None, export_name: str = ""
    ) -> None:
        self.data = bytearray(data)
        self.holes = sorted(holes or [])  # (offset, length) runs reported as HOLE|ZERO
        for offset, length in self.holes:
            self.data[offset:offset + length] = bytes(length)
        self.export_name = export_name
        self.unreachable = False
        self.read_delay = 0.0  # seconds each read takes (trio.sleep), like a slow link
        self.read_requests: list[tuple[int, int]] = []
        self.connections_opened = 0
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self._in_flight = 0

    # ----- hooks -------------------------------------------------------------------------------

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def reads_in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def wait_reads_in_flight(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.reads_in_flight < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.reads_in_flight} reads in flight, wanted {count}")
            time.sleep(0.002)

    def bytes_read(self) -> int:
        with self._lock:
            return sum(length for _, length in self.read_requests)

    # ----- the client API ------------------------------------------------------------------------

    @asynccontextmanager
    async def open_client(self) -> AsyncIterator[FakeClient]:
        await trio.lowlevel.checkpoint()
        if self.unreachable:
            raise ConnectionRefusedError(111, "Connection refused (fake)")
        with self._lock:
            self.connections_opened += 1
        client = FakeClient(self)
        try:
            yield client
        finally:
            client.closed = True


class FakeClient:
    def __init__(self, source: FakeSource) -> None:
        self._source = source
        self.size = len(source.data)
        self.export_name = source.export_name
        self.closed = False

    def _check_open(self) -> None:
        if self.closed or self._source.unreachable:
            self.closed = True
            raise ConnectionClosedError("fake connection dropped")

    async def pread_into(self, buffer: memoryview | bytearray, offset: int) -> None:
        source = self._source
        length = len(buffer)
        self._check_open()
        if offset + length > len(source.data):
            raise CommandError(22, "read beyond the end")
        with source._lock:
            source.read_requests.append((offset, length))
            source._in_flight += 1
        try:
            while not source._running.is_set():
                await trio.to_thread.run_sync(
                    source._running.wait, 0.05, abandon_on_cancel=True
                )
                self._check_open()
            if source.read_delay:
                await trio.sleep(source.read_delay)
            else:
                await trio.lowlevel.checkpoint()
            self._check_open()
            buffer[:] = source.data[offset:offset + length]
        finally:
            with source._lock:
                source._in_flight -= 1

    async def pread(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        await self.pread_into(buffer, offset)
        return bytes(buffer)

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> list[Extent]:
        self._check_open()
        await trio.lowlevel.checkpoint()
        end = min(offset + length, len(self._source.data))
        extents: list[Extent] = []
        position = offset
        for hole_offset, hole_length in self._source.holes:
            hole_end = hole_offset + hole_length
            if hole_end <= position or hole_offset >= end:
                continue
            if hole_offset > position:
                extents.append(Extent(position, hole_offset - position, 0))
                position = hole_offset
            stop = min(hole_end, end)
            extents.append(Extent(position, stop - position, 3))
            position = stop
        if position < end:
            extents.append(Extent(position, end - position, 0))
        return extents[:1] if req_one else extents

    async def iter_extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        for extent in await self.block_status(offset, length):
            yield extent

    async def disconnect(self) -> None:
        self.closed = True

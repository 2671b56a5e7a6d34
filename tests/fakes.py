"""An in-memory NBD source with the `nbdsrv.open_client` client API, for engine unit tests.

`FakeSource` holds the disk bytes, its holes (HOLE|ZERO, zeroed) and its unallocated runs
(HOLE only: the bytes stay, as over a backing file).  `FakeSource.open_client()` is an async
context manager yielding a `FakeClient` with the methods the engine uses (`size`, `export_name`,
`pread`, `pread_into`, `block_status`, `iter_extents`, `disconnect`), which behave like
`nbdsrv.Client`'s: tests/destination/test_source_conformance.py runs one suite against both (and
against nbdkit).  So a request outside the disk (or a block status of 0 bytes) is refused
locally with `LocalProtocolError`, as the real client does before anything is sent, and a
zero-length read sends nothing.  Hooks, settable from any thread:

- `pause()` / `resume()`: reads block (in a trio worker thread) until resumed, so a test can act
  while a fetch is provably in flight (`wait_reads_in_flight(n)` waits for that);
- `unreachable = True`: connecting raises `ConnectionRefusedError` and every pending or new
  request of an open client fails with `ConnectionClosedError`, like a dropped link (a crashed
  or stopped `postcopy serve`);
- `shutting_down = True`: like nbdkit after SIGTERM: connecting is refused and every new request
  of an open client is answered `CommandError(ESHUTDOWN)` (the connection stays up until the
  client drops it);
- `read_delay`: seconds every read takes, like a slow link;
- `read_requests`: every (offset, length) read, to count what crossed the "network".
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from nbdsrv.constants import BlockStatusFlag
from nbdsrv.errors import CommandError, ConnectionClosedError, LocalProtocolError
from nbdsrv.extent import Extent

HOLE_ONLY = int(BlockStatusFlag.HOLE)
HOLE_ZERO = int(BlockStatusFlag.HOLE | BlockStatusFlag.ZERO)


class FakeSource:
    def __init__(
        self,
        data: bytes,
        *,
        holes: list[tuple[int, int]] | None = None,
        unallocated: list[tuple[int, int]] | None = None,
        export_name: str = "",
    ) -> None:
        self.data = bytearray(data)
        # (offset, length, flags) runs of block status; everything else is data (flags 0)
        self.extent_runs = sorted(
            [(offset, length, HOLE_ZERO) for offset, length in holes or []]
            + [(offset, length, HOLE_ONLY) for offset, length in unallocated or []]
        )
        for offset, length in holes or []:
            self.data[offset:offset + length] = bytes(length)
        self.export_name = export_name
        self.unreachable = False
        self.shutting_down = False
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
        if self.unreachable or self.shutting_down:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused (fake)")
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
        if self._source.shutting_down:
            raise CommandError(errno.ESHUTDOWN, "the fake source is shutting down")

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise LocalProtocolError(
                f"{what} of {length} bytes at {offset} is outside the export ({self.size} bytes)"
            )

    async def pread_into(self, buffer: memoryview | bytearray, offset: int) -> None:
        source = self._source
        length = len(buffer)
        self._check_range(offset, length, "read")
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        self._check_open()
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
        self._check_range(offset, length, "block status")
        if length == 0:
            raise LocalProtocolError("block status of 0 bytes")
        self._check_open()
        await trio.lowlevel.checkpoint()
        end = offset + length
        extents: list[Extent] = []
        position = offset
        for run_offset, run_length, flags in self._source.extent_runs:
            run_end = run_offset + run_length
            if run_end <= position or run_offset >= end:
                continue
            if run_offset > position:
                extents.append(Extent(position, run_offset - position, 0))
                position = run_offset
            stop = min(run_end, end)
            extents.append(Extent(position, stop - position, flags))
            position = stop
        if position < end:
            extents.append(Extent(position, end - position, 0))
        return extents[:1] if req_one else extents

    async def iter_extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        self._check_range(offset, length, "block status")
        end = offset + length
        while offset < end:
            for extent in await self.block_status(offset, end - offset):
                yield extent
                offset = extent.end

    async def disconnect(self) -> None:
        self.closed = True

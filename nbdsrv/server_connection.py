"""The server's per-connection state and its send path.

`Connection` is what one connection's reader task and its request handlers share: the sans-IO
core, the stream, the send lock that keeps the chunks of one reply together on the wire, the
in-flight limits (a semaphore for requests, a `ByteBudget` for bytes of reads and writes), and
the cancel scopes the server uses to shut it down.  Sending: on a plain socket, replies go out
with os.writev (header and data buffers in one call, no copy) and READ data straight from the
file with os.sendfile, on the non-blocking descriptor, waiting with trio only when the socket is
full; any other stream (TLS, test streams) goes through `send_all`.  `BufferPool` recycles the
read buffers.  The server's logic (handshake, dispatch, backend calls) is nbdsrv.server.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from nbdsrv import server_core as core

if TYPE_CHECKING:
    from nbdsrv.server import Export, Server

_IOV_BATCH = 512  # buffers per sendmsg call (Linux IOV_MAX is 1024)


class BufferPool:
    """Reusable read buffers in power-of-two size classes (64 KiB up to 32 MiB); at most
    `keep_bytes` are kept for reuse, the rest is left to the garbage collector."""

    def __init__(self, keep_bytes: int = 64 * 1024 * 1024) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._keep_bytes = keep_bytes
        self._kept = 0

    @staticmethod
    def _class_of(size: int) -> int:
        return max(65536, 1 << (size - 1).bit_length())

    def get(self, size: int) -> bytearray:
        free = self._free.get(self._class_of(size))
        if free:
            buffer = free.pop()
            self._kept -= len(buffer)
            return buffer
        return bytearray(self._class_of(size))

    def put(self, buffer: bytearray) -> None:
        if self._kept + len(buffer) <= self._keep_bytes:
            self._free.setdefault(len(buffer), []).append(buffer)
            self._kept += len(buffer)


class ByteBudget:
    """At most `total` bytes of requests in flight; a bigger request waits for an empty budget."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.available = total
        self._waiters = trio.lowlevel.ParkingLot()

    async def acquire(self, amount: int) -> int:
        amount = min(amount, self.total)
        while self.available < amount:
            await self._waiters.park()
        self.available -= amount
        return amount

    def try_acquire(self, amount: int) -> int | None:
        """acquire() without waiting (and without a checkpoint); None if it would wait."""
        amount = min(amount, self.total)
        if self.available < amount:
            return None
        self.available -= amount
        return amount

    def release(self, amount: int) -> None:
        self.available += amount
        self._waiters.unpark_all()


class Connection:
    """The state a connection's reader and handlers share."""

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.core = core.ServerConnection(server.specs, tls=server.tls)
        self.send_lock = trio.Lock()
        self.socket: Any = getattr(stream, "socket", None)
        if self.socket is not None and self.socket.family == trio.socket.AF_UNIX:
            # The default (~200 KiB) splits every large reply into several sends and wakeups.
            with contextlib.suppress(OSError):
                self.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4 << 20)
        self.export: Export | None = None
        self.slots = trio.Semaphore(server.max_in_flight)
        self.budget = ByteBudget(server.max_bytes_in_flight)
        self.broken: BaseException | None = None
        self.nursery: trio.Nursery | None = None
        self.scope = trio.CancelScope()  # the whole connection (closed at once on shutdown)
        self.read_scope: trio.CancelScope | None = None  # a receive in transmission
        self.transmitting = False
        self.draining = False  # server shutdown: read no more requests

    def fail(self, exc: BaseException) -> None:
        """A send failed: the stream is unusable; stop the reader and every handler."""
        if self.broken is None:
            self.broken = exc
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def _lock_for_sending(self) -> None:
        try:
            self.send_lock.acquire_nowait()  # no checkpoint when nobody is sending
        except trio.WouldBlock:
            await self.send_lock.acquire()

    async def send_from_file(self, plan: Sequence[bytes | tuple[int, int]], fd: int) -> None:
        """Send a READ reply plan: header bytes from memory, data ranges with os.sendfile from
        `fd` (page cache to socket, no copy through Python).  Needs a plain socket."""
        stats = self.server.stats
        sock = self.socket
        await self._lock_for_sending()
        try:
            for piece in plan:
                if isinstance(piece, bytes):
                    await self._sendmsg_all([memoryview(piece)])
                    continue
                offset, length = piece
                while length:
                    try:
                        sent = os.sendfile(sock.fileno(), fd, offset, length)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                        continue
                    except OSError as exc:
                        raise trio.BrokenResourceError(f"sendfile failed: {exc}") from exc
                    if sent == 0:  # the file is shorter than the export: the reply is broken
                        raise trio.BrokenResourceError("export file shrank during a read")
                    stats.bytes_sent += sent
                    stats.sendfile_bytes += sent
                    offset += sent
                    length -= sent
        finally:
            self.send_lock.release()

    async def _sendmsg_all(self, pending: list[memoryview]) -> None:
        stats = self.server.stats
        sock = self.socket
        while pending:
            # os.writev on the non-blocking fd: trio's sock.sendmsg would add two trips through
            # the scheduler per reply; the send lock already gave a checkpoint.
            try:
                sent = os.writev(sock.fileno(), pending[:_IOV_BATCH])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            stats.bytes_sent += sent
            while sent:
                head = pending[0]
                if sent >= len(head):
                    sent -= len(head)
                    pending.pop(0)
                else:
                    pending[0] = head[sent:]
                    sent = 0

    async def send(self, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        stats = self.server.stats
        await self._lock_for_sending()
        try:
            if self.socket is None:
                for buffer in buffers:
                    await self.stream.send_all(buffer)
                    stats.bytes_sent += len(buffer)
                return
            await self._sendmsg_all([memoryview(b).cast("B") for b in buffers if len(b)])
        finally:
            self.send_lock.release()

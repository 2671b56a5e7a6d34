"""The trio NBD client: a thin shell around nbdsrv.client_core.

    async with nbdsrv.open_client("nbd+unix:///?socket=/run/disk.sock") as client:
        data = await client.pread(0, 65536)
        async for extent in client.iter_extents(0, client.size):
            ...

How it works.  `open_client` connects (TCP or Unix socket, see nbdsrv.uri), runs the handshake
(`ClientHandshake`), and starts one reader task per connection in a nursery it owns.  A request is
built by the connection's `ClientTransmission` (which registers its cookie) and sent under a send
lock, so frames never interleave; the caller then waits on its own waiter.  The reader receives
bytes (a READ's payload straight into the caller's buffer when the core says where it goes), feeds
the core, and sets the waiters of finished requests; replies may come in any order, and any number
of requests may be in flight.  Requests longer than the server's maximum payload are split and
pipelined.  With `connections=N` and a server that offers CAN_MULTI_CONN, a pool of N connections
is used, each request going to the one with the fewest requests in flight.

TLS: with `tls="require"` (the default for nbds:// URIs) or "on", each connection sends
NBD_OPT_STARTTLS first; on the server's ACK the stream is wrapped in a `trio.SSLStream` and the
handshake goes on over it (a TLS connection always uses the generic stream path, never the raw
socket).  Under "require" a server that refuses STARTTLS, a certificate that does not verify, or a
server that refuses ours (a TLS alert during haggling) is a NegotiationError: no plaintext ever.

Failure: a dropped connection or a protocol violation fails EVERY pending request at once (with
ConnectionClosedError or RemoteProtocolError), and every later request; a pool fails as a whole.
A server's error reply raises CommandError in the one caller; the connection stays usable.

Cancellation: every await is cancellable.  A request cancelled while queued for the send lock, or
blocked before its first byte went out, was never sent.  One cancelled halfway through its frame
(a large WRITE to a slow server) still sends the rest, as a half-sent frame cannot be taken back;
if the server makes no progress for HALF_SENT_GRACE seconds, the connection is failed.  A
request cancelled while waiting for its reply is abandoned: the core still parses its reply, and
discards it instead of writing into the caller's buffer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

from nbdsrv import constants as k
from nbdsrv.buffer import ReceiveBuffer
from nbdsrv.client_core import (
    MAX_EFFECT_LENGTH,
    ClientHandshake,
    ClientTransmission,
    NegotiatedExport,
    RequestFinished,
)
from nbdsrv.errors import (
    CommandError,
    ConnectionClosedError,
    LocalProtocolError,
    NBDError,
    NegotiationError,
    RemoteProtocolError,
)
from nbdsrv.extent import Extent
from nbdsrv.tls import client_ssl_context
from nbdsrv.uri import NBDAddress, parse_nbd_uri

RECEIVE_SIZE = 256 * 1024  # bytes asked of the socket per receive outside READ payloads
# With nothing buffered, receive at most a chunk header and a data offset: if a READ's payload
# follows, the core then points the next receive straight into the caller's buffer (no copies).
HEADER_RECEIVE = 28
SMALL_WRITE = 64 * 1024  # a WRITE payload up to this size goes out in one send with its header
HALF_SENT_GRACE = 1.0  # seconds without progress before a half-sent cancelled frame is given up
DISCONNECT_TIMEOUT = 5.0  # seconds to wait for the server to close after NBD_CMD_DISC

__all__ = ["Client", "ClientStatistics", "open_client"]

_Build = Callable[[ClientTransmission], tuple[int, bytes]]  # makes one request on a core


# Request builders as plain functions (partial() binds their arguments; the core comes last).
def _read(core: ClientTransmission, *, offset: int, target: memoryview) -> tuple[int, bytes]:
    return core.request_read(offset, target)


def _write(core: ClientTransmission, *, offset: int, length: int, fua: bool) -> tuple[int, bytes]:
    return core.request_write(offset, length, fua=fua)


def _trim(core: ClientTransmission, *, offset: int, length: int, fua: bool) -> tuple[int, bytes]:
    return core.request_trim(offset, length, fua=fua)


def _write_zeroes(
    core: ClientTransmission, *, offset: int, length: int, no_hole: bool, fua: bool
) -> tuple[int, bytes]:
    return core.request_write_zeroes(offset, length, no_hole=no_hole, fua=fua)


def _cache(core: ClientTransmission, *, offset: int, length: int) -> tuple[int, bytes]:
    return core.request_cache(offset, length)


@dataclass(frozen=True)
class ClientStatistics:
    connections: int
    in_flight: int  # requests sent and not yet answered
    requests: int  # requests sent since the client opened
    bytes_read: int  # READ payload bytes received
    bytes_written: int  # WRITE payload bytes sent
    command_errors: int  # requests the server failed (CommandError)
    data_chunks: int  # structured OFFSET_DATA chunks received
    hole_chunks: int  # structured OFFSET_HOLE chunks received (zero-filled locally)


class _Waiter:
    """One request's rendezvous between its caller and the reader: a trio.Event without its
    ParkingLot (the reader reschedules the single waiting task directly; a cheaper wake-up on
    every request)."""

    __slots__ = ("done", "error", "extents", "_task")

    def __init__(self) -> None:
        self.done = False
        self.error: NBDError | None = None
        self.extents: list[Extent] | None = None
        self._task: trio.lowlevel.Task | None = None

    def finish(self, error: NBDError | None, extents: list[Extent] | None = None) -> None:
        if self.done:
            return
        self.done, self.error, self.extents = True, error, extents
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def wait(self) -> None:
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


def _fresh(error: NBDError) -> NBDError:
    """A new exception of the same kind for each failed caller (one object raised in many tasks
    would collect all their tracebacks)."""
    if isinstance(error, CommandError):
        return CommandError(error.errno, error.message)
    if isinstance(error, NegotiationError):
        return NegotiationError(str(error), error.reply_type)
    return type(error)(str(error))


class _Connection:
    """One socket: its transmission core, send lock, waiters and reader task.

    On a socket, receives and sends use a non-blocking duplicate of its descriptor with
    trio.lowlevel.wait_readable/wait_writable: a receive or send that succeeds at once then costs
    no trip through the scheduler (trio's own socket methods yield once per call).  Any other
    trio Stream (memory streams in tests) goes through receive_some/send_all.

    The receive role.  Exactly one task receives at a time, named by `receiver`:
      "reader"  the reader task (the usual case, and always on non-socket streams);
      "idle"    nobody: nothing is in flight, the reader is parked (set by the reader only);
      "inline"  a caller whose request was the only one in flight when the connection was idle
                receives its own reply (no hop through the reader task: the queue-depth-1 case).
    Whoever gives the role up hands it to the reader if anything is still in flight (or a
    disconnect awaits its EOF), else leaves the connection idle.  A server that dies while the
    connection is idle is noticed by the next request."""

    def __init__(
        self, stream: trio.abc.Stream, core: ClientTransmission, on_failure: Callable[[], None]
    ) -> None:
        self.stream = stream
        self.raw: socket.socket | None = None
        if isinstance(stream, trio.SocketStream):
            self.raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
            self.raw.setblocking(False)
        self.core = core
        self.send_lock = trio.Lock()
        self.waiters: dict[int, _Waiter] = {}
        self.error: NBDError | None = None
        self.reader_scope = trio.CancelScope()
        self.reader_done = trio.Event()
        self.disconnected = False
        self.receiver = "reader"
        self._reader_task: trio.lowlevel.Task | None = None  # set while the reader is parked
        self._scratch = memoryview(bytearray(RECEIVE_SIZE))
        self._header_space = self._scratch[:HEADER_RECEIVE]
        self._on_failure = on_failure

    def fail(self, error: NBDError) -> None:
        """Fail every pending and later request with `error` and stop the reader."""
        if self.error is None:
            self.error = error
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            waiter.finish(_fresh(self.error))
        self.reader_scope.cancel()
        self._on_failure()

    def abandon(self, cookie: int) -> None:
        if self.waiters.pop(cookie, None) is not None:
            self.core.abandon(cookie)

    # -- the receive role ----------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self.core.in_flight or len(self.core.buffer) or self.disconnected)

    def wake_reader(self) -> None:
        """Give the receive role to the reader task (from "idle" or "inline")."""
        self.receiver = "reader"
        task, self._reader_task = self._reader_task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def release_receiver(self) -> None:
        """The inline receiver is done: hand over to the reader, or leave the connection idle."""
        if self._has_work():
            self.wake_reader()
        else:
            self.receiver = "idle"

    async def _park_reader(self) -> None:
        self._reader_task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._reader_task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def receive_once(self) -> bool:
        """Wait for bytes, feed them to the core and finish requests; True at a clean EOF."""
        core = self.core
        raw = self.raw
        if raw is None:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            count = len(data)
            if count:
                core.receive_data(data)
        else:
            while True:
                target = core.payload_target()
                try:
                    if target is None:  # see HEADER_RECEIVE
                        target = self._scratch if len(core.buffer) else self._header_space
                        count = raw.recv_into(target)
                        if count:
                            core.receive_data(target[:count])
                    else:
                        count = raw.recv_into(target)
                        if count:
                            core.payload_received(count)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(raw)
        if not count:
            core.receive_eof()  # raises ConnectionClosedError unless after NBD_CMD_DISC
            return True
        self._dispatch()
        return False

    async def receive_inline(self, cookie: int, waiter: _Waiter) -> list[Extent] | None:
        """Receive until `waiter` is done, as the inline receiver (see the class docstring)."""
        waited = False
        try:
            while not waiter.done:
                waited = True
                if await self.receive_once():
                    break
        except NBDError as exc:
            self.fail(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(ConnectionClosedError(f"connection lost: {exc}"))
        except BaseException:  # cancelled: the reader takes over, the reply is discarded
            if not waiter.done:
                self.abandon(cookie)
            if self.error is None:
                self.release_receiver()
            raise
        else:
            if self.error is None:
                self.release_receiver()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if not waiter.done:  # a clean EOF cannot leave a request pending; belt and braces
            self.fail(ConnectionClosedError("the connection is closed"))
        if waiter.error is not None:
            raise waiter.error
        return waiter.extents

    async def run_reader(self) -> None:
        raw = self.raw
        busy_rounds = 0  # receives in a row without parking: yield now and then (fairness)
        try:
            with self.reader_scope:
                self._dispatch()  # bytes that arrived with the end of the handshake
                while True:
                    if raw is not None:
                        if self.receiver != "reader":
                            await self._park_reader()
                            busy_rounds = 0
                            continue
                        if not self._has_work():
                            self.receiver = "idle"
                            continue
                    if await self.receive_once():
                        return
                    # Callers woken by _dispatch run when this task next waits; after a few
                    # receives in a row without waiting, yield so they can send more requests.
                    busy_rounds += 1
                    if busy_rounds >= 8:
                        busy_rounds = 0
                        await trio.lowlevel.checkpoint()
        except NBDError as exc:
            self.fail(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.fail(ConnectionClosedError(f"connection lost: {exc}"))
        finally:
            if self.error is None:
                # clean EOF after NBD_CMD_DISC, cancellation, or a bug: nobody may wait forever
                self.error = ConnectionClosedError("the connection is closed")
                self.fail(self.error)
            if raw is not None:
                trio.lowlevel.notify_closing(raw)  # wakes an inline receiver or a sender
                raw.close()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
            self.reader_done.set()

    def _dispatch(self) -> int:
        core = self.core
        waiters = self.waiters
        finished = 0
        while isinstance(event := core.next_event(), RequestFinished):  # until NEED_DATA
            waiter = waiters.pop(event.cookie, None)
            if waiter is None:
                continue  # abandoned by its caller
            waiter.finish(event.error, event.extents)
            finished += 1
        return finished

    async def _send(self, header: bytes, payload: memoryview | None) -> BaseException | None:
        """Send one frame whole (callers hold the send lock).

        Cancelled before its first byte went out, the Cancelled is raised and nothing happened.
        Cancelled halfway, the rest of the frame is still sent (a half-sent frame cannot be taken
        back), shielded but giving up on the connection after HALF_SENT_GRACE seconds without
        progress; the Cancelled is then returned for the caller to raise once the request is
        accounted for.  Non-socket streams shield the whole send instead."""
        raw = self.raw
        if raw is None:
            with trio.CancelScope(shield=True):
                if payload is None:
                    await self.stream.send_all(header)
                elif len(payload) <= SMALL_WRITE:
                    await self.stream.send_all(header + bytes(payload))
                else:
                    await self.stream.send_all(header)
                    await self.stream.send_all(payload)
            return None
        parts: list[bytes | memoryview] = [header] if payload is None else [header, payload]
        started = False
        deferred: BaseException | None = None
        while parts:
            try:
                sent = raw.sendmsg(parts) if len(parts) > 1 else raw.send(parts[0])
            except BlockingIOError:
                if deferred is None:
                    try:
                        await trio.lowlevel.wait_writable(raw)  # the server reads slowly
                    except BaseException as exc:
                        if not started:
                            raise
                        if not isinstance(exc, trio.Cancelled):  # KeyboardInterrupt...
                            self.fail(ConnectionClosedError("a request was interrupted half-sent"))
                            raise
                        deferred = exc
                    continue
                with trio.move_on_after(HALF_SENT_GRACE, shield=True) as grace:
                    await trio.lowlevel.wait_writable(raw)
                if grace.cancelled_caught:
                    self.fail(ConnectionClosedError("a request was cancelled half-sent"))
                    raise deferred from None
                continue
            started = True
            while parts and sent >= len(parts[0]):  # drop what went out, keep the rest
                sent -= len(parts[0])
                parts.pop(0)
            if parts and sent:
                parts[0] = memoryview(parts[0])[sent:]
        return deferred

    async def _acquire_send_lock(self) -> None:
        try:
            self.send_lock.acquire_nowait()  # uncontended: no trip through the scheduler
        except trio.WouldBlock:
            await self.send_lock.acquire()
        else:
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except BaseException:
                self.send_lock.release()
                raise

    async def submit(self, build: _Build, payload: memoryview | None = None) -> tuple[int, _Waiter]:
        """Build and send one request; returns its cookie and waiter (the reply may be pending)."""
        await self._acquire_send_lock()
        try:
            if self.error is not None:
                raise _fresh(self.error)
            cookie, header = build(self.core)
            waiter = _Waiter()
            self.waiters[cookie] = waiter
            try:
                deferred = await self._send(header, payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if self.error is None:
                    self.fail(ConnectionClosedError(f"connection lost while sending: {exc}"))
                raise waiter.error or _fresh(ConnectionClosedError("closed")) from None
            except BaseException:  # cancelled
                if self.error is None:  # before its first byte: withdraw the request
                    self.waiters.pop(cookie, None)
                    self.core.forget(cookie)
                raise
            if deferred is not None:  # cancelled halfway, sent whole: its reply is not wanted
                self.abandon(cookie)
                raise deferred
        finally:
            self.send_lock.release()
        return cookie, waiter

    async def wait(self, cookie: int, waiter: _Waiter) -> list[Extent] | None:
        if self.receiver == "idle":
            self.wake_reader()
        try:
            await waiter.wait()
        except BaseException:
            if not waiter.done:
                self.abandon(cookie)
            raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.extents

    async def send_disconnect(self) -> None:
        async with self.send_lock:
            if self.error is not None or self.disconnected:
                return
            self.disconnected = True
            header = self.core.request_disconnect()
            # the server may be gone already: nothing left to say goodbye to
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                deferred = await self._send(header, None)
                if deferred is not None:
                    raise deferred
            if self.receiver == "idle":
                self.wake_reader()  # to see the server's EOF


class Client:
    """A connected NBD client (make one with `open_client`).  See the module docstring."""

    def __init__(self, address: NBDAddress, export: NegotiatedExport) -> None:
        self.address = address
        self.export = export
        self.size = export.size
        self.export_name = export.export_name
        self.description = export.description
        self.transmission_flags = export.transmission_flags
        self.read_only = bool(export.transmission_flags & k.TransmissionFlag.READ_ONLY)
        self.can_multi_conn = bool(export.transmission_flags & k.TransmissionFlag.CAN_MULTI_CONN)
        self.block_size = export.block_size
        self.structured_replies = export.structured_replies
        self.has_base_allocation = export.has_base_allocation
        minimum, _, maximum = export.block_size
        self.max_request = max(minimum, maximum // minimum * minimum)
        self._connections: list[_Connection] = []
        self._requests = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._command_errors = 0
        self._closing = False

    # -- life cycle -----------------------------------------------------------------------------

    def _add_connection(self, connection: _Connection, nursery: trio.Nursery) -> None:
        self._connections.append(connection)
        nursery.start_soon(connection.run_reader)

    def _on_connection_failure(self) -> None:
        """One connection of a pool failed: the pool fails as a whole (the server is gone or
        broken, and callers should see one consistent state)."""
        for connection in self._connections:
            if connection.error is None:
                cause = next((c.error for c in self._connections if c.error is not None), None)
                connection.fail(ConnectionClosedError(f"another connection failed: {cause}"))

    async def disconnect(self) -> None:
        """Send NBD_CMD_DISC on every connection and wait (bounded) for the server to close.
        Requests still in flight are answered first by the server (spec: NBD_CMD_DISC)."""
        if self._closing:
            return
        self._closing = True
        with trio.move_on_after(DISCONNECT_TIMEOUT):  # a server that stopped reading: give up
            for connection in self._connections:
                await connection.send_disconnect()
            for connection in self._connections:
                await connection.reader_done.wait()
        self._close_now()

    def _close_now(self) -> None:
        self._closing = True
        for connection in self._connections:
            if connection.error is None:
                connection.fail(ConnectionClosedError("the client was closed"))
            connection.reader_scope.cancel()

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            connections=len(self._connections),
            in_flight=sum(len(c.waiters) for c in self._connections),
            requests=self._requests,
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            command_errors=self._command_errors,
            data_chunks=sum(c.core.data_chunks for c in self._connections),
            hole_chunks=sum(c.core.hole_chunks for c in self._connections),
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _pick(self) -> _Connection:
        connections = self._connections
        if len(connections) == 1:
            return connections[0]
        return min(connections, key=lambda c: len(c.waiters))

    async def _one(
        self,
        build: _Build,
        payload: memoryview | None = None,
    ) -> list[Extent] | None:
        connection = self._pick()
        cookie, waiter = await connection.submit(build, payload)
        self._requests += 1
        try:
            if connection.receiver == "idle" and connection.core.in_flight == 1:
                connection.receiver = "inline"  # the queue-depth-1 case: no reader hop
                return await connection.receive_inline(cookie, waiter)
            return await connection.wait(cookie, waiter)
        except CommandError:
            self._command_errors += 1
            raise

    async def _many(self, pieces: Sequence[tuple[_Build, memoryview | None]]) -> None:
        """Send several requests pipelined, then wait for all; the first error wins and the rest
        are abandoned."""
        submitted: list[tuple[_Connection, int, _Waiter]] = []
        try:
            for build, payload in pieces:
                connection = self._pick()
                cookie, waiter = await connection.submit(build, payload)
                self._requests += 1
                submitted.append((connection, cookie, waiter))
            for connection, cookie, waiter in submitted:
                await connection.wait(cookie, waiter)
        except BaseException as exc:
            if isinstance(exc, CommandError):
                self._command_errors += 1
            for connection, cookie, waiter in submitted:
                if not waiter.done:
                    connection.abandon(cookie)
            raise

    def _spans(self, offset: int, length: int, step: int) -> list[tuple[int, int]]:
        end = offset + length
        return [(start, min(step, end - start)) for start in range(offset, end, step)]

    # -- commands ------------------------------------------------------------------------------

    async def pread(self, offset: int, length: int) -> bytes:
        """Read `length` bytes at `offset` (holes read as zeroes)."""
        buffer = bytearray(length)
        await self.pread_into(buffer, offset)
        return bytes(buffer)

    async def pread_into(self, buffer: memoryview | bytearray, offset: int) -> None:
        """Fill the writable `buffer` with the bytes at `offset`."""
        view = memoryview(buffer)
        if view.readonly:
            raise TypeError("pread_into needs a writable buffer")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = len(view)
        if offset < 0 or offset + length > self.size:
            raise LocalProtocolError(
                f"read of {length} bytes at {offset} is outside the export ({self.size} bytes)"
            )
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        if length <= self.max_request:
            await self._one(lambda core: core.request_read(offset, view))
        else:
            pieces: list[tuple[_Build, memoryview | None]] = [
                (
                    partial(
                        _read, offset=start, target=view[start - offset : start - offset + size]
                    ),
                    None,
                )
                for start, size in self._spans(offset, length, self.max_request)
            ]
            await self._many(pieces)
        self._bytes_read += length

    async def pwrite(
        self, data: bytes | bytearray | memoryview, offset: int, *, fua: bool = False
    ) -> None:
        """Write `data` at `offset`; with `fua`, the data is durable when this returns."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = len(view)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        if length <= self.max_request:
            await self._one(lambda core: core.request_write(offset, length, fua=fua), view)
        else:
            self._check_range(offset, length, "write")
            pieces = [
                (
                    partial(_write, offset=start, length=size, fua=fua),
                    view[start - offset : start - offset + size],
                )
                for start, size in self._spans(offset, length, self.max_request)
            ]
            await self._many(pieces)
        self._bytes_written += length

    async def flush(self) -> None:
        """Make every write answered so far durable.  In a pool, one flush covers the writes of
        every connection: that is what the server's CAN_MULTI_CONN promises."""
        await self._one(lambda core: core.request_flush())

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._effect(offset, length, partial(_trim, fua=fua), "trim")

    async def write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
    ) -> None:
        await self._effect(
            offset,
            length,
            partial(_write_zeroes, no_hole=no_hole, fua=fua),
            "write-zeroes",
        )

    async def cache(self, offset: int, length: int) -> None:
        await self._effect(offset, length, _cache, "cache")

    async def _effect(
        self,
        offset: int,
        length: int,
        build: Callable[..., tuple[int, bytes]],
        what: str,
    ) -> None:
        """A command without payload that may be longer than one request can say (32 bits)."""
        self._check_range(offset, length, what)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        spans = self._spans(offset, length, MAX_EFFECT_LENGTH)
        if len(spans) == 1:
            await self._one(partial(build, offset=offset, length=length))
        else:
            await self._many([(partial(build, offset=o, length=n), None) for o, n in spans])

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise LocalProtocolError(
                f"{what} of {length} bytes at {offset} is outside the export ({self.size} bytes)"
            )

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> list[Extent]:
        """Extents of `base:allocation` from `offset`: contiguous, at least 1 byte, at most
        `length` (the server may answer for less).  Without base:allocation, one data extent."""
        self._check_range(offset, length, "block status")
        if length == 0:
            raise LocalProtocolError("block status of 0 bytes")
        length = min(length, MAX_EFFECT_LENGTH)
        if not self.has_base_allocation:
            await trio.lowlevel.checkpoint()
            return [Extent(offset, length, 0)]
        extents = await self._one(
            lambda core: core.request_block_status(offset, length, req_one=req_one)
        )
        assert extents is not None
        return extents

    async def iter_extents(self, offset: int, length: int) -> AsyncIterator[Extent]:
        """Every extent of [offset, offset+length), asking block status as often as needed."""
        self._check_range(offset, length, "block status")
        end = offset + length
        while offset < end:  # bounded: each answer covers at least one byte
            for extent in await self.block_status(offset, end - offset):
                yield extent
                offset = extent.end

    def __repr__(self) -> str:
        return f"<nbdsrv.Client {self.address.uri()} size={self.size}>"


async def _connect(address: NBDAddress) -> trio.abc.Stream:
    if address.transport == "unix":
        assert address.socket_path is not None
        return await trio.open_unix_socket(address.socket_path)
    assert address.host is not None
    stream = await trio.open_tcp_stream(address.host, address.port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return stream


@dataclass(frozen=True)
class _TLSSettings:
    """How a connection does STARTTLS: mode "off", "on" or "require" (see ClientHandshake)."""

    mode: str = "off"
    context: ssl.SSLContext | None = None
    server_hostname: str | None = None


async def _start_tls(stream: trio.abc.Stream, tls: _TLSSettings) -> trio.abc.Stream:
    """Wrap `stream` in TLS after the server acknowledged STARTTLS and run the TLS handshake; a
    failed one (the server's certificate does not verify, the server wants a client certificate
    we lack) is a NegotiationError."""
    assert tls.context is not None
    tls_stream = trio.SSLStream(stream, tls.context, server_hostname=tls.server_hostname)
    try:
        await tls_stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
        raise NegotiationError(f"TLS handshake failed: {reason or cause or exc}") from exc
    return tls_stream


async def _handshake(
    stream: trio.abc.Stream, export_name: str, tls: _TLSSettings = _TLSSettings()
) -> tuple[NegotiatedExport, ReceiveBuffer, trio.abc.Stream]:
    """Option haggling; returns the export, the bytes received past it and the stream to use
    from now on (a TLS stream after STARTTLS)."""
    buffer = ReceiveBuffer()
    handshake = ClientHandshake(export_name, buffer=buffer, tls=tls.mode)
    try:
        for _ in range(10_000):  # bounded: each round trip makes progress or the server closes
            if handshake.done:
                break
            data = await stream.receive_some(65536)
            if not data:
                handshake.receive_eof()
            handshake.receive_data(data)
            if handshake.tls_requested:
                stream = await _start_tls(stream, tls)
                handshake.tls_established()
            outgoing = handshake.data_to_send()
            if outgoing:
                await stream.send_all(outgoing)
        else:
            raise RemoteProtocolError("handshake did not finish")
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if not handshake.tls_active:  # a reset: callers handle NBDError and OSError only
            why = cause or exc
            raise ConnectionClosedError(f"connection lost during the handshake: {why}") from exc
        # With TLS 1.3 a server that refuses our certificate says so after its side of the
        # TLS handshake: as an alert on the first read.
        reason = getattr(cause, "reason", None) or cause or exc
        raise NegotiationError(f"TLS session failed during the handshake: {reason}") from exc
    return handshake.result, buffer, stream


StreamFactory = Callable[[], Awaitable[trio.abc.Stream]]


async def _open_connection(
    address: NBDAddress,
    connect: StreamFactory,
    on_failure: Callable[[], None],
    tls: _TLSSettings = _TLSSettings(),
) -> tuple[_Connection, NegotiatedExport]:
    stream = await connect()
    try:
        export, buffer, stream = await _handshake(stream, address.export_name, tls)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    core = ClientTransmission(export, buffer)
    return _Connection(stream, core, on_failure), export


@asynccontextmanager
async def open_client(
    uri_or_path: str,
    *,
    export_name: str | None = None,
    connections: int = 1,
    stream_factory: StreamFactory | None = None,
    tls: str | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    tls_hostname: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Client]:
    """Connect to an NBD export and yield a `Client`; disconnects on leaving.

    `uri_or_path`: nbd://host[:port][/export], nbd+unix:///export?socket=/path, or a socket path
    (ValueError when malformed).  `export_name` overrides the URI's.  `connections` > 1 opens a
    pool when the server offers CAN_MULTI_CONN (else one connection is used).
    `stream_factory`, when given, makes each connection instead of connecting to the URI's
    address (an async callable returning a connected trio Stream: tests, custom transports).

    TLS: `tls` is "off", "on" (STARTTLS, plaintext if the server refuses it) or "require"
    (STARTTLS or NegotiationError, never plaintext); by default "require" for nbds:// and
    nbds+unix:// URIs, else "off".  The server's certificate must chain to `tls_ca` (PEM; the
    system CAs when None) and name `tls_hostname` (default: the URI's host; a Unix socket has
    none, so without `tls_hostname` only the chain is checked).  `tls_cert`/`tls_key` are the
    client certificate for servers that verify peers.  `ssl_context` replaces all of these.
    Without any of them, a URI's `tls-certificates=DIR` (libnbd's convention) supplies
    DIR/ca-cert.pem and, when present, DIR/client-cert.pem and DIR/client-key.pem."""
    address = parse_nbd_uri(uri_or_path)
    if export_name is not None:
        address = dataclasses.replace(address, export_name=export_name)
    tls_settings = _tls_settings(
        address, tls, tls_ca, tls_cert, tls_key, tls_hostname, ssl_context
    )
    if connections < 1:
        raise ValueError(f"connections must be at least 1, not {connections}")
    connect: StreamFactory = stream_factory or partial(_connect, address)
    try:
        async with trio.open_nursery() as nursery:
            client: Client | None = None
            try:
                first, export = await _open_connection(
                    address, connect, lambda: None, tls_settings
                )
                client = Client(address, export)
                first._on_failure = client._on_connection_failure
                client._add_connection(first, nursery)
                if client.can_multi_conn:
                    for _ in range(connections - 1):
                        extra, other = await _open_connection(
                            address, connect, client._on_connection_failure, tls_settings
                        )
                        client._add_connection(extra, nursery)
                        if other.size != export.size:
                            raise RemoteProtocolError("the export changed size between connections")
                yield client
                with trio.CancelScope(shield=True):
                    await client.disconnect()
            finally:
                if client is not None:
                    client._close_now()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _tls_settings(
    address: NBDAddress,
    mode: str | None,
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    hostname: str | None,
    context: ssl.SSLContext | None,
) -> _TLSSettings:
    if mode is None:
        mode = "require" if address.tls else "off"
    if mode not in ("off", "on", "require"):
        raise ValueError(f"tls must be off, on or require, not {mode!r}")
    if address.tls and mode != "require":
        raise ValueError(f"an nbds URI requires TLS (tls={mode!r} given)")
    if mode == "off":
        if ca or cert or key or context:
            raise ValueError("TLS files or context given with tls='off'")
        return _TLSSettings()
    if hostname is None and address.transport == "tcp":
        hostname = address.host
    directory = address.tls_certificates
    if directory is not None and context is None and not (ca or cert or key):
        # libnbd's layout: the CA, and a client certificate when there is one
        ca = os.path.join(directory, "ca-cert.pem")
        if os.path.exists(os.path.join(directory, "client-cert.pem")):
            cert = os.path.join(directory, "client-cert.pem")
            key = os.path.join(directory, "client-key.pem")
    if context is None:
        context = client_ssl_context(
            ca_file=ca, cert_file=cert, key_file=key, check_hostname=hostname is not None
        )
    return _TLSSettings(mode, context, hostname)

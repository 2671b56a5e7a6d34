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

Where things are: this module holds the pool (`Client`) and the commands; one connection (send
lock, waiters, reader, the receive role) is nbdsrv.client_connection; opening one (connect,
STARTTLS, the handshake) is nbdsrv.client_connect; the protocol itself is the sans-IO
nbdsrv.client_handshake_core and nbdsrv.client_core.

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
if the server makes no progress for HALF_SENT_GRACE seconds (nbdsrv.client_connection), the
connection is failed.  A request cancelled while waiting for its reply is abandoned: the core
still parses its reply, and discards it instead of writing into the caller's buffer.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

from nbdsrv import constants as k
from nbdsrv.client_connect import StreamFactory, connect_address, open_connection, tls_settings
from nbdsrv.client_connection import Build, Connection, Waiter
from nbdsrv.client_core import (
    MAX_EFFECT_LENGTH,
    ClientTransmission,
    NegotiatedExport,
    OutgoingRequest,
)
from nbdsrv.errors import (
    CommandError,
    ConnectionClosedError,
    LocalProtocolError,
    RemoteProtocolError,
)
from nbdsrv.extent import Extent
from nbdsrv.state import TLSMode
from nbdsrv.uri import NBDAddress, parse_nbd_uri

DISCONNECT_TIMEOUT = 5.0  # seconds to wait for the server to close after NBD_CMD_DISC

__all__ = ["Client", "ClientStatistics", "StreamFactory", "open_client"]


# Request builders as plain functions (partial() binds their arguments; the core comes last).
def _read(core: ClientTransmission, *, offset: int, target: memoryview) -> OutgoingRequest:
    return core.request_read(offset, target)


def _write(core: ClientTransmission, *, offset: int, length: int, fua: bool) -> OutgoingRequest:
    return core.request_write(offset, length, fua=fua)


def _trim(core: ClientTransmission, *, offset: int, length: int, fua: bool) -> OutgoingRequest:
    return core.request_trim(offset, length, fua=fua)


def _write_zeroes(
    core: ClientTransmission, *, offset: int, length: int, no_hole: bool, fua: bool
) -> OutgoingRequest:
    return core.request_write_zeroes(offset, length, no_hole=no_hole, fua=fua)


def _cache(core: ClientTransmission, *, offset: int, length: int) -> OutgoingRequest:
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
        self._connections: list[Connection] = []
        self._requests = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._command_errors = 0
        self._closing = False

    # -- life cycle -----------------------------------------------------------------------------

    def _add_connection(self, connection: Connection, nursery: trio.Nursery) -> None:
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

    def _pick(self) -> Connection:
        connections = self._connections
        if len(connections) == 1:
            return connections[0]
        return min(connections, key=lambda c: len(c.waiters))

    async def _one(
        self,
        build: Build,
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

    async def _many(self, pieces: Sequence[tuple[Build, memoryview | None]]) -> None:
        """Send several requests pipelined, then wait for all; the first error wins and the rest
        are abandoned."""
        submitted: list[tuple[Connection, int, Waiter]] = []
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
            pieces: list[tuple[Build, memoryview | None]] = [
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
        build: Callable[..., OutgoingRequest],
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


@asynccontextmanager
async def open_client(
    uri_or_path: str,
    *,
    export_name: str | None = None,
    connections: int = 1,
    stream_factory: StreamFactory | None = None,
    tls: TLSMode | str | None = None,
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

    TLS: `tls` is a TLSMode, or "off", "on" (OPTIONAL: STARTTLS, plaintext if the server refuses
    it) or "require" (REQUIRED: STARTTLS or NegotiationError, never plaintext); by default
    "require" for nbds:// and
    nbds+unix:// URIs, else "off".  The server's certificate must chain to `tls_ca` (PEM; the
    system CAs when None) and name `tls_hostname` (default: the URI's host; a Unix socket has
    none, so without `tls_hostname` only the chain is checked).  `tls_cert`/`tls_key` are the
    client certificate for servers that verify peers.  `ssl_context` replaces all of these.
    Without any of them, a URI's `tls-certificates=DIR` (libnbd's convention) supplies
    DIR/ca-cert.pem and, when present, DIR/client-cert.pem and DIR/client-key.pem."""
    address = parse_nbd_uri(uri_or_path)
    if export_name is not None:
        address = dataclasses.replace(address, export_name=export_name)
    settings = tls_settings(address, tls, tls_ca, tls_cert, tls_key, tls_hostname, ssl_context)
    if connections < 1:
        raise ValueError(f"connections must be at least 1, not {connections}")
    connect: StreamFactory = stream_factory or partial(connect_address, address)
    try:
        async with trio.open_nursery() as nursery:
            client: Client | None = None
            try:
                first, export = await open_connection(
                    address, connect, lambda: None, settings
                )
                client = Client(address, export)
                first.on_failure = client._on_connection_failure
                client._add_connection(first, nursery)
                if client.can_multi_conn:
                    for _ in range(connections - 1):
                        extra, other = await open_connection(
                            address, connect, client._on_connection_failure, settings
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

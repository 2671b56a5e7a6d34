"""The trio NBD server: a thin shell that drives `nbdsrv.server_core` over sockets.

    exports = [Export("", FileBackend("disk.img"))]
    async with trio.open_nursery() as nursery:
        serving = await nursery.start(partial(serve_nbd, exports, socket_path="/run/d.sock"))
        print(serving.uris)

Per connection: the handshake runs under a timeout; then one reader task parses requests with the
sans-IO core and starts a handler task per request, so requests run concurrently and are answered
out of order.  Backpressure: the reader stops reading while `max_in_flight` requests, or
`max_bytes_in_flight` bytes of reads and writes, are being served.  A lock keeps the chunks of one
reply together on the wire.  Backend calls that may block run in worker threads
(`trio.to_thread.run_sync` under one CapacityLimiter per server).

The READ hot path, measured with bench/bench_server.py (a thread hop costs more than copying
256 KiB from the page cache, and a small send on a Unix socket costs a wakeup of the reader):
with structured replies the holes of the range are found first with SEEK_DATA/SEEK_HOLE and go
out as OFFSET_HOLE chunks, never read nor sent; when the data is in the page cache (probed with
RWF_NOWAIT) it goes from the file to the socket with os.sendfile; otherwise, for reads up to
INLINE_READ_MAX, what is cached is read in the event loop with preadv(RWF_NOWAIT) into a pooled
buffer and the rest (or all of a larger read) in a worker thread, and the reply goes out with
one writev (header + memoryview, no copy).  Sends use os.writev/os.sendfile on the non-blocking
fd and wait with trio only when the socket is full.

Where things are: this module is the server's logic (handshake, dispatch, backend calls, the
READ paths, `serve_nbd`); the state a connection's tasks share and the send path (writev,
sendfile, the send lock, the in-flight limits) are nbdsrv.server_connection; the listening
sockets are nbdsrv.listeners; the protocol is the sans-IO nbdsrv.server_core.

Failures stay per connection: a peer that breaks the protocol or vanishes loses its own connection
with one log line (logger "nbdsrv.server"); a backend OSError becomes an NBD error reply with the
nearest errno; an unexpected exception in a handler is logged and answered EIO.  TCP sockets get
TCP_NODELAY (trio's SocketStream sets it); Unix sockets are created mode 0600 (0660 with a group).

TLS (`Server(tls=TLSMode.OPTIONAL or REQUIRED, ssl_context=...)`): when the core acknowledges
NBD_OPT_STARTTLS, the ACK goes out in plaintext, the stream is wrapped in a
`trio.SSLStream(server_side=True)` and the TLS handshake runs (under the handshake timeout); the
core then restarts option haggling.  A failed TLS handshake (a client certificate from another
CA, or none when peers are verified) is a protocol error: the connection is closed, no option is
answered.  Under TLS every byte goes through the SSL stream: the sendfile and writev fast paths
are off for that connection (its `socket` is None), plaintext connections keep them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from nbdsrv import constants as k
from nbdsrv import server_core as core
from nbdsrv.backend import Backend
from nbdsrv.errors import ConnectionClosedError, RemoteProtocolError
from nbdsrv.extent import Extent
from nbdsrv.listeners import listener_uri, open_tcp_listener, open_unix_listener
from nbdsrv.server_connection import BufferPool, Connection

log = logging.getLogger("nbdsrv.server")

HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take to reach transmission
RECEIVE_SIZE = 256 * 1024
# Reads up to this size copy cached data in the event loop; larger ones are faster in a worker
# thread, where the copy can run on another core (measured: 1 MiB reads 1.1 vs 2.0 GiB/s).
INLINE_READ_MAX = 256 * 1024
_BUFFERED_COMMANDS = frozenset({k.Command.READ, k.Command.WRITE})  # count against the byte budget


@dataclass(frozen=True)
class Export:
    """One named export: the name clients ask for, and the disk behind it."""

    name: str
    backend: Backend
    description: str = ""

    def spec(self) -> core.ExportSpec:
        backend = self.backend
        size = backend.size
        return core.ExportSpec(
            name=self.name,
            size=size,
            read_only=backend.read_only,
            description=self.description,
            can_multi_conn=backend.can_multi_conn,
            # 512 keeps clients sector-aligned; an odd-sized image must allow byte access.
            minimum_block_size=512 if size % 512 == 0 else 1,
        )


@dataclass
class ServerStatistics:
    connections_accepted: int = 0
    connections_open: int = 0
    connections_failed: int = 0  # closed because the peer broke the protocol
    requests: int = 0
    requests_refused: int = 0
    bytes_sent: int = 0  # every byte written to clients, handshake included
    read_data_bytes: int = 0  # READ payload bytes sent as data
    read_hole_bytes: int = 0  # READ bytes described by OFFSET_HOLE chunks (not sent)
    sendfile_bytes: int = 0  # READ data sent with os.sendfile (plaintext connections only)
    tls_connections: int = 0  # connections that completed a TLS handshake
    commands: dict[str, int] = field(default_factory=dict)


class Server:
    """Serves `exports` to any number of connections; `handle_stream` serves one."""

    def __init__(
        self,
        exports: Sequence[Export],
        *,
        max_in_flight: int = 64,
        max_bytes_in_flight: int = 64 * 1024 * 1024,
        io_threads: int = 8,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        tls: core.TLSMode | str = core.TLSMode.OFF,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        names = [export.name for export in exports]
        if len(set(names)) != len(names):
            raise ValueError("two exports share one name")
        mode = core.TLSMode.parse(tls)
        if mode is not core.TLSMode.OFF and ssl_context is None:
            raise ValueError(f"TLS mode {mode.value} needs an ssl_context")
        self.tls = mode
        self.ssl_context = ssl_context
        self.exports = {export.name: export for export in exports}
        self.specs = {export.name: export.spec() for export in exports}
        self.max_in_flight = max_in_flight
        self.max_bytes_in_flight = max_bytes_in_flight
        self.handshake_timeout = handshake_timeout
        self.stats = ServerStatistics()
        self._io_limiter = trio.CapacityLimiter(io_threads)
        self._buffers = BufferPool()
        self._connections: set[Connection] = set()
        self._idle = trio.lowlevel.ParkingLot()
        self._shutting_down = False

    def statistics(self) -> ServerStatistics:
        return self.stats

    async def _run_io(self, function: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(function, *args, limiter=self._io_limiter)

    # -- one connection ----------------------------------------------------------------------

    async def handle_stream(self, stream: trio.abc.Stream, peer: str = "client") -> None:
        """Serve one connection until it ends; never raises (except Cancelled)."""
        stats = self.stats
        stats.connections_accepted += 1
        stats.connections_open += 1
        connection = Connection(self, stream, peer)
        self._connections.add(connection)
        try:
            with connection.scope:
                if self._shutting_down:
                    return
                opened = await self._handshake(connection)
                if opened is not None:
                    connection.transmitting = True
                    await self._transmission(connection, opened)
        except ConnectionClosedError as exc:
            log.debug("%s: %s", peer, exc)
        except RemoteProtocolError as exc:
            stats.connections_failed += 1
            log.warning("%s: protocol error, closing: %s", peer, exc)
        except trio.TooSlowError:
            stats.connections_failed += 1
            log.warning("%s: handshake not finished in %.0f s, closing", peer,
                        self.handshake_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("%s: connection lost: %s", peer, exc)
        except Exception as exc:  # a bug here must not take the server down
            stats.connections_failed += 1
            log.error("%s: internal error, closing: %r", peer, exc)
        finally:
            stats.connections_open -= 1
            self._connections.discard(connection)
            self._idle.unpark_all()
            await _close_stream(connection.stream, graceful=connection.broken is None)

    def begin_shutdown(self) -> None:
        """Stop taking requests: connections in transmission stop reading, finish the requests
        in flight and close (spec: "wait for inflight requests"); connections still in the
        handshake, and new ones, are closed at once."""
        self._shutting_down = True
        for connection in list(self._connections):
            connection.draining = True
            if not connection.transmitting:
                connection.scope.cancel()
            elif connection.read_scope is not None:
                connection.read_scope.cancel()

    async def wait_idle(self) -> None:
        """Wait until no connection is open (after begin_shutdown, until they have drained)."""
        while self._connections:
            await self._idle.park()

    async def _handshake(self, connection: Connection) -> core.ExportOpened | None:
        conn, stream = connection.core, connection.stream
        with trio.fail_after(self.handshake_timeout):
            while True:
                outgoing = conn.data_to_send()
                if outgoing:
                    await connection.send([outgoing])
                event = conn.next_event()
                if event is core.NEED_DATA:
                    _feed(conn, await stream.receive_some(65536))
                elif isinstance(event, core.ExportOpened):
                    await connection.send([conn.data_to_send()])
                    connection.export = self.exports[event.export.name]
                    log.debug("%s: export %r opened (structured=%s, block status=%s)",
                              connection.peer, event.export.name, event.structured_replies,
                              event.block_status)
                    return event
                elif isinstance(event, core.HandshakeEnded):
                    await connection.send([conn.data_to_send()])
                    level = logging.WARNING if event.refused else logging.DEBUG
                    log.log(level, "%s: handshake ended: %s", connection.peer, event.reason)
                    return None
                elif isinstance(event, core.TLSRequested):
                    await connection.send([conn.data_to_send()])  # the ACK, in plaintext
                    stream = await self._start_tls(connection)
                    conn.tls_established()
                    log.debug("%s: TLS established (%s)", connection.peer,
                              getattr(stream, "version", lambda: "?")())
                elif isinstance(event, core.OptionHandled):
                    log.debug("%s: %s -> %s %s", connection.peer, event.state,
                              _reply_name(event.reply_type), event.detail)

    async def _start_tls(self, connection: Connection) -> trio.SSLStream[trio.abc.Stream]:
        """Wrap the connection's stream in TLS and run the TLS handshake."""
        assert self.ssl_context is not None
        tls_stream = trio.SSLStream(connection.stream, self.ssl_context, server_side=True)
        connection.stream = tls_stream
        connection.socket = None  # every byte through the SSL stream: no sendfile/writev
        try:
            await tls_stream.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            reason = getattr(cause, "reason", None) or cause or "connection lost"
            raise RemoteProtocolError(f"TLS handshake failed: {reason}") from exc
        self.stats.tls_connections += 1
        return tls_stream

    async def _transmission(self, connection: Connection, opened: core.ExportOpened) -> None:
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            connection.nursery = nursery
            try:
                await self._read_requests(connection, nursery)
            except Exception as exc:  # re-raised below, outside the nursery's exception group
                failure = exc
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if connection.broken is not None:
            raise connection.broken

    async def _read_requests(self, connection: Connection, nursery: trio.Nursery) -> None:
        conn, stream = connection.core, connection.stream
        while True:
            event = conn.next_event()
            if event is core.NEED_DATA:
                if connection.broken is not None:
                    raise connection.broken
                if connection.draining:
                    return  # server shutdown: the nursery finishes the requests in flight
                with trio.CancelScope() as connection.read_scope:
                    _feed(conn, await stream.receive_some(RECEIVE_SIZE))
                connection.read_scope = None
                continue
            if isinstance(event, core.DisconnectRequested):
                log.debug("%s: NBD_CMD_DISC", connection.peer)
                return  # the nursery waits for the requests in flight
            if isinstance(event, core.CommandRefused):
                self.stats.requests_refused += 1
                reply = conn.error_reply(event.request, event.errno, event.message)
                if event.close_after:
                    await connection.send([reply])
                    raise RemoteProtocolError(
                        f"WRITE of {event.request.length} bytes refused ({event.message}), "
                        "too long to skip"
                    )
                await connection.slots.acquire()
                nursery.start_soon(self._send_refusal, connection, reply)
            elif isinstance(event, core.CommandReceived):
                # Fast paths without a checkpoint: a trip through the scheduler per request is
                # a measurable part of serving a cached 256 KiB read.
                try:
                    connection.slots.acquire_nowait()
                except trio.WouldBlock:
                    await connection.slots.acquire()
                command = event.request.command
                weight = event.request.length if command in _BUFFERED_COMMANDS else 0
                granted = connection.budget.try_acquire(weight)
                if granted is None:
                    granted = await connection.budget.acquire(weight)
                nursery.start_soon(self._serve_request, connection, event, granted)

    async def _send_refusal(self, connection: Connection, reply: bytes) -> None:
        try:
            await connection.send([reply])
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            connection.fail(exc)
        finally:
            connection.slots.release()

    async def _serve_request(
        self, connection: Connection, event: core.CommandReceived, granted: int
    ) -> None:
        request = event.request
        conn = connection.core
        self.stats.requests += 1
        name = _command_name(request.command)
        self.stats.commands[name] = self.stats.commands.get(name, 0) + 1
        buffer: bytearray | None = None
        try:
            try:
                if request.command == k.Command.READ:
                    holes = self._read_holes(connection, request)
                    if await self._send_read_from_file(connection, request, holes):
                        return
                    buffer = self._buffers.get(request.length)
                    reply = await self._read(connection, request, buffer, holes)
                elif request.command == k.Command.BLOCK_STATUS:
                    reply = [await self._block_status(connection, request)]
                else:
                    await self._execute(connection, request, event.payload)
                    reply = [conn.ok_reply(request)]
            except OSError as exc:
                code = exc.errno or errno.EIO
                reply = [conn.error_reply(request, code, exc.strerror or "I/O error")]
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise
            except Exception as exc:
                log.error("%s: %s failed unexpectedly: %r", connection.peer, name, exc)
                reply = [conn.error_reply(request, errno.EIO, "internal error")]
            await connection.send(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            connection.fail(exc)
        finally:
            if buffer is not None:
                self._buffers.put(buffer)
            connection.budget.release(granted)
            connection.slots.release()

    def _read_holes(self, connection: Connection, request: Any) -> list[Extent]:
        """The holes of a READ's range when they may be sent as OFFSET_HOLE chunks (structured
        replies, no DF), from SEEK_DATA/SEEK_HOLE; else none.  Past the extent limit, the rest
        of the range counts as data."""
        if not connection.core.structured_replies or request.flags & k.CommandFlag.DF:
            return []
        assert connection.export is not None
        extents = connection.export.backend.extents(request.offset, request.length, 256)
        holes = [e for e in extents if e.flags & k.BlockStatusFlag.ZERO]
        self.stats.read_hole_bytes += sum(h.length for h in holes)
        return holes

    async def _send_read_from_file(
        self, connection: Connection, request: Any, holes: list[Extent]
    ) -> bool:
        """The fastest path: data in the page cache goes from the file to the socket with
        sendfile.  False when it does not apply (TLS or a test stream, a backend without a
        file, data that is not cached)."""
        assert connection.export is not None
        if connection.socket is None:
            return False
        fd = connection.export.backend.sendfile_source(request.offset, request.length)
        if fd is None:
            return False
        plan = connection.core.read_reply_plan(request, holes)
        self.stats.read_data_bytes += sum(p[1] for p in plan if isinstance(p, tuple))
        await connection.send_from_file(plan, fd)
        return True

    async def _read(
        self, connection: Connection, request: Any, buffer: bytearray, holes: list[Extent]
    ) -> list[bytes | memoryview]:
        """Fill `buffer` for a READ and build its reply.  Data already in the page cache is
        read right here with RWF_NOWAIT (a thread hop costs more than the copy); only what
        would block goes to a worker thread."""
        assert connection.export is not None
        backend = connection.export.backend
        view = memoryview(buffer)[: request.length]
        offset, length = request.offset, request.length
        segments: list[tuple[int, int]] = []  # (offset in the file, length) to read
        position = offset
        for hole in holes:
            if hole.offset > position:
                segments.append((position, hole.offset - position))
            position = max(position, hole.end)
        if position < offset + length:
            segments.append((position, offset + length - position))
        missing: list[tuple[int, int]] = []
        for start, count in segments:
            part = view[start - offset : start - offset + count]
            done = backend.read_cached(start, part) if length <= INLINE_READ_MAX else 0
            if done < count:
                missing.append((start + done, count - done))
        if missing:

            def read_missing() -> None:
                for start, count in missing:
                    backend.read_into(start, view[start - offset : start - offset + count])

            await self._run_io(read_missing)
        self.stats.read_data_bytes += sum(count for _, count in segments)
        return connection.core.read_reply(request, view, holes)

    async def _block_status(self, connection: Connection, request: Any) -> bytes:
        assert connection.export is not None
        backend = connection.export.backend
        limit = 1 if request.flags & k.CommandFlag.REQ_ONE else core.MAX_BLOCK_STATUS_DESCRIPTORS
        extents = await self._run_io(backend.extents, request.offset, request.length, limit)
        return connection.core.block_status_reply(request, extents)

    async def _execute(self, connection: Connection, request: Any, payload: Any) -> None:
        assert connection.export is not None
        backend = connection.export.backend
        fua = bool(request.flags & k.CommandFlag.FUA)
        command = request.command
        if command == k.Command.WRITE:
            await self._run_io(backend.write, request.offset, payload, fua)
        elif command == k.Command.FLUSH:
            await self._run_io(backend.flush)
        elif command == k.Command.TRIM:
            await self._run_io(backend.trim, request.offset, request.length, fua)
        elif command == k.Command.WRITE_ZEROES:
            may_trim = not request.flags & k.CommandFlag.NO_HOLE
            fast_only = bool(request.flags & k.CommandFlag.FAST_ZERO)

            def zero() -> None:
                backend.write_zeroes(
                    request.offset, request.length, may_trim=may_trim, fast_only=fast_only,
                    fua=fua,
                )

            await self._run_io(zero)
        elif command == k.Command.CACHE:
            await self._run_io(backend.cache, request.offset, request.length)
        else:  # validate() admits nothing else
            raise OSError(errno.EINVAL, f"command {command} not implemented")

    # -- listening ---------------------------------------------------------------------------

    async def serve_listeners(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                await nursery.start(self._accept_loop, listener)
            task_status.started()

    async def _accept_loop(
        self, listener: trio.SocketListener, *, task_status: trio.TaskStatus[None]
    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: wait, do not die
                    log.error("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self.handle_stream, stream, _peer_name(stream))


def _feed(conn: core.ServerConnection, data: bytes | bytearray) -> None:
    """What a receive returned, for the core: bytes, or the end of input."""
    if data:
        conn.receive_data(data)
    else:
        conn.receive_eof()


async def _close_stream(stream: trio.abc.Stream, *, graceful: bool) -> None:
    """Close a connection's stream; a healthy TLS stream first sends close_notify (the spec's
    "close down the TLS session", bounded in time), everything else is closed at once."""
    if graceful and isinstance(stream, trio.SSLStream):
        with trio.move_on_after(1.0, shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()
                return
    await trio.aclose_forcefully(stream)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "client"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return f"unix:fd{stream.socket.fileno()}"


def _command_name(command: int) -> str:
    try:
        return k.Command(command).name
    except ValueError:
        return str(command)


def _reply_name(reply_type: int) -> str:
    try:
        return k.OptionReply(reply_type).name
    except ValueError:
        return str(reply_type)


@dataclass(frozen=True)
class Serving:
    """What serve_nbd hands to task_status.started()."""

    server: Server
    uris: list[str]


async def serve_nbd(
    exports: Sequence[Export],
    *,
    listen: tuple[str, int] | None = None,
    socket_path: str | None = None,
    socket_group: int | None = None,
    server: Server | None = None,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `exports` on a TCP address and/or a Unix socket (mode 0600, or 0660 owned by the
    gid `socket_group`) until cancelled; the socket file is removed on the way out.
    `task_status.started()` receives a `Serving`; its URIs are nbds:// when TLS is required."""
    if listen is None and socket_path is None:
        raise ValueError("serve_nbd needs listen= or socket_path=")
    server = server or Server(exports)
    listeners: list[trio.SocketListener] = []
    try:
        if socket_path is not None:
            listeners.append(await open_unix_listener(socket_path, group=socket_group))
        if listen is not None:
            listeners.append(await open_tcp_listener(*listen))
        tls = server.tls is core.TLSMode.REQUIRED
        uris = [listener_uri(listener, tls=tls) for listener in listeners]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_listeners, listeners)
            task_status.started(Serving(server, uris))
    finally:
        for listener in listeners:
            listener.socket.close()
        if socket_path is not None and listeners:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)

"""Connections to the source disk, kept alive across failures.

A `SourceLink` owns one NBD client connection to the source.  Its `run()` task connects (through
an opener: `nbdsrv.open_client` in production, a fake in tests), publishes the client, and waits
until a user reports it broken (`report_broken`); then it drops the connection at once (no
graceful NBD_CMD_DISC: the peer may be stalled) and reconnects with exponential backoff (0.05 s
doubling to 1 s).  Users call `await link.get()` for a connected client, so a fetch that failed on
a dropped connection simply asks again and is re-sent on the new one.  The engine keeps two
links: one for guest misses (so they never queue behind drain traffic) and one for the drain.

Stalls.  A source whose TCP connection is alive but that answers nothing is caught by deadlines:
the connection and handshake must finish within `connect_timeout`, and every request made through
`SourceLink.pread_into` / `SourceLink.extents` within `request_timeout`; a request past its
deadline reports the connection broken (`stalls` counts them), which fails every other request
pending on it, and all of them are re-sent on the next connection.  A server that answers
ESHUTDOWN is stopping (nbdkit does so until its clients leave): the same.  The server's other
error replies (CommandError) and requests the client refuses to send (LocalProtocolError: outside
the disk) are raised, since no connection would change them.

A source whose size differs from the disk is a fatal mismatch (`SourceMismatch`): the link stops.

`BlockingSource` is the other kind: a plain blocking connection (libnbd) that an nbdkit worker
thread uses to serve a guest miss itself, without the hop to the trio thread; it never reconnects
(on any error the engine drops it and falls back to its demand `SourceLink`).
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import trio

from nbdsrv.errors import CommandError, LocalProtocolError, NBDError
from nbdsrv.uri import NBDAddress
from postcopy.destination.settings import setting_default

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 1.0
DEFAULT_REQUEST_TIMEOUT: float = setting_default("request_timeout")
DEFAULT_CONNECT_TIMEOUT = 10.0


class SourceClient(Protocol):
    """The part of `nbdsrv`'s client that the engine uses."""

    size: int

    async def pread_into(self, buffer: memoryview | bytearray, offset: int) -> None: ...

    def iter_extents(self, offset: int, length: int) -> AsyncIterator[Any]: ...


SourceOpener = Callable[[], AbstractAsyncContextManager[Any]]


def nbd_source_opener(uri: str, export_name: str | None = None) -> SourceOpener:
    """An opener for a real NBD source (imports the client only when used)."""

    def open_source() -> AbstractAsyncContextManager[Any]:
        import nbdsrv

        open_client = nbdsrv.open_client
        if export_name is None:
            return open_client(uri)
        return open_client(uri, export_name=export_name)

    return open_source


class SourceMismatch(Exception):
    """The source is not the disk this destination belongs to."""


class SourceStalled(TimeoutError):
    """The source accepted a request (or a connection) and did not answer in time."""


class _LinkBroken(Exception):
    """Leaves the client's context without a graceful disconnect (the peer may be stalled)."""


class SourceLink:
    """One self-healing connection to the source."""

    def __init__(
        self,
        name: str,
        opener: SourceOpener,
        expected_size: int,
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.name = name
        self._opener = opener
        self._expected_size = expected_size
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.stalls = 0  # requests or connection attempts that hit their deadline
        self._client: Any = None
        self._connected = trio.Event()
        self._broken = trio.Event()
        self._retry = trio.Event()
        self.connects = 0
        self.last_error: str | None = None
        self.fatal_error: str | None = None
        self.down_since: float | None = None  # time.monotonic() when it went down

    @property
    def is_connected(self) -> bool:
        return self._client is not None

    async def get(self) -> Any:
        """A connected client; waits (cancellably) while the source is unreachable."""
        while self._client is None:
            if self.fatal_error is not None:
                raise SourceMismatch(self.fatal_error)
            await self._connected.wait()
        return self._client

    async def pread_into(self, buffer: memoryview | bytearray, offset: int) -> None:
        """Read from the source, re-sent over reconnects until it succeeds (callers bound the
        whole wait).  Each attempt has `request_timeout`; the server's own error reply
        (CommandError) and a fatal mismatch (SourceMismatch) are raised."""

        async def read(client: Any) -> None:
            await client.pread_into(buffer, offset)

        await self._retrying("reply to a read", read)

    async def extents(self, offset: int, length: int) -> list[Any]:
        """The source's block status for a range, retried like `pread_into`; CommandError when
        the source cannot answer it."""

        async def block_status(client: Any) -> list[Any]:
            return [extent async for extent in client.iter_extents(offset, length)]

        result: list[Any] = await self._retrying("block status", block_status)
        return result

    async def _retrying(self, what: str, request: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run `request(client)` until it succeeds: a stalled or broken connection is reported
        and the request is sent again on the next one."""
        while True:
            client = await self.get()
            try:
                with trio.fail_after(self.request_timeout):
                    return await request(client)
            except trio.TooSlowError:
                self.stalls += 1
                self.report_broken(
                    client,
                    SourceStalled(f"no {what} in {self.request_timeout:g}s"),
                    silent_for=self.request_timeout,
                )
            except CommandError as exc:
                if exc.errno != errno.ESHUTDOWN:
                    raise
                # the server is stopping (nbdkit answers so until its clients leave): let go
                # of it and re-send on the next connection
                self.report_broken(client, exc)
            except LocalProtocolError:
                raise  # refused before sending (outside the disk): no connection helps
            except (OSError, NBDError, trio.BrokenResourceError) as exc:
                self.report_broken(client, exc)
            await trio.lowlevel.checkpoint()

    def retry_now(self) -> None:
        """Cut the current back-off wait short: someone needs the source now."""
        self._retry.set()

    def report_broken(
        self, client: Any, error: BaseException, *, silent_for: float = 0.0
    ) -> None:
        """A call on `client` failed because the connection is unusable: reconnect.
        `silent_for`: how long the source has already been answering nothing (a stall)."""
        if client is self._client and client is not None:
            self.last_error = f"{type(error).__name__}: {error}"
            self._client = None  # get() waits for the reconnection from now on
            self._connected = trio.Event()
            self.down_since = time.monotonic() - silent_for
            self._broken.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, hold, reconnect; until cancelled or a fatal mismatch."""
        task_status.started()
        backoff = BACKOFF_FIRST_SECONDS
        self.down_since = time.monotonic()
        while True:
            try:
                # the deadline covers connecting and the handshake; it is lifted once connected
                connect_deadline = trio.current_time() + self.connect_timeout
                with trio.CancelScope(deadline=connect_deadline) as attempt:
                    async with self._opener() as client:
                        attempt.deadline = math.inf
                        if client.size != self._expected_size:
                            self.fatal_error = (
                                f"source size {client.size} differs from the disk size "
                                f"{self._expected_size}"
                            )
                            self._connected.set()  # wake waiters so they see the fatal error
                            return
                        self._client = client
                        self.connects += 1
                        self.down_since = None
                        backoff = BACKOFF_FIRST_SECONDS
                        self._connected.set()
                        try:
                            await self._broken.wait()
                        finally:
                            if self._client is client:
                                self._client = None
                                self._connected = trio.Event()
                                self.down_since = time.monotonic()
                            self._broken = trio.Event()
                        raise _LinkBroken  # close at once: no NBD_CMD_DISC to a stalled peer
                if attempt.cancelled_caught:
                    self.stalls += 1
                    self.last_error = (
                        f"SourceStalled: no NBD handshake within {self.connect_timeout:g}s"
                    )
            except _LinkBroken:
                pass
            except (OSError, NBDError, trio.BrokenResourceError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.debug("source link %s: %s", self.name, self.last_error)
            with trio.move_on_after(backoff):
                await self._retry.wait()
            self._retry = trio.Event()
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    def seconds_down(self) -> float:
        if self.down_since is None:
            return 0.0
        return max(0.0, time.monotonic() - self.down_since)


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class BlockingSource:
    """A blocking connection to the source, for one nbdkit worker thread at a time.

    Guest misses are served on the worker thread itself with it (no hop to the trio thread and
    back).  It is libnbd (python3-libnbd): its C client releases the GIL while it waits, so a
    worker thread blocked on the source does not hold up the trio thread.  Every wait is bounded:
    the handshake by `connect_timeout`, each read by `request_timeout` (`SourceStalled`).  It has
    no reconnect logic: on any error the caller drops it and uses a `SourceLink` instead.
    `lock` is held while the connection is in use, so that it can be closed from another thread.
    """

    def __init__(
        self,
        address: NBDAddress,
        export_name: str,
        size: int,
        *,
        connect_timeout: float,
        request_timeout: float,
    ) -> None:
        import nbd  # python3-libnbd (a Debian package); imported only when used

        self._nbd = nbd
        self.request_timeout = request_timeout
        self.lock = threading.Lock()
        self.closed = False
        handle = nbd.NBD()
        handle.set_export_name(export_name)
        if address.transport == "unix":
            handle.aio_connect_unix(address.socket_path)
        else:
            handle.aio_connect_tcp(address.host, str(address.port))
        self._handle: Any = handle
        try:
            self._wait(handle.aio_is_connecting, connect_timeout, "handshake", invert=True)
            if not handle.aio_is_ready():
                raise ConnectionError("source handshake failed")
            if handle.get_size() != size:
                raise SourceMismatch(f"the source's size is {handle.get_size()}, not {size}")
        except BaseException:
            self.close()
            raise

    def pread(self, length: int, offset: int) -> bytearray:
        """`length` bytes of the source at `offset` (raises on an error or past the deadline)."""
        handle = self._handle
        if handle is None:
            raise ConnectionError("source connection closed")
        buffer = self._nbd.Buffer(length)
        cookie = handle.aio_pread(buffer, offset)
        self._wait(lambda: handle.aio_command_completed(cookie), self.request_timeout, "read")
        result: bytearray = buffer.to_bytearray()
        return result

    def _wait(
        self, condition: Callable[[], Any], timeout: float, what: str, invert: bool = False
    ) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):  # bounded; each round waits for the socket or the deadline
            if bool(condition()) != invert:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._handle.poll(max(1, math.ceil(remaining * 1000)))
        raise SourceStalled(f"source {what}: no answer within {timeout:g} s")

    def close(self) -> None:
        """Drop the connection at once (no NBD_CMD_DISC: the peer may be stalled)."""
        self.closed = True
        self._handle = None  # libnbd closes the socket when the handle is freed

"""One client connection in transmission: its core, its send lock, and who receives replies.

A `Connection` owns one stream and the `ClientTransmission` core for it.  Callers build and send
requests under the send lock (`submit`), so frames never interleave, then wait on their own
`Waiter`; the reader task (`run_reader`) receives bytes, feeds the core and finishes the waiters
of the requests whose replies are complete.  A caller alone on an idle connection receives its
own reply (`receive_inline`), sparing a hop through the reader.  Any failure of the stream or
the protocol fails every pending and later request at once (`fail`).  The pool of connections and
the commands built on them are nbdsrv.client; opening one (connect, TLS, handshake) is
nbdsrv.client_connect.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable

import trio

from nbdsrv.client_core import ClientTransmission, OutgoingRequest
from nbdsrv.errors import CommandError, ConnectionClosedError, NBDError, NegotiationError
from nbdsrv.events import RequestFinished
from nbdsrv.extent import Extent

RECEIVE_SIZE = 256 * 1024  # bytes asked of the socket per receive outside READ payloads
# With nothing buffered, receive at most a chunk header and a data offset: if a READ's payload
# follows, the core then points the next receive straight into the caller's buffer (no copies).
HEADER_RECEIVE = 28
SMALL_WRITE = 64 * 1024  # a WRITE payload up to this size goes out in one send with its header
HALF_SENT_GRACE = 1.0  # seconds without progress before a half-sent cancelled frame is given up

Build = Callable[[ClientTransmission], OutgoingRequest]  # makes one request on a core


class Waiter:
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


def fresh_error(error: NBDError) -> NBDError:
    """A new exception of the same kind for each failed caller (one object raised in many tasks
    would collect all their tracebacks)."""
    if isinstance(error, CommandError):
        return CommandError(error.errno, error.message)
    if isinstance(error, NegotiationError):
        return NegotiationError(str(error), error.reply_type)
    return type(error)(str(error))


class Connection:
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
        self.waiters: dict[int, Waiter] = {}
        self.error: NBDError | None = None
        self.reader_scope = trio.CancelScope()
        self.reader_done = trio.Event()
        self.disconnected = False
        self.receiver = "reader"
        self._reader_task: trio.lowlevel.Task | None = None  # set while the reader is parked
        self._scratch = memoryview(bytearray(RECEIVE_SIZE))
        self._header_space = self._scratch[:HEADER_RECEIVE]
        self.on_failure = on_failure

    def fail(self, error: NBDError) -> None:
        """Fail every pending and later request with `error` and stop the reader."""
        if self.error is None:
            self.error = error
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            waiter.finish(fresh_error(self.error))
        self.reader_scope.cancel()
        self.on_failure()

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

    async def receive_inline(self, cookie: int, waiter: Waiter) -> list[Extent] | None:
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

    async def submit(self, build: Build, payload: memoryview | None = None) -> tuple[int, Waiter]:
        """Build and send one request; returns its cookie and waiter (the reply may be pending)."""
        await self._acquire_send_lock()
        try:
            if self.error is not None:
                raise fresh_error(self.error)
            cookie, header = build(self.core)
            waiter = Waiter()
            self.waiters[cookie] = waiter
            try:
                deferred = await self._send(header, payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if self.error is None:
                    self.fail(ConnectionClosedError(f"connection lost while sending: {exc}"))
                raise waiter.error or fresh_error(ConnectionClosedError("closed")) from None
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

    async def wait(self, cookie: int, waiter: Waiter) -> list[Extent] | None:
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

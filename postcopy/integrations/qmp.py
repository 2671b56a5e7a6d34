"""A small QMP (QEMU Machine Protocol) client on trio.

How it works: QMP is JSON objects, one per line, over a stream (here a Unix socket).  On connect
QEMU sends a greeting (`{"QMP": {...}}`); the client answers `qmp_capabilities` to leave
negotiation mode.  Then each command the client sends carries an `id`, and QEMU's answer
(`{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`) echoes it; asynchronous events
(`{"event": NAME, "data": ..., "timestamp": ...}`) may arrive in between at any time.

`QMPClient` keeps one reader task (in the nursery of `open_qmp`) that splits the byte stream into
lines (`QMPLineParser`, which does no I/O), hands each answer to the `execute` call waiting for
that id, and queues events for `next_event`/`wait_event`.  When the stream ends, every waiting and
later call raises `QMPConnectionError`.  Timeouts belong to the caller (`trio.fail_after`).

Errors:
    QMPError                    (a PostcopyError)
    ├── QMPConnectionError      the socket is gone, or the peer does not speak QMP
    └── QMPCommandError         QEMU refused a command; `.error_class` and `.description`
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from os import PathLike
from typing import Any

import trio

from postcopy.errors import PostcopyError

MAX_LINE_BYTES = 16 * 1024 * 1024  # QEMU's largest answers (query-qmp-schema) are a few MiB
MAX_QUEUED_EVENTS = 1000  # older events are dropped past this
NEGOTIATION_SECONDS = 10.0


class QMPError(PostcopyError):
    """Base of QMP failures."""


class QMPConnectionError(QMPError):
    """The QMP connection is closed, or the peer broke the protocol."""


class QMPCommandError(QMPError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"{command}: {error_class}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class QMPLineParser:
    """Splits received bytes into decoded JSON objects (one per line); does no I/O."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            line = bytes(self._buffer[:newline]).strip()
            del self._buffer[: newline + 1]
            if not line:
                continue
            try:
                message = json.loads(line)
            except ValueError as exc:
                raise QMPConnectionError(f"peer sent invalid JSON: {line[:80]!r}") from exc
            if not isinstance(message, dict):
                raise QMPConnectionError(f"peer sent a non-object: {line[:80]!r}")
            messages.append(message)
        if len(self._buffer) > MAX_LINE_BYTES:
            raise QMPConnectionError("peer sent an over-long line")
        return messages


@dataclass
class _PendingCommand:
    command: str
    done: trio.Event
    answer: dict[str, Any] | None = None


class QMPClient:
    """A negotiated QMP session; get one from `open_qmp` or `open_qmp_stream`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._parser = QMPLineParser()
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[str, _PendingCommand] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_QUEUED_EVENTS)
        self._event_arrived = trio.Event()
        self._closed_reason: str | None = None
        self.greeting: dict[str, Any] = {}

    @property
    def is_closed(self) -> bool:
        return self._closed_reason is not None

    def peer_pid(self) -> int | None:
        """The pid of the QEMU at the other end of a Unix socket (SO_PEERCRED), else None."""
        sock = getattr(self._stream, "socket", None)
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid = int(struct.unpack("3i", creds)[0])
        return pid if pid > 0 else None

    async def _read_greeting(self) -> None:
        while True:
            data = await self._stream.receive_some(65536)
            if not data:
                raise QMPConnectionError("connection closed before the QMP greeting")
            messages = self._parser.feed(data)
            if messages:
                break
        greeting = messages.pop(0)
        if "QMP" not in greeting:
            raise QMPConnectionError(f"peer did not greet with QMP: {str(greeting)[:80]}")
        self.greeting = greeting["QMP"]
        for message in messages:  # events can follow the greeting in the same read
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "event" in message:
            self._events.append(message)
            self._event_arrived.set()
            self._event_arrived = trio.Event()
            return
        message_id = message.get("id")
        pending = self._pending.pop(message_id, None) if isinstance(message_id, str) else None
        if pending is None:
            # An answer nobody waits for (its caller was cancelled): drop it.
            return
        pending.answer = message
        pending.done.set()

    def _close(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for pending in self._pending.values():
            pending.done.set()
        self._pending.clear()
        self._event_arrived.set()

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    data = await self._stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._close(f"connection lost: {exc}")
                    return
                if not data:
                    self._close("connection closed by QEMU")
                    return
                for message in self._parser.feed(data):
                    self._dispatch(message)
        except QMPConnectionError as exc:
            self._close(str(exc))
        finally:
            self._close("client closed")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its `return` value; raise `QMPCommandError` on refusal."""
        if self._closed_reason is not None:
            raise QMPConnectionError(f"{command}: {self._closed_reason}")
        message_id = f"postcopy-{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": message_id}
        if arguments:
            request["arguments"] = arguments
        pending = _PendingCommand(command=command, done=trio.Event())
        self._pending[message_id] = pending
        try:
            async with self._send_lock:
                try:
                    await self._stream.send_all(json.dumps(request).encode() + b"\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._close(f"connection lost: {exc}")
            await pending.done.wait()
        finally:
            self._pending.pop(message_id, None)
        answer = pending.answer
        if answer is None:
            raise QMPConnectionError(f"{command}: {self._closed_reason}")
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            raise QMPCommandError(
                command, str(error.get("class", "GenericError")), str(error.get("desc", ""))
            )
        return answer.get("return")

    async def next_event(self) -> dict[str, Any]:
        """The oldest queued event, waiting for one if none is queued."""
        while not self._events:
            if self._closed_reason is not None:
                raise QMPConnectionError(f"waiting for an event: {self._closed_reason}")
            await self._event_arrived.wait()
        return self._events.popleft()

    async def wait_event(self, name: str) -> dict[str, Any]:
        """Consume queued events until one named `name` arrives, and return it."""
        while True:
            event = await self.next_event()
            if event.get("event") == name:
                return event


@asynccontextmanager
async def open_qmp_stream(
    stream: trio.abc.Stream, negotiation_timeout: float = NEGOTIATION_SECONDS
) -> AsyncIterator[QMPClient]:
    """Negotiate QMP over `stream` and yield the client; closes the stream on exit.

    QEMU serves one client per monitor: a second client is accepted but greeted only when the
    first leaves, so negotiation gives up after `negotiation_timeout` seconds."""
    async with stream:
        client = QMPClient(stream)
        try:
            with trio.fail_after(negotiation_timeout):
                await client._read_greeting()
        except trio.TooSlowError:
            raise QMPConnectionError(
                f"no QMP greeting within {negotiation_timeout:g} s (another client connected?)"
            ) from None
        # The reader's nursery spans the caller's block.  An exception from that block is carried
        # out of the nursery and raised as itself, not wrapped in an ExceptionGroup (the reader
        # never raises, so the block's exception is the only one).
        block_error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                with trio.move_on_after(negotiation_timeout) as negotiation:
                    await client.execute("qmp_capabilities")
                if negotiation.cancelled_caught:
                    raise QMPConnectionError("no answer to qmp_capabilities")
                yield client
            except Exception as exc:
                block_error = exc
            finally:
                nursery.cancel_scope.cancel()
        if block_error is not None:
            raise block_error


@asynccontextmanager
async def open_qmp(
    socket_path: str | PathLike[str], negotiation_timeout: float = NEGOTIATION_SECONDS
) -> AsyncIterator[QMPClient]:
    """Connect to a QMP Unix socket (`-qmp unix:PATH,server=on,wait=off`) and negotiate."""
    try:
        stream = await trio.open_unix_socket(str(socket_path))
    except OSError as exc:
        raise QMPConnectionError(f"cannot connect to QMP socket {socket_path}: {exc}") from exc
    async with open_qmp_stream(stream, negotiation_timeout) as client:
        yield client

"""The NBD client's transmission phase, sans-IO: requests in, bytes out; bytes in, events out.

    core = ClientTransmission(handshake.result, handshake.buffer)
    cookie, header = core.request_read(offset, memoryview(buffer))   # an OutgoingRequest
    send(header)
    core.receive_data(received)               # core.receive_eof() when the server closed
    event = core.next_event()                 # NEED_DATA, or a RequestFinished

The handshake before it is nbdsrv.client_handshake_core (ClientHandshake and NegotiatedExport are
re-exported here); the reply parser's states are nbdsrv.state.ReplyState and its events are in
nbdsrv.events.  After an exception out of receive_data, receive_eof or next_event the core is in
ERROR and refuses every later call (nbdsrv.state.ProtocolCore); a request refused for its
arguments (outside the export, a flag not offered) changes nothing.

`ClientTransmission` builds request headers (cookies are a counter) and turns replies into
`RequestFinished` events.  A READ names the caller's writable buffer when it is sent, so its data
goes straight into the right slice: OFFSET_DATA payloads (and a simple reply's data, whose length
only the core knows from the request) are streamed into it, OFFSET_HOLE chunks zero-fill it.  The
shell may receive a data payload directly into `payload_target()` (no intermediate copy) and then
call `payload_received(n)`.  Every violation (unknown cookie, chunk outside its request, overlap,
gap, wrong context id, bad magic...) raises RemoteProtocolError: the connection is finished.
An abandoned request (the caller was cancelled) is still parsed to keep the stream in sync; its
data is discarded instead of written to a buffer the caller no longer owns.
"""

from __future__ import annotations

import bisect
import struct
from typing import NamedTuple

from nbdsrv import constants as k
from nbdsrv import wire
from nbdsrv.buffer import ReceiveBuffer
from nbdsrv.client_handshake_core import (
    DEFAULT_BLOCK_SIZE,
    MAX_OPTION_REPLY_LENGTH,
    ClientHandshake,
    NegotiatedExport,
)
from nbdsrv.errors import (
    CommandError,
    ConnectionClosedError,
    LocalProtocolError,
    RemoteProtocolError,
)
from nbdsrv.events import NEED_DATA, NeedData, RequestFinished
from nbdsrv.extent import Extent
from nbdsrv.state import ProtocolCore, ReplyState

__all__ = [
    "DEFAULT_BLOCK_SIZE", "MAX_CHUNK_LENGTH", "MAX_EFFECT_LENGTH", "MAX_OPTION_REPLY_LENGTH",
    "NEED_DATA", "ClientHandshake", "ClientTransmission", "NegotiatedExport", "OutgoingRequest",
    "RequestFinished",
]

MAX_CHUNK_LENGTH = 64 * 1024 * 1024  # a non-data structured chunk longer than this is refused
MAX_EFFECT_LENGTH = 0xFFFFFFFF & ~0xFFFFF  # trim / zero / cache / block status per request


class OutgoingRequest(NamedTuple):
    """A request the core registered: its cookie, and the header bytes the shell must send (a
    WRITE's payload follows the header on the wire)."""

    cookie: int
    header: bytes


class _Pending:
    """One request in flight."""

    __slots__ = (
        "command",
        "offset",
        "length",
        "target",
        "abandoned",
        "covered",
        "intervals",
        "error",
        "extents",
    )

    def __init__(self, command: int, offset: int, length: int, target: memoryview | None) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.target = target  # a READ's destination; None once abandoned
        self.abandoned = False
        self.covered = 0  # bytes of a structured READ accounted for by data and hole chunks
        self.intervals: list[tuple[int, int]] = []  # merged (start, end) already covered
        self.error: CommandError | None = None
        self.extents: list[Extent] | None = None


# Reply parser states (nbdsrv.state.ReplyState; a plain loop, not worth a table), bound to
# module names for the hot loop.
_HEADER = ReplyState.HEADER
_DATA_OFFSET = ReplyState.DATA_OFFSET
_DATA_PAYLOAD = ReplyState.DATA_PAYLOAD
_CHUNK_PAYLOAD = ReplyState.CHUNK_PAYLOAD
_ERROR = ReplyState.ERROR
_ZEROS = bytes(1024 * 1024)
_SIMPLE_MAGIC_BYTES = struct.pack(">I", k.SIMPLE_REPLY_MAGIC)
_STRUCTURED_MAGIC_BYTES = struct.pack(">I", k.STRUCTURED_REPLY_MAGIC)
_READ = int(k.Command.READ)
_BLOCK_STATUS = int(k.Command.BLOCK_STATUS)
_DONE = int(k.ReplyFlag.DONE)


class ClientTransmission(ProtocolCore):
    """Requests and replies of the transmission phase on one connection."""

    _error_state = _ERROR

    def __init__(self, export: NegotiatedExport, buffer: ReceiveBuffer | None = None) -> None:
        self.export = export
        self.buffer = buffer if buffer is not None else ReceiveBuffer()
        self.size = export.size
        self.flags = export.transmission_flags
        self.max_payload = export.block_size[2]
        self._structured = export.structured_replies
        self._context_id = export.meta_context_id
        self._next_cookie = 1
        self._pending: dict[int, _Pending] = {}
        self._disconnect_sent = False
        # reply parser
        self._state: ReplyState = _HEADER
        self._cookie = 0  # the reply being parsed
        self._request: _Pending | None = None
        self._chunk_flags = 0
        self._chunk_type = 0
        self._chunk_length = 0
        self._payload_view: memoryview | None = None  # where payload bytes go (None: discard)
        self._payload_remaining = 0
        self._simple_payload = False  # the payload is a simple reply's READ data
        self.data_chunks = 0  # NBD_REPLY_TYPE_OFFSET_DATA chunks received (for statistics)
        self.hole_chunks = 0  # NBD_REPLY_TYPE_OFFSET_HOLE chunks received

    # -- requests -------------------------------------------------------------------------------

    @property
    def state(self) -> ReplyState:
        return self._state

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def pending_cookies(self) -> list[int]:
        return list(self._pending)

    def _new_request(
        self, command: int, flags: int, offset: int, length: int, target: memoryview | None
    ) -> OutgoingRequest:
        if self._disconnect_sent:
            raise LocalProtocolError("request after NBD_CMD_DISC")
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        if command != k.Command.DISC:
            self._pending[cookie] = _Pending(command, offset, length, target)
        return OutgoingRequest(
            cookie, wire.build_request_header(wire.Request(flags, command, cookie, offset, length))
        )

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise LocalProtocolError(
                f"{what} of {length} bytes at {offset} is outside the export ({self.size} bytes)"
            )

    def _need(self, flag: k.TransmissionFlag, what: str) -> None:
        if not self.flags & flag:
            raise LocalProtocolError(f"the server does not offer {what}")

    def request_read(self, offset: int, target: memoryview) -> OutgoingRequest:
        """A READ of len(target) bytes at `offset`, whose data will be written into `target`."""
        if self._failure is not None:
            self._refuse("request_read")
        length = len(target)
        self._check_range(offset, length, "read")
        if not 0 < length <= self.max_payload:
            raise LocalProtocolError(f"read of {length} bytes (maximum {self.max_payload})")
        return self._new_request(_READ, 0, offset, length, target)

    def request_write(self, offset: int, length: int, *, fua: bool = False) -> OutgoingRequest:
        """The header of a WRITE; the shell sends the `length` payload bytes right after it."""
        if self._failure is not None:
            self._refuse("request_write")
        self._check_range(offset, length, "write")
        if self.flags & k.TransmissionFlag.READ_ONLY:
            raise LocalProtocolError("the export is read-only")
        if not 0 < length <= self.max_payload:
            raise LocalProtocolError(f"write of {length} bytes (maximum {self.max_payload})")
        return self._new_request(k.Command.WRITE, self._fua(fua), offset, length, None)

    def request_flush(self) -> OutgoingRequest:
        if self._failure is not None:
            self._refuse("request_flush")
        self._need(k.TransmissionFlag.SEND_FLUSH, "NBD_CMD_FLUSH")
        return self._new_request(k.Command.FLUSH, 0, 0, 0, None)

    def request_trim(self, offset: int, length: int, *, fua: bool = False) -> OutgoingRequest:
        if self._failure is not None:
            self._refuse("request_trim")
        self._check_effect(offset, length, "trim")
        if self.flags & k.TransmissionFlag.READ_ONLY:
            raise LocalProtocolError("the export is read-only")
        self._need(k.TransmissionFlag.SEND_TRIM, "NBD_CMD_TRIM")
        return self._new_request(k.Command.TRIM, self._fua(fua), offset, length, None)

    def request_write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
    ) -> OutgoingRequest:
        if self._failure is not None:
            self._refuse("request_write_zeroes")
        self._check_effect(offset, length, "write-zeroes")
        if self.flags & k.TransmissionFlag.READ_ONLY:
            raise LocalProtocolError("the export is read-only")
        self._need(k.TransmissionFlag.SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES")
        flags = self._fua(fua) | (k.CommandFlag.NO_HOLE if no_hole else 0)
        return self._new_request(k.Command.WRITE_ZEROES, flags, offset, length, None)

    def request_cache(self, offset: int, length: int) -> OutgoingRequest:
        if self._failure is not None:
            self._refuse("request_cache")
        self._check_effect(offset, length, "cache")
        self._need(k.TransmissionFlag.SEND_CACHE, "NBD_CMD_CACHE")
        return self._new_request(k.Command.CACHE, 0, offset, length, None)

    def request_block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> OutgoingRequest:
        if self._failure is not None:
            self._refuse("request_block_status")
        self._check_effect(offset, length, "block status")
        if self._context_id is None:
            raise LocalProtocolError("base:allocation was not negotiated")
        flags = k.CommandFlag.REQ_ONE if req_one else 0
        return self._new_request(_BLOCK_STATUS, flags, offset, length, None)

    def request_disconnect(self) -> bytes:
        """NBD_CMD_DISC: no reply comes; after it the server closes and no request may follow."""
        if self._failure is not None:
            self._refuse("request_disconnect")
        _, header = self._new_request(k.Command.DISC, 0, 0, 0, None)
        self._disconnect_sent = True
        return header

    def _check_effect(self, offset: int, length: int, what: str) -> None:
        self._check_range(offset, length, what)
        if not 0 < length <= 0xFFFFFFFF:
            raise LocalProtocolError(f"{what} of {length} bytes")

    def _fua(self, fua: bool) -> int:
        if not fua:
            return 0
        self._need(k.TransmissionFlag.SEND_FUA, "FUA")
        return int(k.CommandFlag.FUA)

    def abandon(self, cookie: int) -> None:
        """The caller gave up: parse the reply when it comes, but write nothing anywhere."""
        pending = self._pending.get(cookie)
        if pending is not None:
            pending.abandoned = True
            pending.target = None
            if self._request is pending:
                self._payload_view = None

    def forget(self, cookie: int) -> None:
        """Withdraw a request whose header was never sent (the send failed before any byte)."""
        self._pending.pop(cookie, None)

    # -- replies --------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the server (parsed by next_event)."""
        if self._state is _ERROR:
            self._refuse("receive_data")
        self.buffer.feed(data)

    def receive_eof(self) -> None:
        """The server closed its end.  Clean only after NBD_CMD_DISC with nothing pending;
        otherwise ConnectionClosedError (and the core is in ERROR)."""
        if self._state is _ERROR:
            self._refuse("receive_eof")
        error = None
        if self._pending or self._state is not _HEADER or len(self.buffer):
            error = ConnectionClosedError(
                f"server closed the connection with {len(self._pending)} request(s) pending"
            )
        elif not self._disconnect_sent:
            error = ConnectionClosedError("server closed the connection")
        if error is not None:
            self._enter_error(error)
            raise error

    def payload_target(self) -> memoryview | None:
        """Where the shell may receive the next bytes directly (a READ's data), or None."""
        if self._state is _DATA_PAYLOAD and not len(self.buffer) and self._payload_view is not None:
            return self._payload_view
        return None

    def payload_received(self, count: int) -> None:
        """`count` bytes were received straight into `payload_target()`."""
        if self._state is _ERROR:
            self._refuse("payload_received")
        view = self._payload_view
        assert view is not None and 0 < count <= self._payload_remaining
        self._payload_view = view[count:]
        self._payload_remaining -= count

    def next_event(self) -> RequestFinished | NeedData:
        """The next finished request, or NEED_DATA when more bytes are needed.  Raises
        RemoteProtocolError when the server broke the protocol (the core is then in ERROR)."""
        if self._state is _ERROR:
            self._refuse("next_event")
        try:
            return self._next_event()
        except Exception as exc:
            self._enter_error(exc)
            raise

    def _next_event(self) -> RequestFinished | NeedData:
        buffer = self.buffer
        while True:
            state = self._state
            if state is _DATA_PAYLOAD:
                if self._payload_remaining:
                    view = self._payload_view
                    if view is not None:
                        moved = buffer.take_into(view[: self._payload_remaining])
                        self._payload_view = view[moved:]
                    else:
                        moved = buffer.skip(self._payload_remaining)
                    self._payload_remaining -= moved
                    if self._payload_remaining:
                        return NEED_DATA
                self._state = _HEADER
                self._payload_view = None
                if self._simple_payload:
                    self._simple_payload = False
                    return self._finish(self._cookie)
                if self._chunk_flags & _DONE:
                    return self._finish(self._cookie)
                continue
            if state is _HEADER:
                magic = buffer.peek(4)
                if magic is None:
                    return NEED_DATA
                if magic == _SIMPLE_MAGIC_BYTES:
                    frame = buffer.take(wire.SIMPLE_REPLY_SIZE)
                    if frame is None:
                        return NEED_DATA
                    event = self._on_simple_reply(frame)
                    if event is not None:
                        return event
                    continue
                if magic == _STRUCTURED_MAGIC_BYTES:
                    frame = buffer.take(wire.STRUCTURED_REPLY_HEADER_SIZE)
                    if frame is None:
                        return NEED_DATA
                    self._on_chunk_header(frame)
                    continue
                raise RemoteProtocolError(f"bad reply magic 0x{magic.hex()}")
            if state is _DATA_OFFSET:
                frame = buffer.take(wire.OFFSET_DATA_HEADER_SIZE)
                if frame is None:
                    return NEED_DATA
                self._on_data_offset(frame)
                continue
            # _CHUNK_PAYLOAD
            frame = buffer.take(self._chunk_length)
            if frame is None:
                return NEED_DATA
            self._state = _HEADER
            self._on_chunk_payload(frame)
            if self._chunk_flags & _DONE:
                return self._finish(self._cookie)

    def _lookup(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise RemoteProtocolError(f"reply with unknown cookie {cookie}")
        return pending

    def _on_simple_reply(self, frame: bytes) -> RequestFinished | None:
        reply = wire.parse_simple_reply(frame)
        error, cookie = reply.error, reply.cookie
        pending = self._lookup(cookie)
        self._cookie = cookie
        self._request = pending
        if error:
            pending.error = _command_error(error, "")
            return self._finish(cookie)
        if pending.command == _READ:
            if self._structured:
                raise RemoteProtocolError("simple reply to a READ after structured replies")
            self._state = _DATA_PAYLOAD
            self._simple_payload = True
            self._payload_view = pending.target
            self._payload_remaining = pending.length
            pending.covered = pending.length
            return None
        if pending.command == _BLOCK_STATUS:
            raise RemoteProtocolError("successful simple reply to NBD_CMD_BLOCK_STATUS")
        return self._finish(cookie)

    def _on_chunk_header(self, frame: bytes) -> None:
        header = wire.parse_structured_reply_header(frame)
        flags, reply_type, length = header.flags, header.reply_type, header.length
        cookie = header.cookie
        if not self._structured:
            raise RemoteProtocolError("structured reply chunk without structured replies")
        pending = self._lookup(cookie)
        self._cookie = cookie
        self._request = pending
        self._chunk_flags = flags
        self._chunk_type = reply_type
        self._chunk_length = length
        if reply_type == k.ReplyType.OFFSET_DATA:
            if pending.command != _READ:
                raise RemoteProtocolError("NBD_REPLY_TYPE_OFFSET_DATA to a command that is no READ")
            if not wire.OFFSET_DATA_HEADER_SIZE < length <= 8 + pending.length:
                raise RemoteProtocolError(f"NBD_REPLY_TYPE_OFFSET_DATA chunk of {length} bytes")
            self._state = _DATA_OFFSET
            return
        if reply_type == k.ReplyType.NONE:
            if length:
                raise RemoteProtocolError(f"NBD_REPLY_TYPE_NONE with {length} bytes")
            if not flags & _DONE:
                raise RemoteProtocolError("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")
        elif reply_type == k.ReplyType.OFFSET_HOLE:
            if pending.command != _READ or length != 12:
                raise RemoteProtocolError("malformed or misplaced NBD_REPLY_TYPE_OFFSET_HOLE")
        elif reply_type == k.ReplyType.BLOCK_STATUS:
            if pending.command != _BLOCK_STATUS:
                raise RemoteProtocolError("NBD_REPLY_TYPE_BLOCK_STATUS to another command")
        elif not k.is_reply_error(reply_type):
            raise RemoteProtocolError(f"unknown structured reply type {reply_type}")
        if length > MAX_CHUNK_LENGTH:
            raise RemoteProtocolError(f"structured reply chunk of {length} bytes is too long")
        self._state = _CHUNK_PAYLOAD

    def _on_data_offset(self, frame: bytes) -> None:
        pending = self._request
        assert pending is not None
        start = wire.parse_offset_data_header(frame)
        count = self._chunk_length - wire.OFFSET_DATA_HEADER_SIZE
        self._claim(pending, start, count)
        self.data_chunks += 1
        self._state = _DATA_PAYLOAD
        self._payload_remaining = count
        target = pending.target
        if target is None:
            self._payload_view = None
        else:
            relative = start - pending.offset
            self._payload_view = target[relative : relative + count]

    def _on_chunk_payload(self, data: bytes) -> None:
        pending = self._request
        assert pending is not None
        reply_type = self._chunk_type
        if reply_type == k.ReplyType.NONE:
            return
        if reply_type == k.ReplyType.OFFSET_HOLE:
            start, count = wire.parse_offset_hole(data)
            self._claim(pending, start, count)
            self.hole_chunks += 1
            target = pending.target
            if target is not None:
                relative = start - pending.offset
                _zero_fill(target[relative : relative + count])
            return
        if reply_type == k.ReplyType.BLOCK_STATUS:
            self._on_block_status(pending, data)
            return
        # an error chunk (known or not): error, message, [offset]
        chunk = wire.parse_error_chunk(reply_type, data)
        if chunk.error == 0:
            raise RemoteProtocolError("error chunk with error value 0")
        if (
            chunk.offset is not None
            and pending.length
            and not (pending.offset <= chunk.offset < pending.offset + pending.length)
        ):
            raise RemoteProtocolError(f"error chunk offset {chunk.offset} outside the request")
        if pending.error is None:
            pending.error = _command_error(chunk.error, chunk.message)

    def _on_block_status(self, pending: _Pending, data: bytes) -> None:
        chunk = wire.parse_block_status(data)
        if pending.extents is not None:
            raise RemoteProtocolError("two NBD_REPLY_TYPE_BLOCK_STATUS chunks for one context")
        if chunk.context_id != self._context_id:
            raise RemoteProtocolError(
                f"block status for context id {chunk.context_id} not negotiated"
            )
        extents: list[Extent] = []
        offset = pending.offset
        end = offset + pending.length
        for length, flags in chunk.descriptors:
            if length == 0:
                raise RemoteProtocolError("block status extent of length 0")
            if offset < end:  # the last extent may reach past the request: clip it
                extents.append(Extent(offset, min(length, end - offset), flags))
            offset += length
        pending.extents = extents

    def _claim(self, pending: _Pending, start: int, count: int) -> None:
        """Record that [start, start+count) of a READ has been answered; refuse overlaps and
        ranges outside the request."""
        end = start + count
        if count <= 0 or start < pending.offset or end > pending.offset + pending.length:
            raise RemoteProtocolError(
                f"read chunk [{start}, {end}) outside the request "
                f"[{pending.offset}, {pending.offset + pending.length})"
            )
        intervals = pending.intervals
        index = bisect.bisect_left(intervals, (start, end))
        if index and intervals[index - 1][1] > start:
            raise RemoteProtocolError(f"read chunk at {start} overlaps an earlier chunk")
        if index < len(intervals) and intervals[index][0] < end:
            raise RemoteProtocolError(f"read chunk at {start} overlaps an earlier chunk")
        # insert, merging with touching neighbours so the list stays short
        if index and intervals[index - 1][1] == start:
            start = intervals[index - 1][0]
            index -= 1
            del intervals[index]
        if index < len(intervals) and intervals[index][0] == end:
            end = intervals[index][1]
            del intervals[index]
        intervals.insert(index, (start, end))
        pending.covered += count

    def _finish(self, cookie: int) -> RequestFinished:
        pending = self._pending.pop(cookie)
        self._request = None
        if pending.error is not None:
            return RequestFinished(cookie, pending.error, None, pending.abandoned)
        if pending.command == _READ and pending.covered != pending.length:
            raise RemoteProtocolError(
                f"READ reply covers {pending.covered} of {pending.length} bytes (a gap)"
            )
        if pending.command == _BLOCK_STATUS and not pending.extents:
            raise RemoteProtocolError("BLOCK_STATUS reply without extents")
        return RequestFinished(cookie, None, pending.extents, pending.abandoned)


def _command_error(wire_errno: int, message: str) -> CommandError:
    return CommandError(k.errno_from_wire(wire_errno), message)


def _zero_fill(view: memoryview) -> None:
    for start in range(0, len(view), len(_ZEROS)):
        piece = view[start : start + len(_ZEROS)]
        piece[:] = _ZEROS[: len(piece)]

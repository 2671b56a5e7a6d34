"""The server side of NBD as a sans-IO state machine: bytes in, events out; decisions in, bytes out.

    conn = ServerConnection({"": ExportSpec("", size=1 << 30, read_only=True)})
    send(conn.data_to_send())                 # the greeting
    conn.receive_data(received_bytes)         # conn.receive_eof() when the peer closed
    event = conn.next_event()                 # NEED_DATA, or one of the events below

The core does no I/O and never blocks.  It answers option haggling by itself from the export
catalogue it was given (pure data), queueing the replies for `data_to_send()`, and hands out
events for what the shell must act on: `ExportOpened` (transmission starts), `CommandReceived`
(a valid request, with a WRITE's payload), `CommandRefused` (an invalid one: the shell sends
`error_reply()`), `DisconnectRequested`, `TLSRequested` and `HandshakeEnded`.  A peer that breaks
the protocol so badly that the stream cannot be trusted makes `next_event()` raise
`RemoteProtocolError`; the shell logs it and closes the connection.

Reply bytes for transmission requests are built by methods (`ok_reply`, `error_reply`,
`read_reply`, `block_status_reply`) that the shell calls from concurrent handlers: they depend only
on what was negotiated, never on the receive state, so replies may go out in any order.

State machine: `ServerState` and its table `SERVER_TRANSITIONS` live in nbdsrv.state, with the
rule: a state changes only through `_transition(event_name)`, along an edge of that table; an
exception out of any call moves the core to ERROR (nbdsrv.state.ProtocolCore) and every later
call is refused.  The events are in nbdsrv.events.  The state an option is being answered in is
shown in logs as `NEWSTYLE.OPT_<NAME>`.

Transmission validation (NBD spec "Error values", "Request types", "Block size constraints"), in
this order: unknown command -> EINVAL; a flag the command does not take or that was not
negotiated -> EINVAL; a write-type command on a read-only export -> EPERM; zero length -> EINVAL;
a READ or WRITE over the 32 MiB maximum payload -> EINVAL (EOVERFLOW for a READ with DF, as the
spec asks); a range past the end -> ENOSPC for WRITE and WRITE_ZEROES, EINVAL for the others;
offset or length not a multiple of the minimum block size -> EINVAL (only when the client asked
for NBD_INFO_BLOCK_SIZE and so agreed to honour it); BLOCK_STATUS without a negotiated meta
context -> EINVAL; FLUSH with a non-zero offset or length (reserved fields) -> EINVAL.
Refused writes: a WRITE whose length is at most the maximum payload has its payload read and thrown
away, so the stream stays in sync.  A longer one (say 4 GiB) is answered EINVAL and the
connection is then closed (`CommandRefused.close_after`): reading gigabytes only to drop them
would let one client tie up the server.

TLS (issue 7) has its seam here: with `tls=TLSMode.OFF` STARTTLS gets ERR_POLICY.  With OPTIONAL
or REQUIRED the core acknowledges STARTTLS, emits `TLSRequested`, and waits until the shell has
wrapped the stream and calls `tls_established()`; REQUIRED refuses every other option with
ERR_TLS_REQD (and closes on EXPORT_NAME) until then.  Once TLS is up, haggling restarts from
scratch (options negotiated before STARTTLS are forgotten) and a second STARTTLS gets ERR_INVALID.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nbdsrv import constants as k
from nbdsrv import wire
from nbdsrv.buffer import ReceiveBuffer
from nbdsrv.errors import ConnectionClosedError, LocalProtocolError, RemoteProtocolError
from nbdsrv.events import (
    NEED_DATA,
    CommandReceived,
    CommandRefused,
    DisconnectRequested,
    ExportOpened,
    HandshakeEnded,
    NeedData,
    OptionHandled,
    ServerEvent,
    TLSRequested,
)
from nbdsrv.extent import Extent
from nbdsrv.state import SERVER_TRANSITIONS, QueueingCore, ServerState, TLSMode

__all__ = [  # the events and states are re-exported: `server_core.ExportOpened` keeps working
    "BASE_ALLOCATION_CONTEXT_ID", "MAX_BLOCK_STATUS_DESCRIPTORS", "NEED_DATA", "CommandReceived",
    "CommandRefused", "DisconnectRequested", "Event", "ExportOpened", "ExportSpec",
    "HandshakeEnded", "NeedData", "OptionHandled", "Refusal", "ServerConnection", "State",
    "TLSMode", "TLSRequested",
]

Event = ServerEvent
State = ServerState  # the server's states (nbdsrv.state); the old name stays


BASE_ALLOCATION_CONTEXT_ID = 1  # the id we give base:allocation in SET_META_CONTEXT replies
MAX_BLOCK_STATUS_DESCRIPTORS = 1024  # a reply may describe less than asked (spec allows it);
# construct builds 1024 descriptors in ~7 ms, in the event loop: keep replies bounded


@dataclass(frozen=True)
class ExportSpec:
    """What the handshake tells a client about one export (capabilities, not the data)."""

    name: str
    size: int
    read_only: bool = True
    description: str = ""
    can_flush: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    can_multi_conn: bool = True
    minimum_block_size: int = 1
    preferred_block_size: int = k.DEFAULT_PREFERRED_BLOCK
    maximum_payload: int = k.MAX_PAYLOAD

    def transmission_flags(self, structured_replies: bool) -> int:
        flags = k.TransmissionFlag.HAS_FLAGS
        if self.read_only:
            flags |= k.TransmissionFlag.READ_ONLY
        else:
            if self.can_flush:
                flags |= k.TransmissionFlag.SEND_FLUSH | k.TransmissionFlag.SEND_FUA
            if self.can_trim:
                flags |= k.TransmissionFlag.SEND_TRIM
            if self.can_zero:
                flags |= k.TransmissionFlag.SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    flags |= k.TransmissionFlag.SEND_FAST_ZERO
        if structured_replies:
            flags |= k.TransmissionFlag.SEND_DF
        if self.can_multi_conn:
            flags |= k.TransmissionFlag.CAN_MULTI_CONN
        if self.can_cache:
            flags |= k.TransmissionFlag.SEND_CACHE
        return int(flags)




_MID_FRAME_STATES = frozenset({State.RECV_WRITE_PAYLOAD, State.DISCARD_WRITE_PAYLOAD})


class Refusal(NamedTuple):
    """Why a transmission request must be refused: the errno for its error reply, and a message."""

    errno: int
    message: str
_KNOWN_CLIENT_FLAGS = int(k.ClientFlag.FIXED_NEWSTYLE | k.ClientFlag.NO_ZEROES)
_ALL_COMMAND_FLAGS = int(
    k.CommandFlag.FUA
    | k.CommandFlag.NO_HOLE
    | k.CommandFlag.DF
    | k.CommandFlag.REQ_ONE
    | k.CommandFlag.FAST_ZERO
)
# Flags each command may carry besides FUA (spec "Command flags").
_COMMAND_FLAGS: dict[int, int] = {
    k.Command.READ: int(k.CommandFlag.DF),
    k.Command.WRITE: 0,
    k.Command.DISC: 0,
    k.Command.FLUSH: 0,
    k.Command.TRIM: 0,
    k.Command.CACHE: 0,
    k.Command.WRITE_ZEROES: int(k.CommandFlag.NO_HOLE | k.CommandFlag.FAST_ZERO),
    k.Command.BLOCK_STATUS: int(k.CommandFlag.REQ_ONE),
}
_WRITE_COMMANDS = frozenset({k.Command.WRITE, k.Command.TRIM, k.Command.WRITE_ZEROES})


@dataclass
class _Negotiated:
    structured_replies: bool = False
    no_zeroes: bool = False
    tls_active: bool = False
    meta_export: str | None = None  # export named by the last SET_META_CONTEXT
    base_allocation: bool = False  # base:allocation selected by it
    export: ExportSpec | None = None
    block_status: bool = False
    block_size_agreed: bool = False  # the client asked for NBD_INFO_BLOCK_SIZE
    transmission_flags: int = 0


class ServerConnection(QueueingCore):
    """One client connection, from the greeting to the end of transmission."""

    _error_state = State.ERROR

    def __init__(
        self,
        exports: Mapping[str, ExportSpec],
        *,
        tls: TLSMode | str = TLSMode.OFF,
        max_option_length: int = k.MAX_OPTION_LENGTH,
    ) -> None:
        self._exports = dict(exports)
        self._tls = TLSMode.parse(tls)
        self._max_option_length = max_option_length
        self._buffer = ReceiveBuffer()
        self._outgoing = bytearray(
            wire.build_server_greeting(
                int(k.HandshakeFlag.FIXED_NEWSTYLE | k.HandshakeFlag.NO_ZEROES)
            )
        )
        self._state: State = State.RECV_CLIENT_FLAGS
        self._peer_closed = False
        self._negotiated = _Negotiated()
        self._pending_write: wire.Request | None = None
        self._discard_left = 0

    # -- introspection ---------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def export(self) -> ExportSpec | None:
        return self._negotiated.export

    @property
    def structured_replies(self) -> bool:
        return self._negotiated.structured_replies

    # -- I/O boundary ----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer (an empty value feeds nothing; see receive_eof)."""
        if self._failure is not None:
            self._refuse("receive_data")
        if self._peer_closed:
            self._enter_error(LocalProtocolError("receive_data() after receive_eof()"))
            self._refuse("receive_data")
        self._buffer.feed(data)

    def receive_eof(self) -> None:
        """The peer closed its side; next_event() then raises once the buffer is used up."""
        if self._failure is not None:
            self._refuse("receive_eof")
        self._peer_closed = True

    def tls_established(self) -> None:
        """The shell has finished the TLS handshake after a TLSRequested event.  Option haggling
        starts over: what was negotiated in plaintext (structured replies, meta contexts) is
        forgotten, as a man in the middle may have chosen it; only the client flags stay."""
        if self._failure is not None:
            self._refuse("tls_established")
        try:
            self._transition("tls_established")
        except Exception as exc:
            self._enter_error(exc)
            raise
        self._negotiated = _Negotiated(no_zeroes=self._negotiated.no_zeroes, tls_active=True)

    @property
    def tls_active(self) -> bool:
        return self._negotiated.tls_active

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA.  Raises RemoteProtocolError when the peer broke the
        protocol or vanished mid-frame, ConnectionClosedError when it closed between frames;
        either way the connection is over (the core is then in ERROR)."""
        if self._failure is not None:
            self._refuse("next_event")
        if self._state is State.TLS_HANDSHAKE:  # refused before anything changed: not an error
            raise LocalProtocolError("next_event() while waiting for tls_established()")
        try:
            return self._next_event()
        except Exception as exc:
            self._enter_error(exc)
            raise

    def _next_event(self) -> Event | NeedData:
        while True:
            state = self._state
            result: Event | NeedData | None
            if state is State.CLOSED:
                raise LocalProtocolError("next_event() on a closed connection")
            if state is State.RECV_CLIENT_FLAGS:
                result = self._receive_client_flags()
            elif state is State.RECV_OPTION:
                result = self._receive_option()
            elif state is State.TLS_HANDSHAKE:  # only when reached inside this loop: a bug
                raise LocalProtocolError("waiting for tls_established()")
            elif state is State.RECV_REQUEST:
                result = self._receive_request()
            elif state is State.RECV_WRITE_PAYLOAD:
                result = self._receive_write_payload()
            else:
                result = self._discard_write_payload()
            if result is None:
                continue  # progress without an event (client flags, a discarded payload)
            if result is NEED_DATA and self._peer_closed:
                if len(self._buffer) or state in _MID_FRAME_STATES:
                    raise RemoteProtocolError(f"peer vanished mid-frame in {state.value}")
                raise ConnectionClosedError(f"peer closed the connection in {state.value}")
            return result

    def _transition(self, event_name: str) -> None:
        try:
            self._state = SERVER_TRANSITIONS[self._state][event_name]
        except KeyError:
            raise LocalProtocolError(
                f"no transition {event_name!r} from {self._state.value}"
            ) from None

    # -- handshake -------------------------------------------------------------------------

    def _receive_client_flags(self) -> NeedData | None:
        data = self._buffer.take(wire.CLIENT_FLAGS_SIZE)
        if data is None:
            return NEED_DATA
        flags = wire.parse_client_flags(data)
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise RemoteProtocolError(f"unknown client flags 0x{flags:08x}")
        self._negotiated.no_zeroes = bool(flags & k.ClientFlag.NO_ZEROES)
        self._transition("client_flags")
        return None

    def _receive_option(self) -> Event | NeedData:
        header_bytes = self._buffer.peek(wire.OPTION_HEADER_SIZE)
        if header_bytes is None:
            return NEED_DATA
        header = wire.parse_option_header(header_bytes)
        if header.length > self._max_option_length:
            raise RemoteProtocolError(
                f"option {header.option} with {header.length} bytes of data (limit "
                f"{self._max_option_length})"
            )
        if len(self._buffer) < wire.OPTION_HEADER_SIZE + header.length:
            return NEED_DATA
        self._buffer.skip(wire.OPTION_HEADER_SIZE)
        data = self._buffer.take(header.length) or b""
        return self._answer_option(header.option, data)

    def _reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self._outgoing += wire.build_option_reply(option, reply_type, data)

    def _error(self, option: int, reply_type: int, message: str) -> OptionHandled:
        text = message.encode("utf-8")[:256].decode("utf-8", "ignore")  # short, valid UTF-8
        self._reply(option, reply_type, text.encode("utf-8"))
        self._transition("option_answered")
        return OptionHandled(_option_state(option), option, reply_type, message)

    def _answer_option(self, option: int, data: bytes) -> Event:
        neg = self._negotiated
        tls_missing = self._tls is TLSMode.REQUIRED and not neg.tls_active
        if option == k.Option.EXPORT_NAME:
            return self._answer_export_name(data, tls_missing)
        if option == k.Option.ABORT:
            self._reply(option, k.OptionReply.ACK)
            self._transition("abort")
            return HandshakeEnded("client sent NBD_OPT_ABORT")
        if option == k.Option.STARTTLS:
            return self._answer_starttls(data)
        if tls_missing:
            return self._error(option, k.OptionReply.ERR_TLS_REQD, "TLS is required")
        if option == k.Option.LIST:
            if data:
                return self._error(option, k.OptionReply.ERR_INVALID, "LIST takes no data")
            for name, spec in self._exports.items():
                listing = wire.ExportListing(name, spec.description)
                self._reply(option, k.OptionReply.SERVER, wire.build_server_reply(listing))
            self._reply(option, k.OptionReply.ACK)
            self._transition("option_answered")
            return OptionHandled(_option_state(option), option, k.OptionReply.ACK)
        if option == k.Option.STRUCTURED_REPLY:
            if data:
                return self._error(option, k.OptionReply.ERR_INVALID, "takes no data")
            neg.structured_replies = True
            self._reply(option, k.OptionReply.ACK)
            self._transition("option_answered")
            return OptionHandled(_option_state(option), option, k.OptionReply.ACK)
        if option in (k.Option.INFO, k.Option.GO):
            return self._answer_info_or_go(option, data)
        if option in (k.Option.LIST_META_CONTEXT, k.Option.SET_META_CONTEXT):
            return self._answer_meta_context(option, data)
        return self._error(option, k.OptionReply.ERR_UNSUP, f"option {option} not supported")

    def _answer_export_name(self, data: bytes, tls_missing: bool) -> Event:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            name = None
        spec = self._exports.get(name) if name is not None and not tls_missing else None
        if spec is None:
            self._transition("close")
            why = "TLS is required" if tls_missing else f"no export named {name!r}"
            return HandshakeEnded(f"NBD_OPT_EXPORT_NAME refused: {why}", refused=True)
        neg = self._negotiated
        flags = spec.transmission_flags(neg.structured_replies)
        self._outgoing += wire.build_export_name_reply(spec.size, flags, neg.no_zeroes)
        return self._open_export(spec, flags, "export_name")

    def _open_export(self, spec: ExportSpec, flags: int, edge: str) -> ExportOpened:
        neg = self._negotiated
        neg.export = spec
        neg.transmission_flags = flags
        neg.block_status = (
            neg.structured_replies and neg.base_allocation and neg.meta_export == spec.name
        )
        self._transition(edge)
        return ExportOpened(spec, neg.structured_replies, neg.block_status, flags)

    def _answer_starttls(self, data: bytes) -> OptionHandled | TLSRequested:
        option = int(k.Option.STARTTLS)
        if data:
            return self._error(option, k.OptionReply.ERR_INVALID, "STARTTLS takes no data")
        if self._tls is TLSMode.OFF:
            return self._error(option, k.OptionReply.ERR_POLICY, "TLS is not configured")
        if self._negotiated.tls_active:
            return self._error(option, k.OptionReply.ERR_INVALID, "TLS is already active")
        if len(self._buffer):
            raise RemoteProtocolError("data pipelined after NBD_OPT_STARTTLS")
        self._reply(option, k.OptionReply.ACK)
        self._transition("starttls_ack")
        return TLSRequested()

    def _answer_info_or_go(self, option: int, data: bytes) -> Event:
        try:
            request = wire.parse_info_request(data)
        except RemoteProtocolError as exc:
            return self._error(option, k.OptionReply.ERR_INVALID, str(exc)[:200])
        spec = self._exports.get(request.name)
        if spec is None:
            return self._error(
                option, k.OptionReply.ERR_UNKNOWN, f"no export named {request.name[:64]!r}"
            )
        neg = self._negotiated
        flags = spec.transmission_flags(neg.structured_replies)
        items: list[wire.InfoItem] = [wire.ExportInfo(spec.size, flags)]
        if k.Info.NAME in request.info_requests:
            items.append(wire.NameInfo(spec.name))
        if k.Info.DESCRIPTION in request.info_requests and spec.description:
            items.append(wire.DescriptionInfo(spec.description))
        items.append(
            wire.BlockSizeInfo(
                spec.minimum_block_size, spec.preferred_block_size, spec.maximum_payload
            )
        )
        for item in items:
            self._reply(option, k.OptionReply.INFO, wire.build_info(item))
        self._reply(option, k.OptionReply.ACK)
        if option == k.Option.INFO:
            self._transition("option_answered")
            return OptionHandled(_option_state(option), option, k.OptionReply.ACK, request.name)
        neg.block_size_agreed = k.Info.BLOCK_SIZE in request.info_requests
        return self._open_export(spec, flags, "go")

    def _answer_meta_context(self, option: int, data: bytes) -> OptionHandled:
        neg = self._negotiated
        if not neg.structured_replies:
            return self._error(option, k.OptionReply.ERR_INVALID, "structured replies first")
        try:
            request = wire.parse_meta_context_request(data)
        except RemoteProtocolError as exc:
            return self._error(option, k.OptionReply.ERR_INVALID, str(exc)[:200])
        if request.export_name not in self._exports:
            return self._error(
                option,
                k.OptionReply.ERR_UNKNOWN,
                f"no export named {request.export_name[:64]!r}",
            )
        listing = option == k.Option.LIST_META_CONTEXT
        if listing:
            # LIST: no query lists every context; "base:" lists the base namespace.
            selected = not request.queries or any(
                q in (k.BASE_ALLOCATION, "base:") for q in request.queries
            )
            context_id = 0  # spec: reserved in LIST replies
        else:
            # SET: exactly the contexts asked for; unknown ones are ignored.
            selected = k.BASE_ALLOCATION in request.queries
            context_id = BASE_ALLOCATION_CONTEXT_ID
            neg.meta_export = request.export_name
            neg.base_allocation = selected
        if selected:
            context = wire.MetaContext(context_id, k.BASE_ALLOCATION)
            self._reply(option, k.OptionReply.META_CONTEXT, wire.build_meta_context_reply(context))
        self._reply(option, k.OptionReply.ACK)
        self._transition("option_answered")
        detail = k.BASE_ALLOCATION if selected else "no context"
        return OptionHandled(_option_state(option), option, k.OptionReply.ACK, detail)

    # -- transmission: receiving -------------------------------------------------------------

    def _receive_request(self) -> Event | NeedData | None:
        data = self._buffer.take(wire.REQUEST_HEADER_SIZE)
        if data is None:
            return NEED_DATA
        request = wire.parse_request_header(data)
        if request.command == k.Command.DISC:
            self._transition("disc")
            return DisconnectRequested()
        refusal = self.validate(request)
        if request.command == k.Command.WRITE:
            if refusal is not None:
                errno, message = refusal
                if request.length > self._export_spec().maximum_payload:
                    self._transition("close")
                    return CommandRefused(request, errno, message, close_after=True)
                self._discard_left = request.length
                self._transition("refused_write")
                return CommandRefused(request, errno, message)
            self._pending_write = request
            self._transition("write_header")
            return None
        self._transition("request")
        if refusal is not None:
            return CommandRefused(request, refusal.errno, refusal.message)
        return CommandReceived(request)

    def _receive_write_payload(self) -> Event | NeedData:
        request = self._pending_write
        assert request is not None
        payload = self._buffer.take(request.length)
        if payload is None:
            return NEED_DATA
        self._pending_write = None
        self._transition("payload_done")
        return CommandReceived(request, payload)

    def _discard_write_payload(self) -> NeedData | None:
        self._discard_left -= self._buffer.skip(self._discard_left)
        if self._discard_left:
            return NEED_DATA
        self._transition("payload_done")
        return None

    def _export_spec(self) -> ExportSpec:
        spec = self._negotiated.export
        if spec is None:
            raise LocalProtocolError("no export has been opened")
        return spec

    def validate(self, request: wire.Request) -> Refusal | None:
        """The Refusal if the request must be refused, None if it may be executed."""
        spec = self._export_spec()
        neg = self._negotiated
        command, flags, offset, length = (
            request.command,
            request.flags,
            request.offset,
            request.length,
        )
        allowed = _COMMAND_FLAGS.get(command)
        if allowed is None:
            return Refusal(k.Errno.EINVAL, f"unknown command {command}")
        if neg.transmission_flags & k.TransmissionFlag.SEND_FUA:
            allowed |= int(k.CommandFlag.FUA)
        if not neg.transmission_flags & k.TransmissionFlag.SEND_DF:
            allowed &= ~int(k.CommandFlag.DF)
        if command == k.Command.WRITE_ZEROES and not spec.can_fast_zero:
            allowed &= ~int(k.CommandFlag.FAST_ZERO)
        if flags & ~allowed:
            return Refusal(k.Errno.EINVAL, f"flags 0x{flags:x} not valid for command {command}")
        if command in _WRITE_COMMANDS and spec.read_only:
            return Refusal(k.Errno.EPERM, "export is read-only")
        if command == k.Command.FLUSH:
            if not spec.can_flush or spec.read_only:
                return Refusal(k.Errno.EINVAL, "flush not offered")
            if offset or length:  # reserved fields, "MUST be zero"
                return Refusal(k.Errno.EINVAL, "flush with a non-zero offset or length")
            return None
        if command == k.Command.TRIM and not spec.can_trim:
            return Refusal(k.Errno.EINVAL, "trim not offered")
        if command == k.Command.WRITE_ZEROES and not spec.can_zero:
            return Refusal(k.Errno.EINVAL, "write zeroes not offered")
        if command == k.Command.CACHE and not spec.can_cache:
            return Refusal(k.Errno.EINVAL, "cache not offered")
        if length == 0:
            return Refusal(k.Errno.EINVAL, "zero length")
        if command in (k.Command.READ, k.Command.WRITE) and length > spec.maximum_payload:
            if command == k.Command.READ and flags & k.CommandFlag.DF:
                return Refusal(k.Errno.EOVERFLOW, "read too large for one chunk")
            return Refusal(k.Errno.EINVAL, f"length {length} over the maximum payload")
        if offset + length > spec.size:
            errno = k.Errno.ENOSPC if command in (k.Command.WRITE, k.Command.WRITE_ZEROES) else (
                k.Errno.EINVAL
            )
            return Refusal(errno, "request beyond the end of the export")
        minimum = spec.minimum_block_size
        if neg.block_size_agreed and minimum > 1 and (offset % minimum or length % minimum):
            return Refusal(k.Errno.EINVAL, f"request not aligned to {minimum} bytes")
        if command == k.Command.BLOCK_STATUS and not neg.block_status:
            return Refusal(k.Errno.EINVAL, "no metadata context was negotiated")
        return None

    # -- transmission: replies -----------------------------------------------------------------

    def ok_reply(self, request: wire.Request) -> bytes:
        """Success for any command but READ and BLOCK_STATUS (a simple reply is always allowed
        for those, and is the shortest)."""
        return wire.build_simple_reply(request.cookie, 0)

    def error_reply(self, request: wire.Request, errno: int, message: str = "") -> bytes:
        """The error reply: an ERROR chunk (DONE) with structured replies, else a simple reply
        (with no payload, even for READ)."""
        errno = int(k.errno_to_wire(errno)) if errno else int(k.Errno.EIO)
        if self._negotiated.structured_replies:
            payload = wire.build_error_chunk(errno, message)
            header = wire.build_structured_reply_header(
                k.ReplyFlag.DONE, k.ReplyType.ERROR, request.cookie, len(payload)
            )
            return header + payload
        return wire.build_simple_reply(request.cookie, errno)

    def read_reply(
        self, request: wire.Request, data: memoryview, holes: Sequence[Extent] = ()
    ) -> list[bytes | memoryview]:
        """The reply to a READ, as buffers to send in order (data is not copied).

        `data` holds the request's bytes; `holes` (sorted, inside the request) are ranges known
        to read as zeroes.  With structured replies and no DF they become OFFSET_HOLE chunks and
        their part of `data` is never sent (nor needs to have been read).  With DF, or with
        simple replies, `data` must hold the zeroes too and goes out whole."""
        base = request.offset
        return [
            piece if isinstance(piece, bytes) else data[piece[0] - base : sum(piece) - base]
            for piece in self.read_reply_plan(request, holes)
        ]

    def read_reply_plan(
        self, request: wire.Request, holes: Sequence[Extent] = ()
    ) -> list[bytes | tuple[int, int]]:
        """`read_reply` without the data: header bytes, and (offset, length) tuples where that
        range of the export's bytes goes (a shell may send those straight from a file)."""
        cookie = request.cookie
        if not self._negotiated.structured_replies:
            return [wire.build_simple_reply(cookie, 0), (request.offset, request.length)]
        if request.flags & k.CommandFlag.DF or not holes:
            header = wire.build_structured_reply_header(
                k.ReplyFlag.DONE, k.ReplyType.OFFSET_DATA, cookie, 8 + request.length
            ) + wire.build_offset_data_header(request.offset)
            return [header, (request.offset, request.length)]
        out: list[bytes | tuple[int, int]] = []
        pending: list[bytes] = []  # small chunks coalesced into one buffer
        position = request.offset
        end = request.offset + request.length
        pieces: list[tuple[int, int, bool]] = []
        for hole in holes:
            start, stop = max(hole.offset, position), min(hole.end, end)
            if start >= stop:
                continue
            if start > position:
                pieces.append((position, start - position, False))
            pieces.append((start, stop - start, True))
            position = stop
        if position < end:
            pieces.append((position, end - position, False))
        for index, (offset, length, is_hole) in enumerate(pieces):
            flags = k.ReplyFlag.DONE if index == len(pieces) - 1 else 0
            if is_hole:
                payload = wire.build_offset_hole(offset, length)
                pending.append(
                    wire.build_structured_reply_header(
                        flags, k.ReplyType.OFFSET_HOLE, cookie, len(payload)
                    )
                    + payload
                )
            else:
                pending.append(
                    wire.build_structured_reply_header(
                        flags, k.ReplyType.OFFSET_DATA, cookie, 8 + length
                    )
                    + wire.build_offset_data_header(offset)
                )
                out.append(b"".join(pending))
                pending.clear()
                out.append((offset, length))
        if pending:
            out.append(b"".join(pending))
        return out

    def block_status_reply(self, request: wire.Request, extents: Sequence[Extent]) -> bytes:
        """The BLOCK_STATUS reply for base:allocation: extents clipped to the request, merged
        when their flags agree, one only with REQ_ONE."""
        end = request.offset + request.length
        descriptors: list[list[int]] = []
        position = request.offset
        for extent in extents:
            start, stop = max(extent.offset, position), min(extent.end, end)
            if start != position or stop <= start:
                if stop <= start:
                    continue
                break  # a gap: report up to it only (extents must be contiguous)
            flags = int(extent.flags) & int(k.BlockStatusFlag.HOLE | k.BlockStatusFlag.ZERO)
            if descriptors and descriptors[-1][1] == flags:
                descriptors[-1][0] += stop - start
            else:
                descriptors.append([stop - start, flags])
            position = stop
            if position >= end:
                break
        if not descriptors:
            raise LocalProtocolError("no extent covers the start of the block status request")
        if request.flags & k.CommandFlag.REQ_ONE:
            descriptors = descriptors[:1]
        descriptors = descriptors[:MAX_BLOCK_STATUS_DESCRIPTORS]
        payload = wire.build_block_status(
            BASE_ALLOCATION_CONTEXT_ID, [(length, flags) for length, flags in descriptors]
        )
        header = wire.build_structured_reply_header(
            k.ReplyFlag.DONE, k.ReplyType.BLOCK_STATUS, request.cookie, len(payload)
        )
        return header + payload


def _option_state(option: int) -> str:
    try:
        return f"NEWSTYLE.OPT_{k.Option(option).name}"
    except ValueError:
        return f"NEWSTYLE.OPT_{option}"

"""The NBD client protocol core: bytes in, events out; requests in, bytes out.  No I/O here.

Two objects, one per phase, share one `ReceiveBuffer` (what the shell received but the core has
not consumed yet):

`ClientHandshake` runs option haggling as a table of named states (libnbd's names).

    Transition rule: the current state's handler either returns the next state, or None when it
    needs more bytes than the buffer holds (it then consumed nothing).  SEND states queue one
    option for the shell to send and move on at once; RECV states consume exactly one complete
    frame (a greeting, or one option reply header with its data) per call.  `receive_data()` runs
    handlers until one returns None or the state is READY.  A handler raises NegotiationError when
    the server refuses what we cannot do without, RemoteProtocolError when it breaks the protocol.

    NEWSTYLE.RECV_GREETING ──fixed newstyle──► NEWSTYLE.OPT_STRUCTURED_REPLY.SEND
                           ├─fixed, TLS wanted─► NEWSTYLE.OPT_STARTTLS.SEND
                           └─plain newstyle──► NEWSTYLE.OPT_EXPORT_NAME.SEND (TLS "require": fail)
    NEWSTYLE.OPT_STARTTLS.SEND ─► .RECV_REPLY ─ACK─► NEWSTYLE.OPT_STARTTLS.TLS_HANDSHAKE
                                              └error─► (tls="on") NEWSTYLE.OPT_STRUCTURED_REPLY.SEND
                                                       (tls="require") NegotiationError
    NEWSTYLE.OPT_STARTTLS.TLS_HANDSHAKE  waits for the shell: it wraps the stream in TLS, runs the
        TLS handshake and calls tls_established() ─► NEWSTYLE.OPT_STRUCTURED_REPLY.SEND (over TLS)
    NEWSTYLE.OPT_STRUCTURED_REPLY.SEND ─► .RECV_REPLY ─ACK─► NEWSTYLE.OPT_SET_META_CONTEXT.SEND
                                                      └error─► NEWSTYLE.OPT_GO.SEND (simple replies)
    NEWSTYLE.OPT_SET_META_CONTEXT.SEND ─► .RECV_REPLY ─ACK or error─► NEWSTYLE.OPT_GO.SEND
    NEWSTYLE.OPT_GO.SEND ─► .RECV_REPLY ─ACK─► READY
                                        └ERR_UNSUP/ERR_INVALID─► NEWSTYLE.OPT_EXPORT_NAME.SEND
    NEWSTYLE.OPT_EXPORT_NAME.SEND ─► .RECV_REPLY ─size+flags (+124 zeroes unless NO_ZEROES)─► READY

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
from collections.abc import Callable
from dataclasses import dataclass

from nbdsrv import constants as k
from nbdsrv import wire
from nbdsrv.buffer import ReceiveBuffer
from nbdsrv.errors import (
    CommandError,
    ConnectionClosedError,
    LocalProtocolError,
    NegotiationError,
    RemoteProtocolError,
)
from nbdsrv.extent import Extent

DEFAULT_BLOCK_SIZE = (k.DEFAULT_MIN_BLOCK, k.DEFAULT_PREFERRED_BLOCK, k.MAX_PAYLOAD)
MAX_OPTION_REPLY_LENGTH = 1024 * 1024  # an option reply longer than this is refused
MAX_CHUNK_LENGTH = 64 * 1024 * 1024  # a non-data structured chunk longer than this is refused
MAX_EFFECT_LENGTH = 0xFFFFFFFF & ~0xFFFFF  # trim / zero / cache / block status per request

# -- handshake --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NegotiatedExport:
    """What the handshake settled: the export and the features the transmission phase may use."""

    export_name: str
    size: int
    transmission_flags: int
    description: str = ""
    block_size: tuple[int, int, int] = DEFAULT_BLOCK_SIZE  # minimum, preferred, maximum
    structured_replies: bool = False
    meta_context_id: int | None = None  # id of base:allocation, when negotiated
    no_zeroes: bool = False
    fixed_newstyle: bool = False

    @property
    def has_base_allocation(self) -> bool:
        return self.meta_context_id is not None


_State = str
_Handler = Callable[["ClientHandshake"], "_State | None"]


class ClientHandshake:
    """Option haggling from the client's side (see the module docstring for the table)."""

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        base_allocation: bool = True,
        buffer: ReceiveBuffer | None = None,
        tls: str = "off",
    ) -> None:
        """`tls`: "off" (never STARTTLS), "on" (STARTTLS first; plaintext if the server refuses
        it) or "require" (STARTTLS first; a refusal is a NegotiationError: no plaintext)."""
        if tls not in ("off", "on", "require"):
            raise ValueError(f"tls must be off, on or require, not {tls!r}")
        self.tls = tls
        self.tls_active = False
        self.buffer = buffer if buffer is not None else ReceiveBuffer()
        self.state: _State = "NEWSTYLE.RECV_GREETING"
        self.trace: list[_State] = [self.state]  # every state visited, for logs and tests
        self._outgoing = bytearray()
        self._export_name = export_name
        self._want_structured = structured_replies
        self._want_base_allocation = base_allocation
        self._fixed_newstyle = False
        self._no_zeroes = False
        self._structured = False
        self._context_id: int | None = None
        self._size: int | None = None
        self._flags = 0
        self._canonical_name: str | None = None
        self._description = ""
        self._block_size = DEFAULT_BLOCK_SIZE
        self._result: NegotiatedExport | None = None

    # -- the shell's side ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def tls_requested(self) -> bool:
        """The server acknowledged STARTTLS: the shell must now wrap the stream in TLS (nothing
        more may be sent or received in plaintext) and call tls_established()."""
        return self.state == "NEWSTYLE.OPT_STARTTLS.TLS_HANDSHAKE"

    def tls_established(self) -> None:
        """The shell finished the TLS handshake: option haggling goes on over TLS."""
        if not self.tls_requested:
            raise LocalProtocolError(f"tls_established() in state {self.state}")
        self.tls_active = True
        self.state = self._after_tls()
        self.trace.append(self.state)
        self._advance()

    @property
    def result(self) -> NegotiatedExport:
        if self._result is None:
            raise LocalProtocolError(f"handshake not finished (state {self.state})")
        return self._result

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self.buffer.feed(data)
        self._advance()

    def receive_eof(self) -> None:
        """The server closed the connection before the handshake ended."""
        if self.state == "NEWSTYLE.OPT_EXPORT_NAME.RECV_REPLY":
            raise NegotiationError(
                f"server closed the connection after NBD_OPT_EXPORT_NAME "
                f"(no export named {self._export_name!r}?)"
            )
        raise NegotiationError(f"server closed the connection during the handshake ({self.state})")

    # -- the table ------------------------------------------------------------------------------

    def _advance(self) -> None:
        # Bounded: a RECV transition consumes a frame of at least 16 bytes, and SEND states
        # (at most one per option) always lead to a RECV state.
        for _ in range(len(self.buffer) // 16 + 16):
            if self.state == "READY":
                return
            next_state = _TRANSITIONS[self.state](self)
            if next_state is None:
                return
            self.state = next_state
            self.trace.append(next_state)
        raise LocalProtocolError("handshake state machine did not settle")  # a bug in the table

    def _send_option(self, option: k.Option, data: bytes = b"") -> None:
        self._outgoing += wire.build_option(option, data)

    def _take_option_reply(self, option: k.Option) -> tuple[int, bytes] | None:
        header_bytes = self.buffer.peek(wire.OPTION_REPLY_HEADER_SIZE)
        if header_bytes is None:
            return None
        header = wire.parse_option_reply_header(header_bytes)
        if header.length > MAX_OPTION_REPLY_LENGTH:
            raise RemoteProtocolError(f"option reply of {header.length} bytes is too long")
        if len(self.buffer) < wire.OPTION_REPLY_HEADER_SIZE + header.length:
            return None
        self.buffer.skip(wire.OPTION_REPLY_HEADER_SIZE)
        data = self.buffer.take(header.length)
        assert data is not None
        if header.option != option:
            raise RemoteProtocolError(
                f"reply to option {header.option} while waiting for {option.name}"
            )
        return header.reply_type, data

    def _recv_greeting(self) -> _State | None:
        data = self.buffer.take(wire.SERVER_GREETING_SIZE)
        if data is None:
            return None
        try:
            flags = wire.parse_server_greeting(data)
        except RemoteProtocolError as exc:
            raise NegotiationError(f"not a newstyle NBD server: {exc}") from None
        self._fixed_newstyle = bool(flags & k.HandshakeFlag.FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & k.HandshakeFlag.NO_ZEROES)
        client_flags = 0
        if self._fixed_newstyle:
            client_flags |= k.ClientFlag.FIXED_NEWSTYLE
        if self._no_zeroes:
            client_flags |= k.ClientFlag.NO_ZEROES
        self._outgoing += wire.build_client_flags(client_flags)
        if not self._fixed_newstyle:  # a plain newstyle server knows only NBD_OPT_EXPORT_NAME
            if self.tls == "require":
                raise NegotiationError("TLS is required but the server is not fixed newstyle")
            return "NEWSTYLE.OPT_EXPORT_NAME.SEND"
        if self.tls != "off":
            return "NEWSTYLE.OPT_STARTTLS.SEND"
        return self._after_tls()

    def _after_tls(self) -> _State:
        if self._want_structured:
            return "NEWSTYLE.OPT_STRUCTURED_REPLY.SEND"
        return "NEWSTYLE.OPT_GO.SEND"

    def _send_starttls(self) -> _State:
        self._send_option(k.Option.STARTTLS)
        return "NEWSTYLE.OPT_STARTTLS.RECV_REPLY"

    def _recv_starttls(self) -> _State | None:
        reply = self._take_option_reply(k.Option.STARTTLS)
        if reply is None:
            return None
        reply_type, data = reply
        if reply_type == k.OptionReply.ACK:
            if data:
                raise RemoteProtocolError("NBD_REP_ACK with a payload")
            if len(self.buffer):  # the TLS handshake starts with our ClientHello
                raise RemoteProtocolError("plaintext bytes after the STARTTLS acknowledgement")
            return "NEWSTYLE.OPT_STARTTLS.TLS_HANDSHAKE"
        if not k.is_option_error(reply_type):
            raise RemoteProtocolError(f"reply type {reply_type} to NBD_OPT_STARTTLS")
        if self.tls == "require":  # never carry on in plaintext (spec: downgrade attacks)
            raise NegotiationError(_refusal("NBD_OPT_STARTTLS", reply_type, data), reply_type)
        return self._after_tls()

    def _wait_for_tls(self) -> None:
        return None  # the shell calls tls_established()

    def _send_structured_reply(self) -> _State:
        self._send_option(k.Option.STRUCTURED_REPLY)
        return "NEWSTYLE.OPT_STRUCTURED_REPLY.RECV_REPLY"

    def _recv_structured_reply(self) -> _State | None:
        reply = self._take_option_reply(k.Option.STRUCTURED_REPLY)
        if reply is None:
            return None
        reply_type, data = reply
        if reply_type == k.OptionReply.ACK:
            if data:
                raise RemoteProtocolError("NBD_REP_ACK with a payload")
            self._structured = True
        elif not k.is_option_error(reply_type):
            raise RemoteProtocolError(f"reply type {reply_type} to NBD_OPT_STRUCTURED_REPLY")
        # else: refused (ERR_UNSUP, ERR_POLICY...): carry on with simple replies
        if self._structured and self._want_base_allocation:
            return "NEWSTYLE.OPT_SET_META_CONTEXT.SEND"
        return "NEWSTYLE.OPT_GO.SEND"

    def _send_set_meta_context(self) -> _State:
        request = wire.MetaContextRequest(self._export_name, (k.BASE_ALLOCATION,))
        self._send_option(k.Option.SET_META_CONTEXT, wire.build_meta_context_request(request))
        return "NEWSTYLE.OPT_SET_META_CONTEXT.RECV_REPLY"

    def _recv_set_meta_context(self) -> _State | None:
        reply = self._take_option_reply(k.Option.SET_META_CONTEXT)
        if reply is None:
            return None
        reply_type, data = reply
        if reply_type == k.OptionReply.META_CONTEXT:
            context = wire.parse_meta_context_reply(data)
            if context.name != k.BASE_ALLOCATION:
                raise RemoteProtocolError(f"meta context {context.name!r} that was not asked for")
            self._context_id = context.context_id
            return "NEWSTYLE.OPT_SET_META_CONTEXT.RECV_REPLY"  # more replies until ACK
        if reply_type == k.OptionReply.ACK:
            return "NEWSTYLE.OPT_GO.SEND"
        if k.is_option_error(reply_type):
            self._context_id = None
            return "NEWSTYLE.OPT_GO.SEND"
        raise RemoteProtocolError(f"reply type {reply_type} to NBD_OPT_SET_META_CONTEXT")

    def _send_go(self) -> _State:
        wanted = (k.Info.NAME, k.Info.DESCRIPTION, k.Info.BLOCK_SIZE)
        request = wire.InfoRequest(self._export_name, tuple(int(i) for i in wanted))
        self._send_option(k.Option.GO, wire.build_info_request(request))
        return "NEWSTYLE.OPT_GO.RECV_REPLY"

    def _recv_go(self) -> _State | None:
        reply = self._take_option_reply(k.Option.GO)
        if reply is None:
            return None
        reply_type, data = reply
        if reply_type == k.OptionReply.INFO:
            self._note_info(wire.parse_info(data))
            return "NEWSTYLE.OPT_GO.RECV_REPLY"
        if reply_type == k.OptionReply.ACK:
            if self._size is None:
                raise RemoteProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
            self._finish()
            return "READY"
        if reply_type == k.OptionReply.ERR_UNSUP:
            # A server older than NBD_OPT_GO: the old way still works.
            return "NEWSTYLE.OPT_EXPORT_NAME.SEND"
        if k.is_option_error(reply_type):
            raise NegotiationError(_refusal("NBD_OPT_GO", reply_type, data), reply_type)
        raise RemoteProtocolError(f"reply type {reply_type} to NBD_OPT_GO")

    def _note_info(self, item: wire.InfoItem) -> None:
        if isinstance(item, wire.ExportInfo):
            self._size, self._flags = item.size, item.transmission_flags
        elif isinstance(item, wire.NameInfo):
            self._canonical_name = item.name
        elif isinstance(item, wire.DescriptionInfo):
            self._description = item.description
        elif isinstance(item, wire.BlockSizeInfo):
            self._block_size = _checked_block_size(item)
        # unknown info types are ignored (spec: "NBD_REP_INFO")

    def _send_export_name(self) -> _State:
        self._send_option(k.Option.EXPORT_NAME, self._export_name.encode("utf-8"))
        return "NEWSTYLE.OPT_EXPORT_NAME.RECV_REPLY"

    def _recv_export_name(self) -> _State | None:
        size = wire.EXPORT_NAME_REPLY_SIZE + (0 if self._no_zeroes else k.EXPORT_NAME_PADDING)
        data = self.buffer.take(size)
        if data is None:
            return None
        info = wire.parse_export_name_reply(data)
        self._size, self._flags = info.size, info.transmission_flags
        self._finish()
        return "READY"

    def _finish(self) -> None:
        assert self._size is not None
        self._result = NegotiatedExport(
            export_name=self._canonical_name or self._export_name,
            size=self._size,
            transmission_flags=self._flags,
            description=self._description,
            block_size=self._block_size,
            structured_replies=self._structured,
            meta_context_id=self._context_id if self._structured else None,
            no_zeroes=self._no_zeroes,
            fixed_newstyle=self._fixed_newstyle,
        )


_TRANSITIONS: dict[_State, _Handler] = {
    "NEWSTYLE.RECV_GREETING": ClientHandshake._recv_greeting,
    "NEWSTYLE.OPT_STARTTLS.SEND": ClientHandshake._send_starttls,
    "NEWSTYLE.OPT_STARTTLS.RECV_REPLY": ClientHandshake._recv_starttls,
    "NEWSTYLE.OPT_STARTTLS.TLS_HANDSHAKE": ClientHandshake._wait_for_tls,
    "NEWSTYLE.OPT_STRUCTURED_REPLY.SEND": ClientHandshake._send_structured_reply,
    "NEWSTYLE.OPT_STRUCTURED_REPLY.RECV_REPLY": ClientHandshake._recv_structured_reply,
    "NEWSTYLE.OPT_SET_META_CONTEXT.SEND": ClientHandshake._send_set_meta_context,
    "NEWSTYLE.OPT_SET_META_CONTEXT.RECV_REPLY": ClientHandshake._recv_set_meta_context,
    "NEWSTYLE.OPT_GO.SEND": ClientHandshake._send_go,
    "NEWSTYLE.OPT_GO.RECV_REPLY": ClientHandshake._recv_go,
    "NEWSTYLE.OPT_EXPORT_NAME.SEND": ClientHandshake._send_export_name,
    "NEWSTYLE.OPT_EXPORT_NAME.RECV_REPLY": ClientHandshake._recv_export_name,
}


def _refusal(option: str, reply_type: int, data: bytes) -> str:
    try:
        name = k.OptionReply(reply_type).name
    except ValueError:
        name = f"error 0x{reply_type:08x}"
    message = data[:200].decode("utf-8", "replace").strip()
    return f"server refused {option}: {name}" + (f" ({message})" if message else "")


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _checked_block_size(item: wire.BlockSizeInfo) -> tuple[int, int, int]:
    minimum, preferred, maximum = item.minimum, item.preferred, item.maximum
    if not (
        _is_power_of_two(minimum)
        and minimum <= 65536
        and _is_power_of_two(preferred)
        and preferred >= minimum
        and maximum >= minimum
    ):
        raise RemoteProtocolError(f"invalid NBD_INFO_BLOCK_SIZE {minimum}/{preferred}/{maximum}")
    # The maximum payload is a multiple of the minimum, or the server's own limit (spec).
    return minimum, preferred, min(maximum, 0xFFFFFFFF)


# -- transmission -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """A request's reply is complete.  `error` is set when the server failed it; `extents` is
    the answer of a BLOCK_STATUS; `abandoned` when the caller gave up on it (ignore it)."""

    cookie: int
    error: CommandError | None = None
    extents: list[Extent] | None = None
    abandoned: bool = False


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


# Reply parser states (the transmission phase is a plain loop, not worth a table).
_HEADER, _DATA_OFFSET, _DATA_PAYLOAD, _CHUNK_PAYLOAD = range(4)
_ZEROS = bytes(1024 * 1024)
_SIMPLE_MAGIC_BYTES = struct.pack(">I", k.SIMPLE_REPLY_MAGIC)
_STRUCTURED_MAGIC_BYTES = struct.pack(">I", k.STRUCTURED_REPLY_MAGIC)
_READ = int(k.Command.READ)
_BLOCK_STATUS = int(k.Command.BLOCK_STATUS)
_DONE = int(k.ReplyFlag.DONE)


class ClientTransmission:
    """Requests and replies of the transmission phase on one connection."""

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
        self._state = _HEADER
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
    def in_flight(self) -> int:
        return len(self._pending)

    def pending_cookies(self) -> list[int]:
        return list(self._pending)

    def _new_request(
        self, command: int, flags: int, offset: int, length: int, target: memoryview | None
    ) -> tuple[int, bytes]:
        if self._disconnect_sent:
            raise LocalProtocolError("request after NBD_CMD_DISC")
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        if command != k.Command.DISC:
            self._pending[cookie] = _Pending(command, offset, length, target)
        return cookie, wire.build_request_header(
            wire.Request(flags, command, cookie, offset, length)
        )

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise LocalProtocolError(
                f"{what} of {length} bytes at {offset} is outside the export ({self.size} bytes)"
            )

    def _need(self, flag: k.TransmissionFlag, what: str) -> None:
        if not self.flags & flag:
            raise LocalProtocolError(f"the server does not offer {what}")

    def request_read(self, offset: int, target: memoryview) -> tuple[int, bytes]:
        """A READ of len(target) bytes at `offset`, whose data will be written into `target`."""
        length = len(target)
        self._check_range(offset, length, "read")
        if not 0 < length <= self.max_payload:
            raise LocalProtocolError(f"read of {length} bytes (maximum {self.max_payload})")
        return self._new_request(_READ, 0, offset, length, target)

    def request_write(self, offset: int, length: int, *, fua: bool = False) -> tuple[int, bytes]:
        """The header of a WRITE; the shell sends the `length` payload bytes right after it."""
        self._check_range(offset, length, "write")
        if self.flags & k.TransmissionFlag.READ_ONLY:
            raise LocalProtocolError("the export is read-only")
        if not 0 < length <= self.max_payload:
            raise LocalProtocolError(f"write of {length} bytes (maximum {self.max_payload})")
        return self._new_request(k.Command.WRITE, self._fua(fua), offset, length, None)

    def request_flush(self) -> tuple[int, bytes]:
        self._need(k.TransmissionFlag.SEND_FLUSH, "NBD_CMD_FLUSH")
        return self._new_request(k.Command.FLUSH, 0, 0, 0, None)

    def request_trim(self, offset: int, length: int, *, fua: bool = False) -> tuple[int, bytes]:
        self._check_effect(offset, length, "trim")
        if self.flags & k.TransmissionFlag.READ_ONLY:
            raise LocalProtocolError("the export is read-only")
        self._need(k.TransmissionFlag.SEND_TRIM, "NBD_CMD_TRIM")
        return self._new_request(k.Command.TRIM, self._fua(fua), offset, length, None)

    def request_write_zeroes(
        self, offset: int, length: int, *, no_hole: bool = False, fua: bool = False
    ) -> tuple[int, bytes]:
        self._check_effect(offset, length, "write-zeroes")
        if self.flags & k.TransmissionFlag.READ_ONLY:
            raise LocalProtocolError("the export is read-only")
        self._need(k.TransmissionFlag.SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES")
        flags = self._fua(fua) | (k.CommandFlag.NO_HOLE if no_hole else 0)
        return self._new_request(k.Command.WRITE_ZEROES, flags, offset, length, None)

    def request_cache(self, offset: int, length: int) -> tuple[int, bytes]:
        self._check_effect(offset, length, "cache")
        self._need(k.TransmissionFlag.SEND_CACHE, "NBD_CMD_CACHE")
        return self._new_request(k.Command.CACHE, 0, offset, length, None)

    def request_block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> tuple[int, bytes]:
        self._check_effect(offset, length, "block status")
        if self._context_id is None:
            raise LocalProtocolError("base:allocation was not negotiated")
        flags = k.CommandFlag.REQ_ONE if req_one else 0
        return self._new_request(_BLOCK_STATUS, flags, offset, length, None)

    def request_disconnect(self) -> bytes:
        """NBD_CMD_DISC: no reply comes; after it the server closes and no request may follow."""
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
        self.buffer.feed(data)

    def receive_eof(self) -> None:
        """The server closed its end.  Clean only after NBD_CMD_DISC with nothing pending."""
        if self._pending or self._state != _HEADER or len(self.buffer):
            raise ConnectionClosedError(
                f"server closed the connection with {len(self._pending)} request(s) pending"
            )
        if not self._disconnect_sent:
            raise ConnectionClosedError("server closed the connection")

    def payload_target(self) -> memoryview | None:
        """Where the shell may receive the next bytes directly (a READ's data), or None."""
        if self._state == _DATA_PAYLOAD and not len(self.buffer) and self._payload_view is not None:
            return self._payload_view
        return None

    def payload_received(self, count: int) -> None:
        """`count` bytes were received straight into `payload_target()`."""
        view = self._payload_view
        assert view is not None and 0 < count <= self._payload_remaining
        self._payload_view = view[count:]
        self._payload_remaining -= count

    def next_event(self) -> RequestFinished | None:
        """The next finished request, or None when more bytes are needed."""
        buffer = self.buffer
        while True:
            state = self._state
            if state == _DATA_PAYLOAD:
                if self._payload_remaining:
                    view = self._payload_view
                    if view is not None:
                        moved = buffer.take_into(view[: self._payload_remaining])
                        self._payload_view = view[moved:]
                    else:
                        moved = buffer.skip(self._payload_remaining)
                    self._payload_remaining -= moved
                    if self._payload_remaining:
                        return None
                self._state = _HEADER
                self._payload_view = None
                if self._simple_payload:
                    self._simple_payload = False
                    return self._finish(self._cookie)
                if self._chunk_flags & _DONE:
                    return self._finish(self._cookie)
                continue
            if state == _HEADER:
                magic = buffer.peek(4)
                if magic is None:
                    return None
                if magic == _SIMPLE_MAGIC_BYTES:
                    frame = buffer.take(wire.SIMPLE_REPLY_SIZE)
                    if frame is None:
                        return None
                    event = self._on_simple_reply(frame)
                    if event is not None:
                        return event
                    continue
                if magic == _STRUCTURED_MAGIC_BYTES:
                    frame = buffer.take(wire.STRUCTURED_REPLY_HEADER_SIZE)
                    if frame is None:
                        return None
                    self._on_chunk_header(frame)
                    continue
                raise RemoteProtocolError(f"bad reply magic 0x{magic.hex()}")
            if state == _DATA_OFFSET:
                frame = buffer.take(wire.OFFSET_DATA_HEADER_SIZE)
                if frame is None:
                    return None
                self._on_data_offset(frame)
                continue
            # _CHUNK_PAYLOAD
            frame = buffer.take(self._chunk_length)
            if frame is None:
                return None
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

"""The client's option haggling as a sans-IO state machine: bytes in, bytes out, no I/O.

    handshake = ClientHandshake("export", tls=TLSMode.OFF)
    handshake.receive_data(received)          # handshake.receive_eof() when the server closed
    send(handshake.data_to_send())            # options to send
    handshake.tls_requested                   # wrap the stream in TLS, then tls_established()
    handshake.done and handshake.result       # the NegotiatedExport; ClientTransmission next

It shares one `ReceiveBuffer` with the ClientTransmission that follows it: bytes the server sent
after the last handshake reply stay there for the transmission phase.

`ClientHandshake` runs option haggling as a table of named states (nbdsrv.state.HandshakeState,
libnbd's names), each with a handler in `_HANDLERS` at the end of this file; the edges a handler
may take are listed in nbdsrv.state.HANDSHAKE_EDGES and checked on every step.  A SEND state's
handler comes from `_sends` (its option, and the method that builds the option's data); a
RECV_REPLY state's from `_replies_to`, which takes one whole reply to its option and hands the
reply's type and data to the state's `_on_..._reply` method.

    Transition rule: the current state's handler either returns the next state, or None when it
    needs more bytes than the buffer holds (it then consumed nothing).  SEND states queue one
    option for the shell to send and move on at once; RECV states consume exactly one complete
    frame (a greeting, or one option reply header with its data) per call.  `receive_data()` runs
    handlers until one returns None or the state is READY.  A handler raises NegotiationError when
    the server refuses what we cannot do without, RemoteProtocolError when it breaks the protocol;
    either moves the handshake to ERROR (nbdsrv.state.ProtocolCore) and later calls are refused.


    NEWSTYLE.RECV_GREETING ──fixed newstyle──► NEWSTYLE.OPT_STRUCTURED_REPLY.SEND
                           ├─fixed, TLS wanted─► NEWSTYLE.OPT_STARTTLS.SEND
                           └─plain newstyle──► NEWSTYLE.OPT_EXPORT_NAME.SEND (TLS REQUIRED: fail)
    NEWSTYLE.OPT_STARTTLS.SEND ─► .RECV_REPLY ─ACK─► NEWSTYLE.OPT_STARTTLS.TLS_HANDSHAKE
                                              └error─► (OPTIONAL) NEWSTYLE.OPT_STRUCTURED_REPLY.SEND
                                                       (REQUIRED) NegotiationError
    NEWSTYLE.OPT_STARTTLS.TLS_HANDSHAKE  waits for the shell: it wraps the stream in TLS, runs the
        TLS handshake and calls tls_established() ─► NEWSTYLE.OPT_STRUCTURED_REPLY.SEND (over TLS)
    NEWSTYLE.OPT_STRUCTURED_REPLY.SEND ─► .RECV_REPLY ─ACK─► NEWSTYLE.OPT_SET_META_CONTEXT.SEND
                                                      └error─► NEWSTYLE.OPT_GO.SEND (simple replies)
    NEWSTYLE.OPT_SET_META_CONTEXT.SEND ─► .RECV_REPLY ─ACK or error─► NEWSTYLE.OPT_GO.SEND
    NEWSTYLE.OPT_GO.SEND ─► .RECV_REPLY ─ACK─► READY
                                        └ERR_UNSUP─► NEWSTYLE.OPT_EXPORT_NAME.SEND
    NEWSTYLE.OPT_EXPORT_NAME.SEND ─► .RECV_REPLY ─size+flags (+124 zeroes unless NO_ZEROES)─► READY
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nbdsrv import constants as k
from nbdsrv import wire
from nbdsrv.buffer import ReceiveBuffer
from nbdsrv.errors import LocalProtocolError, NegotiationError, RemoteProtocolError
from nbdsrv.state import HANDSHAKE_EDGES, HandshakeState, QueueingCore, TLSMode

DEFAULT_BLOCK_SIZE = (k.DEFAULT_MIN_BLOCK, k.DEFAULT_PREFERRED_BLOCK, k.MAX_PAYLOAD)
MAX_OPTION_REPLY_LENGTH = 1024 * 1024  # an option reply longer than this is refused


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


_S = HandshakeState
_Handler = Callable[["ClientHandshake"], "HandshakeState | None"]


class ClientHandshake(QueueingCore):
    """Option haggling from the client's side (see the module docstring for the table)."""

    _error_state = _S.ERROR

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        base_allocation: bool = True,
        buffer: ReceiveBuffer | None = None,
        tls: TLSMode | str = TLSMode.OFF,
    ) -> None:
        """`tls`: OFF ("off": never STARTTLS), OPTIONAL ("on": STARTTLS first; plaintext if the
        server refuses it) or REQUIRED ("require": STARTTLS first; a refusal is a
        NegotiationError: no plaintext)."""
        self.tls = TLSMode.parse(tls)
        self.tls_active = False
        self.buffer = buffer if buffer is not None else ReceiveBuffer()
        self._state: HandshakeState = _S.RECV_GREETING
        self.trace: list[HandshakeState] = [self._state]  # every state visited, for logs, tests
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
    def state(self) -> HandshakeState:
        return self._state

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def tls_requested(self) -> bool:
        """The server acknowledged STARTTLS: the shell must now wrap the stream in TLS (nothing
        more may be sent or received in plaintext) and call tls_established()."""
        return self._state is _S.STARTTLS_TLS_HANDSHAKE

    def tls_established(self) -> None:
        """The shell finished the TLS handshake: option haggling goes on over TLS."""
        if self._failure is not None:
            self._refuse("tls_established")
        try:
            if not self.tls_requested:
                raise LocalProtocolError(f"tls_established() in state {self._state}")
            self.tls_active = True
            self._move_to(self._after_tls())
            self._advance()
        except Exception as exc:
            self._enter_error(exc)
            raise

    @property
    def result(self) -> NegotiatedExport:
        if self._failure is not None:
            self._refuse("result")
        if self._result is None:
            raise LocalProtocolError(f"handshake not finished (state {self._state})")
        return self._result

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the server and run the table as far as they go."""
        if self._failure is not None:
            self._refuse("receive_data")
        try:
            if data:
                self.buffer.feed(data)
            self._advance()
        except Exception as exc:
            self._enter_error(exc)
            raise

    def receive_eof(self) -> None:
        """The server closed the connection before the handshake ended: a NegotiationError."""
        if self._failure is not None:
            self._refuse("receive_eof")
        if self._state is _S.EXPORT_NAME_RECV_REPLY:
            error = NegotiationError(
                f"server closed the connection after NBD_OPT_EXPORT_NAME "
                f"(no export named {self._export_name!r}?)"
            )
        else:
            error = NegotiationError(
                f"server closed the connection during the handshake ({self._state})"
            )
        self._enter_error(error)
        raise error

    # -- the table ------------------------------------------------------------------------------

    def _move_to(self, next_state: HandshakeState) -> None:
        if next_state not in HANDSHAKE_EDGES[self._state]:  # a bug in a handler
            raise LocalProtocolError(f"no handshake edge {self._state} -> {next_state}")
        self._state = next_state
        self.trace.append(next_state)

    def _advance(self) -> None:
        # Bounded: a RECV transition consumes a frame of at least 16 bytes, and SEND states
        # (at most one per option) always lead to a RECV state.
        for _ in range(len(self.buffer) // 16 + 16):
            if self._state is _S.READY:
                return
            next_state = _HANDLERS[self._state](self)
            if next_state is None:
                return
            self._move_to(next_state)
        raise LocalProtocolError("handshake state machine did not settle")  # a bug in the table

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

    def _recv_greeting(self) -> HandshakeState | None:
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
            if self.tls is TLSMode.REQUIRED:
                raise NegotiationError("TLS is required but the server is not fixed newstyle")
            return _S.EXPORT_NAME_SEND
        if self.tls is not TLSMode.OFF:
            return _S.STARTTLS_SEND
        return self._after_tls()

    def _after_tls(self) -> HandshakeState:
        if self._want_structured:
            return _S.STRUCTURED_REPLY_SEND
        return _S.GO_SEND

    # The SEND states: what each option carries (the table below pairs it with its state).

    def _meta_context_request(self) -> bytes:
        request = wire.MetaContextRequest(self._export_name, (k.BASE_ALLOCATION,))
        return wire.build_meta_context_request(request)

    def _info_request(self) -> bytes:
        wanted = (k.Info.NAME, k.Info.DESCRIPTION, k.Info.BLOCK_SIZE)
        return wire.build_info_request(
            wire.InfoRequest(self._export_name, tuple(int(i) for i in wanted))
        )

    def _export_name_request(self) -> bytes:
        return self._export_name.encode("utf-8")

    # The RECV_REPLY states: one complete reply to the option each (taken by _replies_to below).

    def _on_starttls_reply(self, reply_type: int, data: bytes) -> HandshakeState:
        if reply_type == k.OptionReply.ACK:
            _check_bare_ack(data)
            if len(self.buffer):  # the TLS handshake starts with our ClientHello
                raise RemoteProtocolError("plaintext bytes after the STARTTLS acknowledgement")
            return _S.STARTTLS_TLS_HANDSHAKE
        if not k.is_option_error(reply_type):
            raise RemoteProtocolError(f"reply type {reply_type} to NBD_OPT_STARTTLS")
        if self.tls is TLSMode.REQUIRED:  # never carry on in plaintext (spec: downgrade attacks)
            raise NegotiationError(_refusal("NBD_OPT_STARTTLS", reply_type, data), reply_type)
        return self._after_tls()

    def _wait_for_tls(self) -> None:
        return None  # the shell calls tls_established()

    def _on_structured_reply_reply(self, reply_type: int, data: bytes) -> HandshakeState:
        if reply_type == k.OptionReply.ACK:
            _check_bare_ack(data)
            self._structured = True
        elif not k.is_option_error(reply_type):
            raise RemoteProtocolError(f"reply type {reply_type} to NBD_OPT_STRUCTURED_REPLY")
        # else: refused (ERR_UNSUP, ERR_POLICY...): carry on with simple replies
        if self._structured and self._want_base_allocation:
            return _S.SET_META_CONTEXT_SEND
        return _S.GO_SEND

    def _on_set_meta_context_reply(self, reply_type: int, data: bytes) -> HandshakeState:
        if reply_type == k.OptionReply.META_CONTEXT:
            context = wire.parse_meta_context_reply(data)
            if context.name != k.BASE_ALLOCATION:
                raise RemoteProtocolError(f"meta context {context.name!r} that was not asked for")
            self._context_id = context.context_id
            return _S.SET_META_CONTEXT_RECV_REPLY  # more replies until ACK
        if reply_type == k.OptionReply.ACK:
            return _S.GO_SEND
        if k.is_option_error(reply_type):
            self._context_id = None
            return _S.GO_SEND
        raise RemoteProtocolError(f"reply type {reply_type} to NBD_OPT_SET_META_CONTEXT")

    def _on_go_reply(self, reply_type: int, data: bytes) -> HandshakeState:
        if reply_type == k.OptionReply.INFO:
            self._note_info(wire.parse_info(data))
            return _S.GO_RECV_REPLY
        if reply_type == k.OptionReply.ACK:
            if self._size is None:
                raise RemoteProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
            self._finish()
            return _S.READY
        if reply_type == k.OptionReply.ERR_UNSUP:
            # A server older than NBD_OPT_GO: the old way still works.
            return _S.EXPORT_NAME_SEND
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

    def _recv_export_name(self) -> HandshakeState | None:
        size = wire.EXPORT_NAME_REPLY_SIZE + (0 if self._no_zeroes else k.EXPORT_NAME_PADDING)
        data = self.buffer.take(size)
        if data is None:
            return None
        info = wire.parse_export_name_reply(data)
        self._size, self._flags = info.size, info.transmission_flags
        self._finish()
        return _S.READY

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


def _sends(
    option: k.Option,
    then: HandshakeState,
    payload: Callable[[ClientHandshake], bytes] | None = None,
) -> _Handler:
    """The handler of a SEND state: queue `option` (with what `payload` builds) and go on to
    `then`, its RECV_REPLY state."""

    def send(handshake: ClientHandshake) -> HandshakeState:
        handshake._outgoing += wire.build_option(option, payload(handshake) if payload else b"")
        return then

    return send


def _replies_to(
    option: k.Option, on_reply: Callable[[ClientHandshake, int, bytes], HandshakeState]
) -> _Handler:
    """The handler of a RECV_REPLY state: once the buffer holds one whole reply to `option`, take
    it and let `on_reply` choose the next state from its type and data (None until then)."""

    def receive(handshake: ClientHandshake) -> HandshakeState | None:
        reply = handshake._take_option_reply(option)
        return None if reply is None else on_reply(handshake, *reply)

    return receive


_O, _C = k.Option, ClientHandshake
_HANDLERS: dict[HandshakeState, _Handler] = {  # the state -> its handler
    _S.RECV_GREETING: _C._recv_greeting,
    _S.STARTTLS_SEND: _sends(_O.STARTTLS, _S.STARTTLS_RECV_REPLY),
    _S.STARTTLS_RECV_REPLY: _replies_to(_O.STARTTLS, _C._on_starttls_reply),
    _S.STARTTLS_TLS_HANDSHAKE: _C._wait_for_tls,
    _S.STRUCTURED_REPLY_SEND: _sends(_O.STRUCTURED_REPLY, _S.STRUCTURED_REPLY_RECV_REPLY),
    _S.STRUCTURED_REPLY_RECV_REPLY: _replies_to(_O.STRUCTURED_REPLY, _C._on_structured_reply_reply),
    _S.SET_META_CONTEXT_SEND: _sends(
        _O.SET_META_CONTEXT, _S.SET_META_CONTEXT_RECV_REPLY, _C._meta_context_request
    ),
    _S.SET_META_CONTEXT_RECV_REPLY: _replies_to(_O.SET_META_CONTEXT, _C._on_set_meta_context_reply),
    _S.GO_SEND: _sends(_O.GO, _S.GO_RECV_REPLY, _C._info_request),
    _S.GO_RECV_REPLY: _replies_to(_O.GO, _C._on_go_reply),
    _S.EXPORT_NAME_SEND: _sends(_O.EXPORT_NAME, _S.EXPORT_NAME_RECV_REPLY, _C._export_name_request),
    _S.EXPORT_NAME_RECV_REPLY: _C._recv_export_name,  # not an option reply: size and flags
}


def _check_bare_ack(data: bytes) -> None:
    if data:
        raise RemoteProtocolError("NBD_REP_ACK with a payload")


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


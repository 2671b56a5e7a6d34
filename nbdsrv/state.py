"""The state machines of nbdsrv's two sans-IO cores, as tables, and the rule they follow.

The rule (h11's `_state.py` habit).  A core's state changes only along an edge of its table
below: the server's `ServerState` by a named event (`SERVER_TRANSITIONS[state][event]`), the
client's handshake `HandshakeState` to a listed successor (`HANDSHAKE_EDGES[state]`); the
client's reply parser `ReplyState` is a plain loop over four states.  A move that is not in the
table is a bug in the core (LocalProtocolError).  Every state is named after libnbd's states
(`NEWSTYLE.OPT_GO.RECV_REPLY`, ...) so that logs read like libnbd's debug output.

Errors.  Every table has an ERROR state, entered in one place, `ProtocolCore._enter_error()`:
when a call into a core raises (the peer broke the protocol: RemoteProtocolError; it closed
early: ConnectionClosedError; the server refused what we need: NegotiationError; or the core was
driven in the wrong order: LocalProtocolError), the core records the exception, moves to ERROR
and refuses every later call that drives it (receive_data, receive_eof, next_event, data_to_send,
tls_established, request_*) with a LocalProtocolError naming the first failure.  What does not
drive the machine stays available: introspection (`state`, `in_flight`...), the server's reply
builders (pure functions of what was negotiated, called by handlers still finishing), and the
client's `abandon`/`forget` (cleanup in `except` clauses must not raise).  A call refused before
it changed anything refuses only itself and the connection goes on: a request whose arguments
are wrong (a read past the end, a flag the server does not offer), or the server's next_event()
while the shell still owes tls_established().

    ServerConnection               ClientHandshake                ClientTransmission
    ServerState + ERROR            HandshakeState + ERROR         ReplyState + ERROR
    SERVER_TRANSITIONS (events)    HANDSHAKE_EDGES (successors)   a loop over 4 states

`TLSMode` is shared by both sides: OFF never does TLS; OPTIONAL (the client's tls="on") does TLS
when the peer agrees and plaintext otherwise; REQUIRED (tls="require") never speaks plaintext
past STARTTLS.
"""

from __future__ import annotations

import enum
from typing import NoReturn

from nbdsrv.errors import LocalProtocolError


class TLSMode(enum.Enum):
    """TLS policy for a server (what it accepts) or a client (what it insists on)."""

    OFF = "off"  # NOTLS: a server answers STARTTLS with ERR_POLICY; a client never sends it
    OPTIONAL = "optional"  # TLS when both agree; a client carries on in plaintext on refusal
    REQUIRED = "required"  # FORCEDTLS: no option but STARTTLS/ABORT before TLS, no plaintext

    @classmethod
    def parse(cls, value: TLSMode | str) -> TLSMode:
        """A TLSMode from itself or from its command-line spelling: "off", "on" or "require"
        (nbdkit's and libnbd's words), or the enum values "optional" and "required"."""
        if isinstance(value, TLSMode):
            return value
        mode = _TLS_SPELLINGS.get(value) if isinstance(value, str) else None
        if mode is None:
            raise ValueError(f"tls must be off, on or require, not {value!r}")
        return mode


_TLS_SPELLINGS = {
    "off": TLSMode.OFF,
    "on": TLSMode.OPTIONAL,
    "optional": TLSMode.OPTIONAL,
    "require": TLSMode.REQUIRED,
    "required": TLSMode.REQUIRED,
}


# -- the server: option haggling and transmission -----------------------------------------------


class ServerState(enum.StrEnum):
    RECV_CLIENT_FLAGS = "NEWSTYLE.RECV_CLIENT_FLAGS"
    RECV_OPTION = "NEWSTYLE.RECV_OPTION"
    TLS_HANDSHAKE = "NEWSTYLE.OPT_STARTTLS.HANDSHAKE"
    RECV_REQUEST = "TRANSMISSION.RECV_REQUEST"
    RECV_WRITE_PAYLOAD = "TRANSMISSION.RECV_WRITE_PAYLOAD"
    DISCARD_WRITE_PAYLOAD = "TRANSMISSION.DISCARD_WRITE_PAYLOAD"
    CLOSED = "CLOSED"  # ended as the protocol says (ABORT, DISC, a refusal that closes)
    ERROR = "ERROR"  # a call raised: every later call is refused


#   RECV_CLIENT_FLAGS  --client_flags-->    RECV_OPTION
#   RECV_OPTION        --option_answered--> RECV_OPTION
#                      --starttls_ack-->    TLS_HANDSHAKE --tls_established--> RECV_OPTION
#                      --go/export_name-->  RECV_REQUEST
#                      --abort/close-->     CLOSED
#   RECV_REQUEST       --request-->         RECV_REQUEST
#                      --write_header-->    RECV_WRITE_PAYLOAD    --payload_done--> RECV_REQUEST
#                      --refused_write-->   DISCARD_WRITE_PAYLOAD --payload_done--> RECV_REQUEST
#                      --disc/close-->      CLOSED
#   any state          --(an exception)-->  ERROR   (ProtocolCore._enter_error, not an edge)
SERVER_TRANSITIONS: dict[ServerState, dict[str, ServerState]] = {
    ServerState.RECV_CLIENT_FLAGS: {
        "client_flags": ServerState.RECV_OPTION,
        "close": ServerState.CLOSED,
    },
    ServerState.RECV_OPTION: {
        "option_answered": ServerState.RECV_OPTION,
        "starttls_ack": ServerState.TLS_HANDSHAKE,
        "go": ServerState.RECV_REQUEST,
        "export_name": ServerState.RECV_REQUEST,
        "abort": ServerState.CLOSED,
        "close": ServerState.CLOSED,
    },
    ServerState.TLS_HANDSHAKE: {
        "tls_established": ServerState.RECV_OPTION,
        "close": ServerState.CLOSED,
    },
    ServerState.RECV_REQUEST: {
        "request": ServerState.RECV_REQUEST,
        "write_header": ServerState.RECV_WRITE_PAYLOAD,
        "refused_write": ServerState.DISCARD_WRITE_PAYLOAD,
        "disc": ServerState.CLOSED,
        "close": ServerState.CLOSED,
    },
    ServerState.RECV_WRITE_PAYLOAD: {
        "payload_done": ServerState.RECV_REQUEST,
        "close": ServerState.CLOSED,
    },
    ServerState.DISCARD_WRITE_PAYLOAD: {
        "payload_done": ServerState.RECV_REQUEST,
        "close": ServerState.CLOSED,
    },
    ServerState.CLOSED: {"close": ServerState.CLOSED},
    ServerState.ERROR: {},
}


# -- the client: option haggling ----------------------------------------------------------------


class HandshakeState(enum.StrEnum):
    RECV_GREETING = "NEWSTYLE.RECV_GREETING"
    STARTTLS_SEND = "NEWSTYLE.OPT_STARTTLS.SEND"
    STARTTLS_RECV_REPLY = "NEWSTYLE.OPT_STARTTLS.RECV_REPLY"
    STARTTLS_TLS_HANDSHAKE = "NEWSTYLE.OPT_STARTTLS.TLS_HANDSHAKE"
    STRUCTURED_REPLY_SEND = "NEWSTYLE.OPT_STRUCTURED_REPLY.SEND"
    STRUCTURED_REPLY_RECV_REPLY = "NEWSTYLE.OPT_STRUCTURED_REPLY.RECV_REPLY"
    SET_META_CONTEXT_SEND = "NEWSTYLE.OPT_SET_META_CONTEXT.SEND"
    SET_META_CONTEXT_RECV_REPLY = "NEWSTYLE.OPT_SET_META_CONTEXT.RECV_REPLY"
    GO_SEND = "NEWSTYLE.OPT_GO.SEND"
    GO_RECV_REPLY = "NEWSTYLE.OPT_GO.RECV_REPLY"
    EXPORT_NAME_SEND = "NEWSTYLE.OPT_EXPORT_NAME.SEND"
    EXPORT_NAME_RECV_REPLY = "NEWSTYLE.OPT_EXPORT_NAME.RECV_REPLY"
    READY = "READY"  # transmission may start (ClientTransmission takes over)
    ERROR = "ERROR"


_H = HandshakeState
# Where each state may go next; the handler of each state lives in ClientHandshake (see its
# module docstring for which reply takes which edge).  SEND states queue one option and move to
# their RECV state at once; RECV states consume one whole option reply per step.
HANDSHAKE_EDGES: dict[HandshakeState, frozenset[HandshakeState]] = {
    _H.RECV_GREETING: frozenset({_H.STRUCTURED_REPLY_SEND, _H.GO_SEND, _H.STARTTLS_SEND,
                                 _H.EXPORT_NAME_SEND}),
    _H.STARTTLS_SEND: frozenset({_H.STARTTLS_RECV_REPLY}),
    _H.STARTTLS_RECV_REPLY: frozenset({_H.STARTTLS_TLS_HANDSHAKE, _H.STRUCTURED_REPLY_SEND,
                                       _H.GO_SEND}),
    _H.STARTTLS_TLS_HANDSHAKE: frozenset({_H.STRUCTURED_REPLY_SEND, _H.GO_SEND}),
    _H.STRUCTURED_REPLY_SEND: frozenset({_H.STRUCTURED_REPLY_RECV_REPLY}),
    _H.STRUCTURED_REPLY_RECV_REPLY: frozenset({_H.SET_META_CONTEXT_SEND, _H.GO_SEND}),
    _H.SET_META_CONTEXT_SEND: frozenset({_H.SET_META_CONTEXT_RECV_REPLY}),
    _H.SET_META_CONTEXT_RECV_REPLY: frozenset({_H.SET_META_CONTEXT_RECV_REPLY, _H.GO_SEND}),
    _H.GO_SEND: frozenset({_H.GO_RECV_REPLY}),
    _H.GO_RECV_REPLY: frozenset({_H.GO_RECV_REPLY, _H.READY, _H.EXPORT_NAME_SEND}),
    _H.EXPORT_NAME_SEND: frozenset({_H.EXPORT_NAME_RECV_REPLY}),
    _H.EXPORT_NAME_RECV_REPLY: frozenset({_H.READY}),
    _H.READY: frozenset(),
    _H.ERROR: frozenset(),
}


# -- the client: replies in transmission ---------------------------------------------------------


class ReplyState(enum.StrEnum):
    """Where the client's reply parser is in the byte stream."""

    HEADER = "TRANSMISSION.REPLY.START"  # a simple reply or a chunk header comes next
    DATA_OFFSET = "TRANSMISSION.REPLY.CHUNK_REPLY.RECV_OFFSET_DATA"  # OFFSET_DATA's offset
    DATA_PAYLOAD = "TRANSMISSION.REPLY.RECV_READ_PAYLOAD"  # READ data (into the caller's buffer)
    CHUNK_PAYLOAD = "TRANSMISSION.REPLY.CHUNK_REPLY.RECV_PAYLOAD"  # any other chunk's payload
    ERROR = "ERROR"


# -- the central error transition ---------------------------------------------------------------


class ProtocolCore:
    """What every core shares: its current state, and the one way into ERROR.

    A core sets `_state` from its own table and `_error_state` to its table's ERROR member; its
    public calls that drive the machine begin with `if self._failure is not None:
    self._refuse(name)` and wrap their work in `except Exception as exc: self._enter_error(exc);
    raise` (a plain try costs nothing on the hot path, unlike a decorator)."""

    _state: enum.Enum
    _error_state: enum.Enum
    _failure: BaseException | None = None

    @property
    def failure(self) -> BaseException | None:
        """The exception that moved this core to ERROR, or None."""
        return self._failure

    def _enter_error(self, exc: BaseException) -> None:
        """THE error transition: remember the first failure and stop in ERROR."""
        if self._failure is None:
            self._failure = exc
        self._state = self._error_state

    def _refuse(self, call: str) -> NoReturn:
        raise LocalProtocolError(
            f"{call}() after the connection failed ({type(self._failure).__name__}: "
            f"{self._failure})"
        ) from self._failure


class QueueingCore(ProtocolCore):
    """A core that queues the bytes it wants sent (the two handshakes: greeting, options and
    their replies) until the shell asks for them.  The client's transmission core queues nothing:
    each request_* call returns its own bytes."""

    _outgoing: bytearray

    def data_to_send(self) -> bytes:
        """The queued bytes, in order; empties the queue."""
        if self._failure is not None:
            self._refuse("data_to_send")
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

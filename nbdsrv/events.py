"""The events nbdsrv's sans-IO cores hand to their shells, and the one NEED_DATA sentinel.

Both cores are driven the same way: the shell feeds bytes with `receive_data()`, says the peer
closed with `receive_eof()`, and asks `next_event()` for the next event until it answers
NEED_DATA (feed more bytes first).  An event is a frozen dataclass; the shell matches on its type.
(The client's handshake, ClientHandshake, has no events: it runs as far as the bytes go inside
receive_data(), and the shell reads `tls_requested` and `done`.)

    ServerConnection.next_event()      ClientTransmission.next_event()
      OptionHandled    (for logs)        RequestFinished   (a reply is complete)
      TLSRequested     (wrap in TLS)
      ExportOpened     (transmission starts)
      HandshakeEnded   (close)
      CommandReceived  (execute, reply)
      CommandRefused   (send error_reply)
      DisconnectRequested
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from nbdsrv import wire
from nbdsrv.errors import CommandError
from nbdsrv.extent import Extent

if TYPE_CHECKING:
    from nbdsrv.server_core import ExportSpec


class NeedData:
    """Sentinel type: feed more bytes with receive_data() before asking again."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# -- the server's events ------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionHandled:
    """An option was decoded and answered (replies are queued); for logs."""

    state: str  # e.g. "NEWSTYLE.OPT_GO"
    option: int
    reply_type: int  # the final reply sent (ACK or an error)
    detail: str = ""


@dataclass(frozen=True)
class TLSRequested:
    """STARTTLS was acknowledged: send the queued bytes, wrap the stream, call tls_established()."""


@dataclass(frozen=True)
class HandshakeEnded:
    """The handshake ended without an export (ABORT, or EXPORT_NAME of an unknown export):
    send the queued bytes, then close."""

    reason: str
    refused: bool = False  # True when we closed (EXPORT_NAME we cannot serve), not the client


@dataclass(frozen=True)
class ExportOpened:
    """Transmission starts on `export`; send the queued bytes first."""

    export: ExportSpec
    structured_replies: bool
    block_status: bool  # base:allocation was selected
    transmission_flags: int


@dataclass(frozen=True)
class CommandReceived:
    """A valid request.  `payload` is a WRITE's data (None for other commands)."""

    request: wire.Request
    payload: bytes | None = None


@dataclass(frozen=True)
class CommandRefused:
    """An invalid request: answer `error_reply(request, errno, message)`; if `close_after`,
    close the connection after sending it (the stream cannot be resynchronised cheaply)."""

    request: wire.Request
    errno: int
    message: str
    close_after: bool = False


@dataclass(frozen=True)
class DisconnectRequested:
    """NBD_CMD_DISC: finish the requests in flight, then close."""


ServerEvent = (
    OptionHandled
    | TLSRequested
    | HandshakeEnded
    | ExportOpened
    | CommandReceived
    | CommandRefused
    | DisconnectRequested
)


# -- the client's events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """A request's reply is complete.  `error` is set when the server failed it; `extents` is
    the answer of a BLOCK_STATUS; `abandoned` when the caller gave up on it (ignore it)."""

    cookie: int
    error: CommandError | None = None
    extents: list[Extent] | None = None
    abandoned: bool = False

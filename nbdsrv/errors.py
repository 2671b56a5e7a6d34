"""Errors raised by nbdsrv.  Each says who is at fault.

    NBDError
    ├── LocalProtocolError     we misused the API (a request that the negotiated session forbids)
    ├── RemoteProtocolError    the peer broke the NBD protocol (bad magic, bad length, unknown
    │                          cookie, overlapping chunks...); the connection is not trusted after
    ├── NegotiationError       the handshake did not end in a usable export (carries the option
    │                          reply code, e.g. ERR_UNKNOWN for a missing export, ERR_TLS_REQD)
    ├── CommandError           the server answered a command with an error: carries `errno`
    │                          (an `errno` module value) and the server's message; the connection
    │                          stays usable
    └── ConnectionClosedError  the connection dropped (or was closed) with requests pending; every
                               pending request fails with it at once
"""

from __future__ import annotations

import errno as _errno
import os


class NBDError(Exception):
    """Base of every nbdsrv error."""


class LocalProtocolError(NBDError):
    """Our side misused the protocol or the API."""


class RemoteProtocolError(NBDError):
    """The peer violated the NBD protocol."""


class NegotiationError(NBDError):
    """Option haggling failed; `reply_type` is the server's error reply code when there was one."""

    def __init__(self, message: str, reply_type: int | None = None) -> None:
        super().__init__(message)
        self.reply_type = reply_type


class CommandError(NBDError):
    """A command failed on the server; `errno` is a local errno value (errno.EIO, ...)."""

    def __init__(self, errno: int, message: str = "") -> None:
        self.errno = errno
        self.message = message
        name = _errno.errorcode.get(errno, str(errno))
        text = f"{name}: {message}" if message else f"{name}: {os.strerror(errno)}"
        super().__init__(text)


class ConnectionClosedError(NBDError):
    """The connection is gone; pending and later requests fail with this."""

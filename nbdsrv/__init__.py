"""nbdsrv: the NBD protocol (sans-IO core), a trio server and a trio client.

    async with nbdsrv.open_client("nbd+unix:///?socket=/run/disk.sock") as client:
        data = await client.pread(0, 4096)

The trio shells are imported lazily so that users of one side do not load the other.
"""

from __future__ import annotations

from typing import Any

from nbdsrv.errors import (
    CommandError,
    ConnectionClosedError,
    LocalProtocolError,
    NBDError,
    NegotiationError,
    RemoteProtocolError,
)
from nbdsrv.extent import Extent
from nbdsrv.state import TLSMode

__all__ = [
    "CommandError",
    "ConnectionClosedError",
    "Extent",
    "LocalProtocolError",
    "NBDError",
    "NegotiationError",
    "RemoteProtocolError",
    "TLSMode",
    "open_client",
]

_LAZY = {"open_client": "nbdsrv.client", "Client": "nbdsrv.client", "Server": "nbdsrv.server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nbdsrv' has no attribute {name!r}")

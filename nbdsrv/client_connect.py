"""Opening one client connection: connect, STARTTLS when asked, and run the handshake.

`open_connection` connects (TCP or Unix socket, or a caller's stream factory), drives the sans-IO
`ClientHandshake` over the stream, wraps the stream in a `trio.SSLStream` when the server
acknowledged STARTTLS (the handshake then goes on over TLS), and returns a `Connection` ready for
transmission with the export the handshake settled.  `tls_settings` turns open_client's TLS
arguments (a mode, PEM files, a hostname, a context, or a URI's tls-certificates=DIR) into one
`TLSSettings`.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from nbdsrv.buffer import ReceiveBuffer
from nbdsrv.client_connection import Connection
from nbdsrv.client_core import ClientHandshake, ClientTransmission, NegotiatedExport
from nbdsrv.errors import ConnectionClosedError, NegotiationError, RemoteProtocolError
from nbdsrv.state import TLSMode
from nbdsrv.tls import client_ssl_context
from nbdsrv.uri import NBDAddress


async def connect_address(address: NBDAddress) -> trio.abc.Stream:
    if address.transport == "unix":
        assert address.socket_path is not None
        return await trio.open_unix_socket(address.socket_path)
    assert address.host is not None
    stream = await trio.open_tcp_stream(address.host, address.port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return stream


@dataclass(frozen=True)
class TLSSettings:
    """How a connection does STARTTLS: its TLSMode (see ClientHandshake), and how to verify."""

    mode: TLSMode = TLSMode.OFF
    context: ssl.SSLContext | None = None
    server_hostname: str | None = None


async def start_tls(stream: trio.abc.Stream, tls: TLSSettings) -> trio.abc.Stream:
    """Wrap `stream` in TLS after the server acknowledged STARTTLS and run the TLS handshake; a
    failed one (the server's certificate does not verify, the server wants a client certificate
    we lack) is a NegotiationError."""
    assert tls.context is not None
    tls_stream = trio.SSLStream(stream, tls.context, server_hostname=tls.server_hostname)
    try:
        await tls_stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
        raise NegotiationError(f"TLS handshake failed: {reason or cause or exc}") from exc
    return tls_stream


async def run_handshake(
    stream: trio.abc.Stream, export_name: str, tls: TLSSettings = TLSSettings()
) -> tuple[NegotiatedExport, ReceiveBuffer, trio.abc.Stream]:
    """Option haggling; returns the export, the bytes received past it and the stream to use
    from now on (a TLS stream after STARTTLS)."""
    buffer = ReceiveBuffer()
    handshake = ClientHandshake(export_name, buffer=buffer, tls=tls.mode)
    try:
        for _ in range(10_000):  # bounded: each round trip makes progress or the server closes
            if handshake.done:
                break
            data = await stream.receive_some(65536)
            if not data:
                handshake.receive_eof()  # raises NegotiationError
            handshake.receive_data(data)
            if handshake.tls_requested:
                stream = await start_tls(stream, tls)
                handshake.tls_established()
            outgoing = handshake.data_to_send()
            if outgoing:
                await stream.send_all(outgoing)
        else:
            raise RemoteProtocolError("handshake did not finish")
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if not handshake.tls_active:  # a reset: callers handle NBDError and OSError only
            why = cause or exc
            raise ConnectionClosedError(f"connection lost during the handshake: {why}") from exc
        # With TLS 1.3 a server that refuses our certificate says so after its side of the
        # TLS handshake: as an alert on the first read.
        reason = getattr(cause, "reason", None) or cause or exc
        raise NegotiationError(f"TLS session failed during the handshake: {reason}") from exc
    return handshake.result, buffer, stream


StreamFactory = Callable[[], Awaitable[trio.abc.Stream]]


async def open_connection(
    address: NBDAddress,
    connect: StreamFactory,
    on_failure: Callable[[], None],
    tls: TLSSettings = TLSSettings(),
) -> tuple[Connection, NegotiatedExport]:
    stream = await connect()
    try:
        export, buffer, stream = await run_handshake(stream, address.export_name, tls)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    core = ClientTransmission(export, buffer)
    return Connection(stream, core, on_failure), export


def tls_settings(
    address: NBDAddress,
    tls: TLSMode | str | None,
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    hostname: str | None,
    context: ssl.SSLContext | None,
) -> TLSSettings:
    """open_client's TLS arguments as one TLSSettings (ValueError when they contradict)."""
    mode = TLSMode.parse(tls) if tls is not None else (
        TLSMode.REQUIRED if address.tls else TLSMode.OFF
    )
    if address.tls and mode is not TLSMode.REQUIRED:
        raise ValueError(f"an nbds URI requires TLS (tls={tls!r} given)")
    if mode is TLSMode.OFF:
        if ca or cert or key or context:
            raise ValueError("TLS files or context given with tls='off'")
        return TLSSettings()
    if hostname is None and address.transport == "tcp":
        hostname = address.host
    directory = address.tls_certificates
    if directory is not None and context is None and not (ca or cert or key):
        # libnbd's layout: the CA, and a client certificate when there is one
        ca = os.path.join(directory, "ca-cert.pem")
        if os.path.exists(os.path.join(directory, "client-cert.pem")):
            cert = os.path.join(directory, "client-cert.pem")
            key = os.path.join(directory, "client-key.pem")
    if context is None:
        context = client_ssl_context(
            ca_file=ca, cert_file=cert, key_file=key, check_hostname=hostname is not None
        )
    return TLSSettings(mode, context, hostname)

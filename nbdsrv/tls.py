"""TLS contexts for NBD STARTTLS (X.509 certificates in PEM files), for the server and the client.

    server = server_ssl_context("server-cert.pem", "server-key.pem",
                                ca_file="ca-cert.pem", verify_peer=True)
    client = client_ssl_context(ca_file="ca-cert.pem",
                                cert_file="client-cert.pem", key_file="client-key.pem")

How it works: plain `ssl.SSLContext`s, TLS 1.2 at least (the NBD spec: "MUST support TLS 1.2 ...
SHOULD NOT [support older versions] by default").  The shells (nbdsrv.server, nbdsrv.client)
wrap their stream with `trio.SSLStream(stream, context, server_side=...)` after STARTTLS is
acknowledged.  Client-certificate verification (`verify_peer`) is what keeps an export to the
hosts holding a certificate signed by the given CA: a client without one fails the TLS handshake.
The files are PEM, as nbdkit (`--tls-certificates DIR`: ca-cert.pem, server-cert.pem,
server-key.pem) and qemu (`tls-creds-x509,dir=DIR`: ca-cert.pem, client-cert.pem, client-key.pem)
expect them, so one directory serves all three.

A missing or unreadable file or a key that does not match its certificate raises `TLSConfigError`
(a ValueError) with a one-line message naming the file.
"""

from __future__ import annotations

import os
import ssl

__all__ = ["TLSConfigError", "client_ssl_context", "server_ssl_context"]


class TLSConfigError(ValueError):
    """A certificate, key or CA file cannot be used (the message names it)."""


def _readable(path: str | os.PathLike[str], what: str) -> str:
    text = os.fspath(path)
    try:
        with open(text, "rb"):
            pass
    except OSError as exc:
        raise TLSConfigError(f"cannot read the TLS {what} {text}: {exc.strerror or exc}") from None
    return text


def _load_chain(
    context: ssl.SSLContext, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]
) -> None:
    cert, key = _readable(cert_file, "certificate"), _readable(key_file, "key")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"cannot use the TLS certificate {cert} with the key {key}: {exc.reason or exc}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca_file: str | os.PathLike[str]) -> None:
    ca = _readable(ca_file, "CA certificate")
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        reason = exc.reason or exc
        raise TLSConfigError(f"cannot use the TLS CA certificate {ca}: {reason}") from None


def server_ssl_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    *,
    ca_file: str | os.PathLike[str] | None = None,
    verify_peer: bool = False,
) -> ssl.SSLContext:
    """The server's context.  With `verify_peer`, a client must present a certificate signed by
    `ca_file` (required then) or the TLS handshake fails."""
    if verify_peer and ca_file is None:
        raise TLSConfigError("verifying client certificates needs a CA certificate file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert_file, key_file)
    if ca_file is not None:
        _load_ca(context, ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    return context


def client_ssl_context(
    *,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """The client's context: the server's certificate must chain to `ca_file` (or to the
    system's CAs when None); `cert_file`/`key_file` are the client certificate, for servers
    that verify peers.  `check_hostname=False` verifies the chain only (a Unix socket has no
    host name to check)."""
    if (cert_file is None) != (key_file is None):
        raise TLSConfigError("a client certificate needs both a certificate and a key file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        _load_ca(context, ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        _load_chain(context, cert_file, key_file)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    return context

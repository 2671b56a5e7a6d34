"""Where an NBD export lives: parse the URI forms that qemu and libnbd accept.

    nbd://host[:port][/export]              TCP, port 10809 by default; IPv6 as [::1]
    nbd+unix:///export?socket=/path         a Unix socket (the host part must be empty)
    nbds://...  nbds+unix://...             the same over TLS (parsed and flagged: `tls=True`)
    ...&tls-certificates=DIR                the PEM directory, as libnbd reads it (ca-cert.pem,
                                            and client-cert.pem/client-key.pem when present)
    /path/to/socket  (anything without "://")   a bare Unix socket path, default export ""

The export name is the URI path without its leading "/", percent-decoded (so "nbd://h/" and
"nbd://h" both name the default export "").  A bad URI raises ValueError with a one-line message
that quotes the URI; callers facing an operator turn it into a UserError.

A listen address is written `HOST:PORT` (`[IPV6]:PORT`): `parse_host_port` reads it and
`format_host_port` writes it back.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

DEFAULT_PORT = 10809
_SCHEMES = {
    "nbd": ("tcp", False),
    "nbds": ("tcp", True),
    "nbd+tcp": ("tcp", False),
    "nbds+tcp": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
}
_IGNORED_QUERY_KEYS = frozenset({"tls-verify-peer", "tls-psk-file"})


@dataclass(frozen=True)
class NBDAddress:
    """A parsed NBD URI.  `transport` is "tcp" (host, port) or "unix" (socket_path)."""

    transport: str
    export_name: str = ""
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None
    tls: bool = False
    # where the TLS PEM files are (libnbd's tls-certificates=): configuration, not identity
    tls_certificates: str | None = field(default=None, compare=False)

    def uri(self) -> str:
        """The address as a URI that libnbd, qemu and nbdcopy accept."""
        scheme = ("nbds" if self.tls else "nbd") + ("+unix" if self.transport == "unix" else "")
        export = urllib.parse.quote(self.export_name, safe="")
        certificates = ""
        if self.tls_certificates is not None:
            certificates = "tls-certificates=" + urllib.parse.quote(self.tls_certificates, safe="/")
        if self.transport == "unix":
            assert self.socket_path is not None
            socket_query = f"socket={urllib.parse.quote(self.socket_path, safe='/')}"
            query = "&".join(part for part in (socket_query, certificates) if part)
            return f"{scheme}:///{export}?{query}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        query = f"?{certificates}" if certificates else ""
        return f"{scheme}://{host}:{self.port}/{export}{query}"


def parse_nbd_uri(text: str) -> NBDAddress:
    """Parse an NBD URI or a bare socket path; raises ValueError("invalid NBD URI ...")."""
    if not text:
        raise ValueError("invalid NBD URI '': empty")
    if "://" not in text:
        return NBDAddress("unix", socket_path=text)
    scheme = text.split("://", 1)[0].lower()
    if scheme not in _SCHEMES:
        raise _invalid(text, f"unknown scheme {scheme!r} (nbd, nbds, nbd+unix, nbds+unix)")
    transport, tls = _SCHEMES[scheme]
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise _invalid(text, str(exc)) from None
    if parts.fragment:
        raise _invalid(text, "fragments are not allowed")
    export_name = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query: dict[str, list[str]] = {}
    for item in parts.query.split("&") if parts.query else []:
        key, _, value = item.partition("=")  # unquote, not unquote_plus: "+" may be in a path
        query.setdefault(urllib.parse.unquote(key), []).append(urllib.parse.unquote(value))
    for key in query:
        if key not in ("socket", "tls-certificates") and key not in _IGNORED_QUERY_KEYS:
            raise _invalid(text, f"unknown query parameter {key!r}")
    certificates = query.get("tls-certificates", [])
    if len(certificates) > 1 or certificates == [""]:
        raise _invalid(text, "tls-certificates= names one directory")
    tls_certificates = certificates[0] if certificates else None
    if transport == "unix":
        if parts.netloc:
            raise _invalid(text, "a unix URI has no host (write nbd+unix:///export?socket=...)")
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise _invalid(text, "a unix URI needs exactly one ?socket=/path")
        return NBDAddress(
            "unix", export_name, socket_path=sockets[0], tls=tls, tls_certificates=tls_certificates
        )
    if "socket" in query:
        raise _invalid(text, "?socket= belongs to nbd+unix:// URIs")
    host = parts.hostname
    if not host:
        raise _invalid(text, "no host")
    return NBDAddress(
        "tcp", export_name, host=host, port=DEFAULT_PORT if port is None else port, tls=tls,
        tls_certificates=tls_certificates,
    )


def parse_host_port(
    text: str, *, default_host: str | None = None, allow_port_zero: bool = False
) -> tuple[str, int]:
    """`HOST:PORT`, `[IPV6]:PORT`, or `:PORT` when there is a `default_host` (a listener's
    "every address"); port 0 ("any free port") only with `allow_port_zero`.  Raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or (default_host or "")
    lowest = 0 if allow_port_zero else 1
    port = int(port_text) if port_text.isascii() and port_text.isdigit() else -1
    if not sep or not host or not lowest <= port <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, port


def format_host_port(host: str, port: int) -> str:
    """`HOST:PORT`, with an IPv6 host in brackets (what `parse_host_port` reads back)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _invalid(text: str, why: str) -> ValueError:
    return ValueError(f"invalid NBD URI {text!r}: {why}")

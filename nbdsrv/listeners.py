"""Listening sockets for the NBD server, and the URI that reaches each.

`open_unix_listener` creates a Unix socket whose owner and mode are set before listen() (so
nobody else can ever connect), replacing a stale socket file left by a dead server but never a
live one (`remove_stale_socket`, also for servers started otherwise); `open_tcp_listener` binds
the first address a host resolves to; `listener_uri` names a listener as an nbd:// or
nbd+unix:// URI (nbds... under TLS).  `serve_nbd` in nbdsrv.server
puts them together.
"""

from __future__ import annotations

import errno
import os
import socket as stdlib_socket
import stat

import trio


def remove_stale_socket(path: str) -> None:
    """Remove a socket file at `path` that nobody listens on any more (a dead server's), so a
    new server can bind there.  A live one raises OSError(EADDRINUSE), any other file
    FileExistsError; no file at all is fine."""
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except FileNotFoundError:
        return  # removed meanwhile
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server is already listening on", path)


async def open_unix_listener(
    path: str, *, mode: int | None = None, group: int | None = None
) -> trio.SocketListener:
    """Listen on a Unix socket at `path`: mode 0600, or with `group` (a gid) owned by that group
    and mode 0660; the owner and mode are set before listen(), so nobody else can ever connect.
    A stale socket file left by a dead server is replaced; a live one raises
    OSError(EADDRINUSE); any other file raises FileExistsError."""
    if mode is None:
        mode = 0o600 if group is None else 0o660
    remove_stale_socket(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)  # before listen(): nobody can connect in between
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def open_tcp_listener(host: str, port: int) -> trio.SocketListener:
    """Listen on the first address `host` resolves to (port 0: any free port)."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(errno.EADDRNOTAVAIL, f"{host} resolves to no address")
    family, kind, proto, _, address = infos[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind(address)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def listener_uri(listener: trio.SocketListener, export_name: str = "", *, tls: bool = False) -> str:
    """The NBD URI (nbd:// or nbd+unix://; nbds... with `tls`) that reaches `listener`."""
    scheme = "nbds" if tls else "nbd"
    address = listener.socket.getsockname()
    if listener.socket.family == trio.socket.AF_UNIX:
        return f"{scheme}+unix:///{export_name}?socket={address}"
    host = address[0]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{address[1]}/{export_name}"

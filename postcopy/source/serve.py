"""The `postcopy serve` service: export disk images over NBD until SIGINT or SIGTERM.

    config = ServeConfig(exports=[("", "/srv/disk.img")], socket_path="/run/disk.sock")
    trio.run(run_serve, config)

Each image is opened with `open_backend` (by default `nbdsrv.backend.FileBackend`, read-only
unless `writable`; a test may wrap it, e.g. to delay reads) and served by
`nbdsrv.server.serve_nbd`.  When the listeners are up a ready line goes to stdout and is flushed:
`ready <uri> [<uri> ...]`, one URI per listener, so scripts and tests can wait for it.  A signal
stops the server: requests in flight are answered (for up to SHUTDOWN_GRACE seconds), the
connections closed, the Unix socket removed, one log line sums up what was served (connections,
requests, bytes sent) and the function returns normally.

Least exposure: exports are read-only unless `writable`; a Unix socket is mode 0600, or 0660 and
owned by `socket_group`; TCP listens only on the address given; export names are matched exactly.
TLS (`tls="on"` accepts STARTTLS, `"require"` refuses every option until it): `tls_cert` and
`tls_key` are the server's PEM files, `tls_ca` the CA that client certificates must chain to when
`tls_verify_peer` (then only hosts holding such a certificate can read the export).

Problems an operator can fix (a missing image, a bad or busy address, two exports with one name,
no export at all, TLS files that are missing or do not match, an unknown group) raise
`postcopy.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TextIO

import trio

from nbdsrv.backend import Backend, FileBackend
from nbdsrv.server import Export, Server, Serving, serve_nbd
from nbdsrv.server_core import TLSMode
from nbdsrv.tls import TLSConfigError, server_ssl_context
from nbdsrv.uri import parse_host_port
from postcopy.errors import UserError

log = logging.getLogger("postcopy.source.serve")
SHUTDOWN_GRACE = 5.0  # seconds the requests in flight get to finish after a signal
TLS_MODES = {"off": TLSMode.OFF, "on": TLSMode.OPTIONAL, "require": TLSMode.REQUIRED}


# (image path, writable) -> the Backend serving it; OSError when it cannot be opened
BackendOpener = Callable[[str, bool], Backend]


def open_file_backend(path: str, writable: bool) -> Backend:
    return FileBackend(path, writable=writable)


@dataclass(frozen=True)
class ServeConfig:
    exports: Sequence[tuple[str, str]]  # (export name, image path)
    listen: tuple[str, int] | None = None
    socket_path: str | None = None
    writable: bool = False
    open_backend: BackendOpener = field(default=open_file_backend, compare=False)
    ready_stream: TextIO | None = field(default=None, compare=False)
    socket_group: str | None = None  # group name or gid: the Unix socket becomes 0660
    tls: str = "off"  # off | on | require
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_verify_peer: bool = False


def resolve_group(text: str) -> int:
    """A group name or a numeric gid -> gid (UserError when no such group)."""
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        if text.isdigit():
            return int(text)
        raise UserError(f"no group named {text!r}") from None


def make_server(config: ServeConfig, exports: Sequence[Export]) -> Server:
    """The nbdsrv Server for `config` (its TLS mode and context); UserError on bad TLS options."""
    mode = TLS_MODES.get(config.tls)
    if mode is None:
        raise UserError(f"--tls={config.tls}: expected off, on or require")
    tls_files = config.tls_cert or config.tls_key or config.tls_ca or config.tls_verify_peer
    if mode is TLSMode.OFF:
        if tls_files:
            raise UserError("TLS options given with --tls=off (use --tls=on or require)")
        return Server(exports)
    if not (config.tls_cert and config.tls_key):
        raise UserError(f"--tls={config.tls} needs --tls-cert and --tls-key")
    if config.tls_verify_peer and not config.tls_ca:
        raise UserError("--tls-verify-peer needs --tls-ca (the CA client certificates chain to)")
    try:
        context = server_ssl_context(
            config.tls_cert, config.tls_key, ca_file=config.tls_ca,
            verify_peer=config.tls_verify_peer,
        )
    except TLSConfigError as exc:
        raise UserError(str(exc)) from None
    if not config.tls_verify_peer:
        log.warning("TLS without --tls-verify-peer: any client that can connect may read the "
                    "exports (give --tls-ca and --tls-verify-peer to admit only your hosts)")
    elif mode is TLSMode.OPTIONAL:
        log.warning("--tls=on admits plaintext clients, whose certificates are never checked: "
                    "use --tls=require so that only your hosts can read the exports")
    return Server(exports, tls=mode, ssl_context=context)


def parse_export(text: str) -> tuple[str, str]:
    """`PATH` (the empty export name) or `NAME=PATH`."""
    name, sep, path = text.partition("=")
    if not sep:
        return "", text
    if not path:
        raise UserError(f"export {text!r} names no image path")
    return name, path


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPV6]:PORT` or `:PORT` (all addresses); port 0 is any free port."""
    try:
        return parse_host_port(text, default_host="0.0.0.0", allow_port_zero=True)
    except ValueError:
        raise UserError(f"bad listen address {text!r}: expected HOST:PORT") from None


async def run_serve(
    config: ServeConfig, *, task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED
) -> None:
    if not config.exports:
        raise UserError("no export given")
    if config.listen is None and config.socket_path is None:
        raise UserError("give --listen HOST:PORT and/or --socket PATH")
    names = [name for name, _ in config.exports]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"two exports are named {duplicates[0]!r}")
    if config.socket_group is not None and config.socket_path is None:
        raise UserError("--socket-group needs --socket PATH")
    gid = resolve_group(config.socket_group) if config.socket_group is not None else None
    with ExitStack() as stack:
        exports = []
        for name, path in config.exports:
            try:
                backend = config.open_backend(path, config.writable)
            except OSError as exc:
                raise UserError(f"cannot open {path}: {exc.strerror or exc}") from None
            stack.callback(backend.close)
            exports.append(Export(name, backend, description=os.path.basename(path)))
        server = make_server(config, exports)
        listen_failure: OSError | None = None
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    serving: Serving = await nursery.start(
                        _serve, server, config.listen, config.socket_path, gid
                    )
                except OSError as exc:  # raised below, outside the nursery's exception group
                    listen_failure = exc
                    nursery.cancel_scope.cancel()
                else:
                    stream = config.ready_stream or sys.stdout
                    print("ready " + " ".join(serving.uris), file=stream, flush=True)
                    task_status.started(serving)
                    async for signum in signals:
                        log.info("%s received, stopping", signal.Signals(signum).name)
                        break
                    serving.server.begin_shutdown()
                    with trio.move_on_after(SHUTDOWN_GRACE):
                        await serving.server.wait_idle()  # requests in flight are answered
                    nursery.cancel_scope.cancel()
                    stats = serving.server.statistics()
                    log.info(
                        "served %d connections, %d requests; sent %d bytes (%d bytes of read "
                        "data; %d bytes of holes described, not sent)",
                        stats.connections_accepted, stats.requests, stats.bytes_sent,
                        stats.read_data_bytes, stats.read_hole_bytes,
                    )
        if listen_failure is not None:
            raise UserError(_listen_error(config, listen_failure))


async def _serve(
    server: Server,
    listen: tuple[str, int] | None,
    socket_path: str | None,
    socket_group: int | None,
    *,
    task_status: trio.TaskStatus[Serving],
) -> None:
    await serve_nbd(
        list(server.exports.values()), listen=listen, socket_path=socket_path,
        socket_group=socket_group, server=server, task_status=task_status,
    )


def _listen_error(config: ServeConfig, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        where = config.socket_path if config.listen is None else "the address"
        return f"cannot listen: {where} is already in use"
    if isinstance(exc, FileExistsError):
        return f"cannot listen: {config.socket_path} exists and is not a socket"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        host, port = config.listen or ("?", 0)
        return f"cannot listen on {host}:{port}: {exc.strerror or 'no such local address'}"
    return f"cannot listen: {exc.strerror or exc}"

"""`postcopy serve [--listen HOST:PORT] [--socket PATH [--socket-group GROUP]] [--writable]
[--tls=off|on|require --tls-cert FILE --tls-key FILE [--tls-ca FILE] [--tls-verify-peer]]
EXPORT...`: run the NBD server.

EXPORT is `PATH` (served under the empty export name) or `NAME=PATH`.  Exports are read-only unless
`--writable`.  The Unix socket is mode 0600 (0660 owned by GROUP with --socket-group).  With
`--tls=require` a client must STARTTLS before anything else; with `--tls-verify-peer` it must also
present a certificate signed by `--tls-ca`.  Prints `ready <uri>...` on stdout once listening (nbds
URIs under --tls=require); runs until SIGINT/SIGTERM, then exits 0 and removes its Unix socket.
"""

from __future__ import annotations

import argparse
import logging
import socket

import trio

from postcopy.errors import UserError
from postcopy.source.serve import (
    BackendOpener,
    ServeConfig,
    open_file_backend,
    parse_export,
    parse_listen,
    run_serve,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("serve", help="export disk images over NBD (the source side)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="TCP address to listen on")
    parser.add_argument("--socket", metavar="PATH", help="Unix socket to listen on (mode 0600)")
    parser.add_argument("--socket-group", metavar="GROUP",
                        help="group that may connect to the Unix socket (mode 0660, not 0600)")
    parser.add_argument("--writable", action="store_true", help="allow clients to write")
    parser.add_argument("--tls", choices=("off", "on", "require"), default="off",
                        help="NBD STARTTLS: off (default), on (offered), require (nothing without)")
    parser.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    parser.add_argument("--tls-ca", metavar="FILE", help="CA certificate for client certificates")
    parser.add_argument("--tls-verify-peer", action="store_true",
                        help="require a client certificate signed by --tls-ca")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every connection")
    parser.add_argument("exports", nargs="*", metavar="EXPORT", help="PATH or NAME=PATH")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, *, open_backend: BackendOpener = open_file_backend) -> int:
    """Serve until a signal; `open_backend` opens each image (tests wrap it to delay reads)."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="postcopy serve: %(levelname)s %(name)s: %(message)s",
    )
    if not args.exports:
        raise UserError("no export given (EXPORT is PATH or NAME=PATH)")
    config = ServeConfig(
        exports=[parse_export(text) for text in args.exports],
        listen=parse_listen(args.listen) if args.listen else None,
        socket_path=args.socket,
        writable=args.writable,
        open_backend=open_backend,
        socket_group=args.socket_group,
        tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        tls_verify_peer=args.tls_verify_peer,
    )
    try:
        trio.run(run_serve, config)
    except socket.gaierror as exc:
        raise UserError(f"bad listen address {args.listen!r}: {exc.strerror}") from None
    return 0

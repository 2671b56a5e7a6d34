"""`postcopy serve [--listen HOST:PORT] [--socket PATH] [--writable] EXPORT...`: run the NBD server.

EXPORT is `PATH` (served under the empty export name) or `NAME=PATH`.  Exports are read-only unless
`--writable`.  Prints `ready <uri>...` on stdout once listening; runs until SIGINT/SIGTERM, then
exits 0 and removes its Unix socket.
"""

from __future__ import annotations

import argparse
import logging
import socket

import trio

from postcopy.errors import UserError
from postcopy.serve import (
    ServeConfig,
    parse_export,
    parse_listen,
    read_delay_from_environment,
    run_serve,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("serve", help="export disk images over NBD (the source side)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="TCP address to listen on")
    parser.add_argument("--socket", metavar="PATH", help="Unix socket to listen on (mode 0600)")
    parser.add_argument("--writable", action="store_true", help="allow clients to write")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every connection")
    parser.add_argument("exports", nargs="*", metavar="EXPORT", help="PATH or NAME=PATH")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
        read_delay=read_delay_from_environment(),
    )
    try:
        trio.run(run_serve, config)
    except socket.gaierror as exc:
        raise UserError(f"bad listen address {args.listen!r}: {exc.strerror}") from None
    return 0
